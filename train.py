"""
Trains a routing head on the hidden states of ALL depths of a frozen pretrained transformer
(the 2022 paper's regime), on CPU, one GPU (AMP) or several (`accelerate launch train.py ...`);
with --model capsules2019, the 2019 paper's capsule networks in its regime.

    python train.py --dataset_name sst5 --backbone minilm --n_epochs 1 --feature_cache .data/features --run_test
    python train.py --dataset_name sst2 --backbone minilm --pretrained_path runs/sst5/model ...
    python train.py --dataset_name sst2 --backbone minilm --eval_only --pretrained_path pretrained/<file>

The frozen backbone runs under torch.autocast at --mixed_precision (fp16 by default on a GPU, as the paper's
authors), the head in float32. A run on one of the papers' backbones stops when CUDA is not usable, unless
--device cpu is given. Every epoch is evaluated once: on the validation split, or on the test split where the dataset
has none (metrics.jsonl names it: "eval_split").

Only the head trains: RAdam, one-cycle schedule (30% warm-up, max lr 1e-3), mixup of hidden states
and one-hot targets (Beta(0.65, 0.65) for text, Beta(0.2, 0.2) for images). --pretrained_path loads a
head and fine-tunes only its last routing (the paper's SST-5 -> SST-2; --finetune all trains every parameter, a
diagnostic variant); the last routing's tensors whose shapes differ (other number of classes) start from their
initialisation.

Nothing is lost: after every epoch output_dir/checkpoint.pt is written atomically (temp file, fsync,
rename, fsync of the folder), then output_dir/metrics.jsonl (a JSON line per epoch, also kept in the
checkpoint), and --resume continues after the last complete epoch; it refuses a checkpoint whose
training-defining arguments (RESUME_ARGS) differ. The final model is output_dir/model/ (save_pretrained: config.json
with the training metadata, model.safetensors; load it with models.from_pretrained), and every epoch's is kept as
output_dir/epoch<k>/ (as the paper keeps every epoch's checkpoint).
An output_dir that holds a run is never overwritten without --resume or --overwrite.
Checkpoints and .pt heads load with torch.load(weights_only=True): a crafted file cannot run code.

--model capsules2019 (the 2019 paper, "An Algorithm for Routing Capsules in All Domains"): text datasets
train models.SSTClassifier on the frozen backbone's hidden states; smallnorb trains
models.SmallNORBClassifier end to end (no backbone; output_dir/model/ then holds the whole network).
Its regime: RAdam, one cycle of max lr 5e-4 (10% warm-up, cosine down to 1e-5) also cycling Adam's
beta1, mixup Beta(0.2, 0.2), batch 20, float32 (no AMP by default); the paper trains smallnorb for 50
epochs and SST for 3 epochs on all subtrees, e.g.

    python train.py --model capsules2019 --dataset_name smallnorb --n_epochs 50 --run_test
    python train.py --model capsules2019 --dataset_name sst5 --n_epochs 3 --feature_cache .data/features --run_test
"""
import argparse
import dataclasses
import errno
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.utils import set_seed
from tqdm import tqdm

import data
import models

# The papers' regimes (command-line options override): one-cycle max lr and warm-up fraction, final lr
# (None: OneCycleLR's default, max_lr / 25 / 1e4), batch size, mixup alpha per modality, mixed precision on GPU.
REGIMES = {
    'routing_head': dict(lr=1e-3, pct_start=0.3, final_lr=None, batch_sz=50,
                         mixup_alpha={'text': 0.65, 'image': 0.2}, gpu_precision='fp16'),
    'capsules2019': dict(lr=5e-4, pct_start=0.1, final_lr=1e-5, batch_sz=20,
                         mixup_alpha={'text': 0.2, 'stereo': 0.2}, gpu_precision='no'),
}
# The standard heads on the same frozen features (models.FROZEN_HEADS; issue 21) train in the routing head's regime.
REGIMES.update({name: REGIMES['routing_head'] for name in models.FROZEN_HEADS})


# The papers' backbones (2022: roberta-large, BEiT-large; 2019: gpt2-large) and their hub ids: slow on a CPU
# (benchmarks/full_scale_smoke.md), so a run with one of them never falls back to the CPU silently (check_device).
PAPER_BACKBONES = ('roberta-large', 'FacebookAI/roberta-large', 'microsoft/beit-large-patch16-224', 'gpt2-large',
                   'openai-community/gpt2-large')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the paper's options
    p.add_argument('--dataset_name', required=True, help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument('--n_epochs', type=int, default=3)
    p.add_argument('--batch_sz', type=int, default=None, help='default: 50 (routing_head), 20 (capsules2019)')
    p.add_argument('--n_iters_per_train_epoch', type=int, default=None,
                   help='optimizer steps per epoch (default: one pass over the training split)')
    p.add_argument('--run_test', action='store_true', help='evaluate the final head on the test split')
    p.add_argument('--rng_seed', type=int, default=0)
    p.add_argument('--pretrained_path', default=None,
                   help="a model to fine-tune (last routing only) or evaluate: a model folder, a .safetensors head, "
                        "a train.py checkpoint.pt, a plain state-dict .pt (the authors' published 2019 files), or the "
                        "authors' 2022 files by their names: <dataset>_head_for_<backbone>.state_dict, "
                        "<dataset>_head_for_<backbone>_epoch<k>.checkpoint")
    # ours
    p.add_argument('--model', default=None, choices=sorted(REGIMES),
                   help="routing_head: the 2022 paper's RoutingHead; capsules2019: the 2019 paper's SSTClassifier "
                        "(text) or SmallNORBClassifier (smallnorb, trained end to end), each in its paper's regime; "
                        "scalar_mix_mean, scalar_mix_attention, token_depth_attention: standard heads on the same "
                        "features (models.FROZEN_HEADS), in the routing head's regime. "
                        "Default: the model of --pretrained_path (or of the checkpoint --resume continues), "
                        "else routing_head")
    p.add_argument('--backbone', default=None,
                   help="'minilm' (offline default), 'roberta-large', 'microsoft/beit-large-patch16-224', "
                        "'timm/<name>', any transformers id or local folder. Default: the backbone --pretrained_path "
                        "names (the authors' files: the name after '_for_'), else minilm")
    p.add_argument('--revision', default=None, help='pin the backbone to a hub revision')
    p.add_argument('--data_root', default='.data')
    p.add_argument('--download', action='store_true', help='fetch the dataset from its official source')
    p.add_argument('--data_source', default='files', choices=data.DATA_SOURCES,
                   help="files (default, offline): the official files under --data_root; hub: sst5, sst2, imdb "
                        "from the Hugging Face hub with the datasets library (the same data)")
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                   help="auto: CUDA when available, else the CPU; except for the papers' backbones "
                        f"({', '.join(PAPER_BACKBONES)}), which run on a CPU only with --device cpu given")
    p.add_argument('--mixed_precision', default=None, choices=['no', 'fp16', 'bf16'],
                   help="the frozen backbone's precision: its forward runs under torch.autocast at this dtype, in "
                        "no_grad (fp16 on GPU as the paper's authors; bf16 on a CPU with bfloat16 instructions). The "
                        "head trains in float32, as the authors'. Default: no on CPU; on GPU fp16 (routing_head), "
                        "no (capsules2019)")
    p.add_argument('--matmul_precision', default='highest', choices=['highest', 'high', 'medium'],
                   help="torch.set_float32_matmul_precision. On a CPU with bfloat16 instructions (AVX512-BF16, AMX) "
                        "'medium' lets oneDNN compute float32 matrix products with bfloat16 arithmetic: on this "
                        "repository's 2-core CPU 1.5x faster head training, scores within 1e-6 and gradients within "
                        "2e-4 of float32's (python -m benchmarks.train_step); on CUDA it allows plain bfloat16")
    p.add_argument('--chunk_elements', type=int, default=None,
                   help="routing_head: the streamed routings' chunk size (EfficientVectorRouting's chunk_elements: "
                        "about this many elements of [d_emb + n_out] per input over the batch in a chunk). Default: "
                        "per device, cache-sized on a CPU (2^21 float32 elements; larger is faster on busy cores), on CUDA the whole sequence in one "
                        "chunk when its working set fits a quarter of the free memory. Changes speed and memory, "
                        "never results")
    p.add_argument('--n_hid', type=int, default=None,
                   help="routing_head: the number of hidden vectors of its routings (default: 64, the paper's; with "
                        "--pretrained_path, that head's)")
    p.add_argument('--n_routings', type=int, default=None, choices=[2, 3],
                   help="routing_head: 3 routings (the paper's, the default; with --pretrained_path, that head's), or 2 "
                        "without the middle one")
    p.add_argument('--d_hid', type=int, default=None,
                   help="routing_head: project the hidden states from d_emb to d_hid features before routing, so that "
                        "the routings work at width d_hid (default: none, the paper's; with --pretrained_path, that "
                        "head's). benchmarks/routing_head_study.py measures these options")
    p.add_argument('--output_dir', default='runs/default')
    p.add_argument('--resume', action='store_true', help='continue from output_dir/checkpoint.pt')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the run in output_dir (checkpoint.pt, model/, epoch<k>/, metrics.jsonl), '
                        'or a --pretrained_path head there; without it such a run is never overwritten')
    p.add_argument('--eval_only', action='store_true', help='evaluate --pretrained_path on the test split')
    p.add_argument('--feature_cache', default=None,
                   help='text only: a folder where the frozen hidden states of every text are stored once '
                        '(float16, memory-mapped) and read back, instead of running the backbone each step')
    p.add_argument('--lr', type=float, default=None, help='one-cycle max learning rate (default: 1e-3 routing_head, '
                                                            '5e-4 capsules2019)')
    p.add_argument('--finetune', default='last_routing', choices=['last_routing', 'all'],
                   help="with --pretrained_path: train only the last routing (the paper's SST-2 recipe) or every "
                        "parameter (a diagnostic variant)")
    p.add_argument('--mixup_alpha', type=float, default=None,
                   help='default: 0.65 text, 0.2 images (routing_head); 0.2 (capsules2019); 0 = off')
    p.add_argument('--max_length', type=int, default=None, help="text window (default: the backbone's)")
    p.add_argument('--image_size', type=int, default=224, help="images' side after preprocessing")
    p.add_argument('--num_workers', type=int, default=0)
    args = p.parse_args(argv)
    if args.dataset_name not in data.DATASETS:
        p.error(f"unknown --dataset_name {args.dataset_name!r}; choose one of {', '.join(data.DATASETS)}")
    if args.data_source == 'hub' and args.dataset_name not in data.HUB_DATASETS:
        p.error(f"--data_source hub offers {', '.join(data.HUB_DATASETS)} only; {args.dataset_name} is read from "
                f"its files (--data_source files)")
    if args.eval_only and not args.pretrained_path:
        p.error('--eval_only needs --pretrained_path (the head to evaluate)')
    if args.chunk_elements is not None and args.chunk_elements <= 0:
        p.error(f'--chunk_elements must be a positive int (elements per chunk), got {args.chunk_elements}')
    if args.pretrained_path and not os.path.exists(args.pretrained_path):
        p.error(f"--pretrained_path {args.pretrained_path!r}: no such folder or file (a model folder written by train.py "
                f"or save_pretrained, an older .safetensors head, a .pt state dict, or the authors' 2022 "
                f"<dataset>_head_for_<backbone>.state_dict or ..._epoch<k>.checkpoint)")
    for name in ('n_epochs', 'batch_sz', 'n_iters_per_train_epoch', 'n_hid', 'd_hid'):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be a positive integer, got {value}")
    if args.mixup_alpha is not None and not (0 <= args.mixup_alpha < math.inf):
        p.error(f"--mixup_alpha must be 0 (no mixup) or positive, got {args.mixup_alpha}")
    if args.lr is not None and not (0 < args.lr < math.inf):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.max_length is not None and args.max_length < 3:
        p.error(f"--max_length must be at least 3 (the backbone's special tokens and at least one token of text), "
                f"got {args.max_length}")
    if args.image_size < 1:
        p.error(f"--image_size must be a positive integer, got {args.image_size}")
    if args.finetune != 'last_routing' and not args.pretrained_path:
        p.error(f"--finetune {args.finetune} fine-tunes a pretrained model: pass --pretrained_path too")
    if args.resume and args.overwrite:
        p.error('--resume continues the run in --output_dir; --overwrite replaces it: pass one of them')
    return args


def resolve_model(args, pretrained_meta=None, checkpoint_meta=None):
    """Sets args.model (given, else the pretrained model's or the resumed checkpoint's, else routing_head) and
    the regime's defaults of --lr and --batch_sz. (A resumed checkpoint of another model: check_resume_args.)"""
    if pretrained_meta is not None and args.model not in (None, pretrained_meta['model']):
        raise ValueError(f"--pretrained_path was trained with model {pretrained_meta['model']!r}, "
                         f"not --model {args.model!r}")
    args.model = args.model or (pretrained_meta or checkpoint_meta or {}).get('model', 'routing_head')
    regime = REGIMES[args.model]
    args.lr = regime['lr'] if args.lr is None else args.lr
    args.batch_sz = regime['batch_sz'] if args.batch_sz is None else args.batch_sz
    return regime


# -------------------------------------------------------------------------------------------------
# Saving and loading, atomically (data.save_atomic: temp file + rename)
# -------------------------------------------------------------------------------------------------

RUN_FILES = ('checkpoint.pt', 'model', 'metrics.jsonl')   # what a run writes into output_dir, and epoch<k>/ folders


def run_files(out):
    """The names of the files and folders of a run that output_dir holds."""
    epochs = sorted((n for n in os.listdir(out) if re.fullmatch(r'epoch\d+', n)), key=lambda n: int(n[5:])) \
        if os.path.isdir(out) else []
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))] + epochs
# The arguments that define what a run trains: --resume refuses a checkpoint written with others.
# --feature_cache is compared as on or off (the float16 cache's features, or the backbone's float32 ones); its
# folder may move, since the cache's key guarantees the same features. The data themselves are compared by their
# fingerprint (data.split_fingerprint), not by --data_root, which may move too.
RESUME_ARGS = ('model', 'dataset_name', 'backbone', 'revision', 'max_length', 'image_size', 'pretrained_path',
               'lr', 'batch_sz', 'mixup_alpha', 'finetune', 'rng_seed', 'n_epochs', 'n_iters_per_train_epoch',
               'mixed_precision', 'matmul_precision', 'feature_cache', 'n_hid', 'n_routings', 'd_hid')
# The routing head's architecture options (--n_hid, --n_routings, --d_hid) and their defaults: the paper's head.
HEAD_OPTIONS = {name: inspect.signature(models.RoutingHead).parameters[name].default
                for name in ('n_hid', 'n_routings', 'd_hid')}


def load_checkpoint(path):
    """A train.py checkpoint, loaded with weights_only=True (models.torch_load_safely): a crafted file cannot run
    code (train.py stores its arguments and metrics as plain types)."""
    return models.torch_load_safely(path)


def check_output_dir(args):
    """Before any data is read or encoded: output_dir must be a writable folder, and must not hold a run
    (or the --pretrained_path head) that this run would overwrite, unless --resume or --overwrite."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out!r} is a file, not a folder: choose another --output_dir")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output_dir {out!r} is not writable ({e.strerror or e}): choose another --output_dir")
    lock_output_dir(out)                                  # before looking at what it holds: one writer at a time
    try:
        check_run_files(args, out)
    except BaseException:
        release_output_dir(out)
        raise


# The locks of the output folders this process writes (one writer per run folder), by real path.
_OUTPUT_LOCKS = {}


def lock_output_dir(out):
    """Take output_dir/.lock (a file lock, filelock: flock on POSIX) for the whole run, or stop at once: a second
    run on the folder, or a second --resume of it, would mix its files with this one's. Under `accelerate launch`
    the main process (RANK 0) holds it for all the run's processes. Released by release_output_dir (main does, at
    the end of the run) or when the process ends."""
    from filelock import FileLock, Timeout
    if os.environ.get('RANK', '0') != '0':
        return
    key = os.path.realpath(out)
    lock = FileLock(os.path.join(out, '.lock'), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"--output_dir {out!r} is in use: another train.py run holds {os.path.join(out, '.lock')} "
                         f"(two runs writing one folder would mix their checkpoints, models and metrics): wait for "
                         f"it to finish, or choose another --output_dir") from None
    _OUTPUT_LOCKS[key] = lock


def release_output_dir(out):
    lock = _OUTPUT_LOCKS.pop(os.path.realpath(out), None)
    if lock is not None:
        lock.release()


def check_run_files(args, out):
    """output_dir must not hold a run (or the --pretrained_path head) that this run would overwrite, unless
    --resume or --overwrite."""
    existing = run_files(out)
    pretrained = os.path.normpath(args.pretrained_path or '')
    if (args.pretrained_path and not args.overwrite
            and os.path.realpath(os.path.dirname(pretrained)) == os.path.realpath(out)
            and os.path.basename(pretrained) in [*RUN_FILES, *existing]):
        raise ValueError(f"--pretrained_path {args.pretrained_path!r} is in --output_dir {out!r}, where this run "
                         f"would overwrite it with its own {os.path.basename(pretrained)}: "
                         f"choose a new --output_dir (or pass --overwrite to replace it)")
    if existing and not args.overwrite:
        if not args.resume:
            raise ValueError(f"--output_dir {out!r} holds a run ({', '.join(existing)}): pass --resume to continue it, "
                             f"--overwrite to replace it, or choose a new --output_dir")
        if 'checkpoint.pt' not in existing:
            raise ValueError(f"--resume: --output_dir {out!r} holds {', '.join(existing)} but no checkpoint.pt to "
                             f"resume from; starting over would overwrite them: pass --overwrite to replace them, "
                             f"or choose a new --output_dir")


def check_resume_args(checkpoint, args, path):
    """Refuse to resume a checkpoint written with other training-defining arguments (RESUME_ARGS), naming them."""
    saved = checkpoint.get('args')
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} records no arguments, so it cannot be checked against this run's; "
                         f"delete it to start over, or use a new --output_dir")
    current = vars(args)
    defaults = vars(parse_args(['--dataset_name', args.dataset_name]))   # for arguments newer than the checkpoint
    if saved.get('model') == 'routing_head':
        defaults.update(HEAD_OPTIONS)                     # a checkpoint older than --n_hid etc.: the paper's head

    def trained(name):
        return saved.get(name, defaults[name])

    def same(name):
        a, b = trained(name), current.get(name)
        if name == 'pretrained_path' and a and b:
            return os.path.realpath(a) == os.path.realpath(b)
        if name == 'feature_cache':
            return bool(a) == bool(b)
        return a == b

    differ = [name for name in RESUME_ARGS if not same(name)]
    if differ:
        details = ', '.join(f"--{n} {trained(n)!r} (now {current.get(n)!r})" for n in differ)
        raise ValueError(f"--resume: {path} was trained with {details}: resume with the same arguments, or start "
                         f"a new run in another --output_dir")


def check_resume_data(checkpoint, args, splits, path):
    """Refuse to resume on other data than the checkpoint trained on: the fingerprints (data.split_fingerprint) of
    the splits it recorded must match this run's, naming the splits that differ and the data arguments that
    changed. A checkpoint of an older train.py records none: said, not refused."""
    saved = checkpoint.get('data_fingerprint')
    if not isinstance(saved, dict):
        print(f"--resume: {path} records no fingerprint of its data (an older train.py); the data cannot be "
              f"checked against it", file=sys.stderr)
        return
    now = data_fingerprint(splits)
    differ = [split for split in sorted(set(saved) | set(now)) if saved.get(split) != now.get(split)]
    if differ:
        trained = checkpoint.get('args') or {}
        moved = ', '.join(f"--{n} {trained.get(n)!r} (now {getattr(args, n)!r})" for n in ('data_root', 'data_source')
                          if n in trained and trained[n] != getattr(args, n))
        raise ValueError(f"--resume: {path} was trained on other data: the {', '.join(differ)} split"
                         f"{'s differ' if len(differ) > 1 else ' differs'} from the one it recorded"
                         f"{' (' + moved + ')' if moved else ''}: resume on the same data, or start a new run in "
                         f"another --output_dir")


def data_fingerprint(splits):
    """{split: data.split_fingerprint} of the splits a run trains and evaluates on."""
    return {k: data.split_fingerprint(splits[k]) for k in ('train', 'valid', 'test') if splits.get(k) is not None}


DISK_ERRORS = {errno.ENOSPC: 'disk full: free some space', errno.EDQUOT: 'disk quota exceeded: free some space',
               errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied', errno.EPERM: 'not permitted'}


def disk_full(folder, needed_bytes=0):
    """Whether folder's file system has no room for needed_bytes (torch.save reports a full disk as a RuntimeError
    'unexpected pos' without an errno: the free space tells)."""
    try:
        return shutil.disk_usage(folder).free <= needed_bytes + (1 << 20)
    except OSError:
        return False


def state_bytes(state):
    """The bytes of the tensors in a (nested) state."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def save_checkpoint(state, path):
    """The checkpoint, atomically; a failed write (disk full, ...) leaves the previous checkpoint intact."""
    try:
        data.save_atomic(lambda tmp: torch.save(state, tmp), path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError):
            why = DISK_ERRORS.get(e.errno)
        else:                                    # torch's writer: '[enforce fail at ...] unexpected pos'
            why = 'disk full: free some space' if disk_full(os.path.dirname(os.path.abspath(path)),
                                                            state_bytes(state)) else None
        detail = f" ({why})" if why else ''
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"could not write checkpoint {path}{detail}: {message}. The previous checkpoint, if any, "
                           f"is intact: run again with --resume to continue from it") from e


def write_metrics(path, records):
    """metrics.jsonl: one JSON line per record, rewritten atomically (it always matches the checkpoint)."""
    data.write_atomic(path, ''.join(json.dumps(r) + '\n' for r in records).encode())


def read_metrics(path):
    """A run's metrics.jsonl (the file, or the run's folder) -> (per-epoch records, the final record or None while
    the run is unfinished)."""
    path = os.path.join(path, 'metrics.jsonl') if os.path.isdir(path) else path
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    finals = [r['final'] for r in records if 'final' in r]
    return [r for r in records if 'epoch' in r], (finals[-1] if finals else None)


def save_model(model, folder, backbone, training):
    """model.save_pretrained(folder): config.json (the constructor's arguments, the backbone it trained on and the
    training metadata) and model.safetensors, each written atomically."""
    model.save_pretrained(folder, backbone=backbone and backbone.name, backbone_revision=backbone and backbone.revision,
                          training=training)


# -------------------------------------------------------------------------------------------------
# Data: batches of (hidden [batch, n_pos, d_depth, d_emb], mask [batch, n_pos] or None, labels [batch])
# -------------------------------------------------------------------------------------------------

class PassSampler(torch.utils.data.Sampler):
    """The training split's shuffled order (as RandomSampler(generator) draws it), each index paired with the pass
    it belongs to: yields (n_pass, index); training_stream sets n_pass before each pass."""

    def __init__(self, n, generator):
        self.n, self.generator, self.n_pass = n, generator, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        return ((self.n_pass, i) for i in torch.randperm(self.n, generator=self.generator).tolist())


class SeededDraws(torch.utils.data.Dataset):
    """A training split whose random transforms (the images' augmentations) draw from torch's RNG seeded with
    (seed, pass, index) alone: another --rng_seed draws other augmentations, the same seed the same ones, in any
    worker and after --resume (which starts mid-pass). The caller's RNG is left as it was (mixup's draws do not
    depend on the loading). Indexed by PassSampler's (n_pass, index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        n_pass, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, n_pass, i)) & (2 ** 63 - 1))   # ints hash the same in every process
            return self.dataset[i]


def make_loaders(args, splits, backbone, accelerator, generator):
    """-> ({split: DataLoader}, the training split's PassSampler or None); the training split is shuffled by
    `generator` alone and its random transforms are seeded by (--rng_seed, pass, index) (SeededDraws); each loader
    draws its workers' seeds from a generator of its own seeded with --rng_seed, never from torch's global RNG, so
    that mixup's draws do not depend on when a pass starts. On CUDA, batches are pinned and workers persist. With
    --feature_cache, text batches come straight from the cache."""
    loaders, sampler = {}, None
    cuda = accelerator.device.type == 'cuda'
    workers = dict(num_workers=args.num_workers, pin_memory=cuda, persistent_workers=cuda and args.num_workers > 0)
    store = None
    if args.feature_cache:
        if splits['modality'] != 'text':
            raise ValueError(f"--feature_cache is for text datasets; {args.dataset_name} is {splits['modality']} "
                             f"(its training images are augmented, so their features change every epoch)")
        store = data.FeatureStore(args.feature_cache, backbone)
        accelerator.print(f"feature cache of {backbone.name}: {os.path.abspath(store.folder)}")
    for split in ('train', 'valid', 'test'):
        dataset = splits[split]
        if dataset is None:
            continue
        if store is None:
            if split == 'train':
                sampler, dataset = PassSampler(len(dataset), generator), SeededDraws(dataset, args.rng_seed)
            loaders[split] = torch.utils.data.DataLoader(
                dataset, batch_size=args.batch_sz, sampler=sampler if split == 'train' else None,
                generator=torch.Generator().manual_seed(args.rng_seed), **workers)
            continue
        with accelerator.main_process_first():
            dataset = store.dataset(dataset.texts, dataset.labels, desc=f"{args.dataset_name}/{split}")
        batches = data.LengthGroupedBatchSampler(dataset.lengths, args.batch_sz, shuffle=(split == 'train'),
                                                 generator=generator if split == 'train' else None)
        loaders[split] = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate_features,
                                                     generator=torch.Generator().manual_seed(args.rng_seed), **workers)
    return loaders, sampler


def features(batch, backbone, cached):
    """A loader's batch -> hidden [batch, n_pos, d_depth, d_emb], mask [batch, n_pos] | None, labels [batch];
    without a backbone (end-to-end models), the loader's inputs (smallnorb: images [batch, 2, 96, 96])."""
    if cached:
        return batch
    inputs, labels = batch
    if backbone is None:
        return inputs, None, labels
    hidden, mask = backbone.encode(inputs)
    return hidden.to(labels.device), None if mask is None else mask.to(labels.device), labels


def mixup(hidden, mask, labels, n_classes, alpha):
    """The authors' mixup: each sample (hidden states or images) is mixed with the next one in the batch (the
    last with the first), x.lerp(x[[1, ..., B-1, 0]], r) with r ~ Beta(alpha, alpha) per sample, and so are the
    one-hot targets; a position is padding in the mix only where it is padding in both. -> hidden, mask, targets."""
    targets = F.one_hot(labels, n_classes).to(hidden.dtype)                       # [batch, n_classes]
    if not alpha:
        return hidden, mask, targets
    r = torch.distributions.Beta(alpha, alpha).sample((len(labels),)).to(hidden.device, hidden.dtype)  # [batch]
    nxt = torch.arange(1, len(labels) + 1, device=hidden.device) % len(labels)   # [1, ..., B-1, 0]
    hidden = hidden.lerp(hidden[nxt], r.view(-1, *[1] * (hidden.dim() - 1)))
    targets = targets.lerp(targets[nxt], r[:, None])
    return hidden, (None if mask is None else mask & mask[nxt]), targets


def soft_cross_entropy(scores, targets):
    """The training loss: cross-entropy of class scores [batch, n_classes] against (mixed) target distributions
    [batch, n_classes], in float32, averaged over the batch."""
    return -(targets * F.log_softmax(scores.float(), dim=-1)).sum(-1).mean()


def training_stream(loader, generator, seed, start_step, sampler=None):
    """The paper's stream of training batches: passes over the training split, each shuffled anew (pass p by
    `generator` seeded with seed * 1000 + p; its augmentations seeded by (seed, p, index) through `sampler`, a
    PassSampler), cycled without end; it starts at global step start_step, so an epoch of n steps takes the next n
    batches (epochs need not align with passes), also after --resume."""
    n_pass, skip = divmod(start_step, len(loader))
    while True:
        generator.manual_seed(seed * 1000 + n_pass)
        if sampler is not None:
            sampler.n_pass = n_pass
        yield from skip_first_batches(loader, skip) if skip else loader
        n_pass, skip = n_pass + 1, 0


def class_scores(head, inputs, mask):
    """-> [batch, n_classes]: the RoutingHead's output, or a_out of the 2019 capsule models' (a_out, mu_out, sig2_out)."""
    out = head(inputs) if mask is None else head(inputs, mask)
    return out[0] if isinstance(out, tuple) else out


def model_name(model):
    """The --model name of a loaded model."""
    frozen_heads = {cls: name for name, cls in models.FROZEN_HEADS.items()}
    return 'routing_head' if isinstance(model, models.RoutingHead) else frozen_heads.get(type(model), 'capsules2019')


def resolve_head_options(args, pretrained=None):
    """Sets --n_hid, --n_routings, --d_hid of --model routing_head: as given, else those of the --pretrained_path
    routing head (fine-tuning keeps its architecture), else the paper's (HEAD_OPTIONS). Given ones must match the
    pretrained head's; other models take none of them."""
    given = {name: getattr(args, name) for name in HEAD_OPTIONS if getattr(args, name) is not None}
    if args.model != 'routing_head':
        if given:
            raise ValueError(f"{', '.join('--' + name for name in given)} set the architecture of --model "
                             f"routing_head, not of --model {args.model}")
        return
    for name, default in HEAD_OPTIONS.items():
        have = default if pretrained is None else getattr(pretrained, name)
        if name in given and pretrained is not None and given[name] != have:
            raise ValueError(f"--{name} {given[name]}: --pretrained_path {args.pretrained_path!r} is a routing head "
                             f"with {name} {have}; leave --{name} out to fine-tune it")
        setattr(args, name, given.get(name, have))


def build_model(args, splits, backbone):
    """-> (the trained module, its training metadata) for --model on this dataset (backbone None: end to end); the
    module's own config (its constructor's arguments) is saved with it by save_pretrained."""
    n_classes, modality = splits['n_classes'], splits['modality']
    metadata = {'model': args.model, 'dataset_name': args.dataset_name}
    if args.model == 'routing_head':
        return models.RoutingHead(backbone.d_depth, backbone.d_emb, n_classes, n_hid=args.n_hid,
                                  n_routings=args.n_routings, d_hid=args.d_hid), metadata
    if args.model in models.FROZEN_HEADS:
        return models.FROZEN_HEADS[args.model](backbone.d_depth, backbone.d_emb, n_classes), metadata
    if modality == 'stereo':
        return models.SmallNORBClassifier(n_objs=n_classes, n_parts=64, d_chns=64), metadata
    if modality == 'text':
        return models.SSTClassifier(backbone.d_depth, backbone.d_emb, d_inp=64, d_cap=2, n_parts=64,
                                    n_classes=n_classes), metadata
    raise ValueError(f"--model capsules2019 has the 2019 paper's models for text datasets (SSTClassifier) and "
                     f"smallnorb (SmallNORBClassifier); --dataset_name {args.dataset_name!r} is {modality}")


def one_cycle(optimizer, lr, regime, total_steps):
    """The regime's single cycle: lr rises from lr / 25 to lr over the first pct_start of the steps, then
    anneals (cosine) to final_lr; Adam's beta1 cycles the other way (0.95 -> 0.85 -> 0.95)."""
    warmup_end = float(regime['pct_start'] * total_steps) - 1             # as OneCycleLR computes it
    if warmup_end == 0 or total_steps - 1 == warmup_end:                  # a phase of no length: 0 / 0 inside it
        raise ValueError(f"{total_steps} optimizer steps in all (--n_epochs x steps per epoch) make a one-cycle "
                         f"schedule with a {regime['pct_start']:.0%} warm-up of a single step, which OneCycleLR "
                         f"cannot schedule: use more steps (--n_epochs, --n_iters_per_train_epoch) or fewer")
    final_div_factor = 1e4 if regime['final_lr'] is None else lr / 25 / regime['final_lr']
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, pct_start=regime['pct_start'],
                                               final_div_factor=final_div_factor, cycle_momentum=True,
                                               total_steps=total_steps)


def depths_hint(state, backbone):
    """Why a state dict may not fit: the depths x size of hidden states it was trained on, against the backbone's."""
    for key in ('depth_emb', 'W'):                        # SSTClassifier, RoutingHead: [d_depth, d_emb]
        shape = tuple(state[key].shape) if key in state else ()
        if backbone is not None and len(shape) == 2 and shape != (backbone.d_depth, backbone.d_emb):
            return (f" (it was trained on hidden states of {shape[0]} depths x {shape[1]}, e.g. gpt2-large's 37 x "
                    f"1280 for the published 2019 SST models; --backbone {backbone.name} gives "
                    f"{backbone.d_depth} x {backbone.d_emb})")
    return ''


def last_routing(head):
    """The parameter-name prefix of the model's last routing (the one fine-tuned from a pretrained model); for the
    standard heads (models.FROZEN_HEADS) its analogue, their final Linear (LAST_STAGE)."""
    if hasattr(head, 'LAST_STAGE'):
        return head.LAST_STAGE
    name = 'route' if isinstance(head, models.RoutingHead) else 'routings'
    return f"{name}.{len(getattr(head, name)) - 1}."


@torch.no_grad()
def validate(run, split):
    """Accuracy of run.head on `split` ('valid' or 'test'), from its prepared loader."""
    head, accelerator = run.head, run.accelerator
    head.eval()
    n_correct = n_not_finite = n_total = 0                # tensors on the device, read once at the end
    for batch in tqdm(run.eval_loaders[split], desc=f"{run.args.dataset_name} {split}", leave=False,
                      disable=not accelerator.is_local_main_process):
        hidden, mask, labels = features(batch, run.backbone, run.cached)
        with accelerator.autocast():
            scores = class_scores(head, hidden, mask)
        finite = torch.isfinite(scores).all(dim=-1)                               # [batch]
        preds, labels, finite = accelerator.gather_for_metrics((scores.argmax(-1), labels, finite))
        n_correct = n_correct + (preds == labels).sum()
        n_not_finite = n_not_finite + (~finite).sum()
        n_total += len(labels)
    if n_total == 0:
        raise ValueError(f"the {split} split has no examples: an accuracy over nothing is no result")
    if int(n_not_finite):                                 # (gathered: every process stops, none waits)
        raise FloatingPointError(f"the {split} scores of {int(n_not_finite)} of {n_total} examples are not finite "
                                 f"(NaN/Inf): refusing to report an accuracy; the head or its input features are damaged")
    return int(n_correct) / n_total


# -------------------------------------------------------------------------------------------------
# The stages of a run: build it, train one step / one epoch, validate, save; main composes them
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything a run trains and evaluates with (build_run makes it; the other stages read and update it)."""
    args: argparse.Namespace
    regime: dict
    accelerator: Accelerator
    splits: dict
    backbone: object                      # models.FrozenBackbone, or None (end-to-end models)
    head: torch.nn.Module
    metadata: dict                        # the model and dataset, saved with every model
    eval_loaders: dict                    # {'valid', 'test': prepared DataLoader} (those the dataset has)
    cached: bool                          # batches come from the feature cache
    checkpoint_path: str
    metrics_path: str
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    batches: object = None                # the training stream (training_stream)
    steps_per_epoch: int = 0
    mixup_alpha: float = 0.0
    history: list = dataclasses.field(default_factory=list)   # one metrics record per completed epoch
    data_fingerprint: dict = None         # {split: data.split_fingerprint}, saved in every checkpoint
    lock: object = None                   # the output folder's lock (RunLock), held for the whole run

    @property
    def n_classes(self):
        return self.splits['n_classes']


def build_run(args):
    """Parsed arguments -> a Run: the device, the data, the frozen backbone, the head (initialised from
    --pretrained_path), and, unless --eval_only, the optimizer, the schedule and the training stream, restored
    from output_dir/checkpoint.pt with --resume."""
    pretrained, pretrained_config = models.from_pretrained(args.pretrained_path) if args.pretrained_path else (None, None)
    backbone_given = args.backbone is not None
    args.backbone = args.backbone or (pretrained_config or {}).get('backbone') or 'minilm'
    use_cpu = check_device(args)
    pretrained_meta = None if pretrained is None else {
        'model': model_name(pretrained)}
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pt')
    checkpoint = load_checkpoint(checkpoint_path) if args.resume and os.path.exists(checkpoint_path) else None
    if checkpoint is not None and (not isinstance(checkpoint, dict)
                                   or not {'head', 'optimizer', 'scheduler', 'history', 'metadata'} <= set(checkpoint)):
        raise RuntimeError(f"--resume: {checkpoint_path} is not a checkpoint written by train.py (no head, "
                           f"optimizer, scheduler, history and metadata); delete it to start over")
    regime = resolve_model(args, pretrained_meta, checkpoint and checkpoint['metadata'])
    resolve_head_options(args, pretrained)
    if not args.eval_only:
        check_output_dir(args)                            # before minutes of loading and encoding
    # the head trains in float32 (as the authors'): no autocast, no GradScaler; the backbone runs under autocast
    accelerator = Accelerator(cpu=use_cpu, mixed_precision='no',
                              dataloader_config=DataLoaderConfiguration(non_blocking=not use_cpu))
    precision = args.mixed_precision or ('no' if use_cpu else regime['gpu_precision'])
    set_seed(args.rng_seed)

    splits = data.get_dataset_splits(args.dataset_name, data_root=args.data_root, download=args.download,
                                     image_size=args.image_size, source=args.data_source)
    for split in (('test',) if args.eval_only else ('train', 'valid') + (('test',) if args.run_test else ())):
        if splits[split] is not None and len(splits[split]) == 0:
            raise ValueError(f"--dataset_name {args.dataset_name}: the {split} split is empty (in {args.data_root})")
    backbone = load_frozen_backbone(args, splits, accelerator, AUTOCAST_DTYPES[precision])
    head, metadata = build_model(args, splits, backbone)
    if args.chunk_elements is not None:
        if not isinstance(head, models.RoutingHead):
            raise ValueError(f"--chunk_elements sets the streamed routings of --model routing_head; "
                             f"{type(head).__name__} has none")
        head.set_chunk_elements(args.chunk_elements)
    metadata.update(device_and_precision(accelerator, backbone, args))
    accelerator.print('device and precision: ' + ', '.join(f'{k} {v}' for k, v in metadata.items()
                                                           if k not in ('model', 'dataset_name')))
    if pretrained is not None:
        init_from_pretrained(head, pretrained, pretrained_config, args, backbone, accelerator.print, backbone_given)

    shuffle = torch.Generator()                           # shuffles the training passes (training_stream)
    loaders, train_sampler = make_loaders(args, splits, backbone, accelerator, shuffle)
    run = Run(args=args, regime=regime, accelerator=accelerator, splits=splits, backbone=backbone, head=head,
              metadata=metadata, eval_loaders={}, cached=bool(args.feature_cache), checkpoint_path=checkpoint_path,
              metrics_path=os.path.join(args.output_dir, 'metrics.jsonl'),
              data_fingerprint=None if args.eval_only else data_fingerprint(splits))
    if args.eval_only:
        run.head, run.eval_loaders['test'] = accelerator.prepare(head, loaders['test'])
        return run

    optimizer = torch.optim.RAdam([p for p in head.parameters() if p.requires_grad], lr=args.lr)
    run.head, run.optimizer, train_loader = accelerator.prepare(head, optimizer, loaders['train'])
    run.steps_per_epoch = args.n_iters_per_train_epoch or len(train_loader)     # per process, when several
    run.scheduler = one_cycle(run.optimizer, args.lr, regime, total_steps=args.n_epochs * run.steps_per_epoch)
    run.eval_loaders = {k: accelerator.prepare(loaders[k]) for k in ('valid', 'test') if k in loaders}
    run.mixup_alpha = regime['mixup_alpha'][splits['modality']] if args.mixup_alpha is None else args.mixup_alpha
    if args.overwrite:
        remove_old_run(run)
    if checkpoint is not None:
        restore(run, checkpoint)
    elif args.resume:
        accelerator.print(f"--resume: no {checkpoint_path} yet, starting from scratch")
    run.batches = training_stream(train_loader, shuffle, args.rng_seed,
                                  start_step=len(run.history) * run.steps_per_epoch, sampler=train_sampler)
    return run


AUTOCAST_DTYPES = {'no': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}   # --mixed_precision -> the backbone's


def check_device(args):
    """-> whether the run is on the CPU. --device cuda needs CUDA; --device auto falls back to the CPU, except for a
    backbone of the papers (PAPER_BACKBONES): that stops unless --device cpu is given."""
    cuda = torch.cuda.is_available()
    why = (f"torch.cuda.is_available() is False: no GPU, or its driver is older than this torch build (CUDA "
           f"{torch.version.cuda or 'none: a CPU-only build'}) needs")
    if args.device == 'cuda' and not cuda:
        raise RuntimeError(f"--device cuda: no CUDA device is usable ({why})")
    if args.device == 'auto' and not cuda and args.backbone in PAPER_BACKBONES:
        raise RuntimeError(f"--backbone {args.backbone} is one of the papers' backbones, meant for a GPU, and no CUDA "
                           f"device is usable ({why}); on a CPU its steps are slow (benchmarks/full_scale_smoke.md). "
                           f"Pass --device cpu to run it on the CPU anyway")
    return args.device == 'cpu' or not cuda


def device_and_precision(accelerator, backbone, args):
    """What the run computes on, for the log and the saved model's config.json (training metadata)."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    autocast = backbone is not None and backbone.autocast_dtype
    return {'device': f'{device.type} ({name})',
            'backbone_precision': 'none' if backbone is None else
            (f"{str(autocast).replace('torch.', '')} autocast" if autocast else 'float32'),
            'head_precision': 'float32', 'matmul_precision': args.matmul_precision}


def load_frozen_backbone(args, splits, accelerator, autocast_dtype=None):
    """The frozen backbone --backbone on the accelerator's device, its forward under autocast at autocast_dtype
    (None: float32), or None for end-to-end models (smallnorb)."""
    if splits['modality'] == 'stereo':                    # smallnorb: the 2019 network learns from the pixels
        if args.model != 'capsules2019':
            raise ValueError(f"--dataset_name {args.dataset_name!r} (stereo pairs) has no frozen backbone; it trains "
                             f"the 2019 paper's SmallNORBClassifier end to end: pass --model capsules2019")
        return None
    backbone = models.load_backbone(args.backbone, revision=args.revision, max_length=args.max_length,
                                    autocast_dtype=autocast_dtype)
    if backbone.modality != splits['modality']:
        raise ValueError(f"--backbone {args.backbone!r} is a {backbone.modality} model but --dataset_name "
                         f"{args.dataset_name!r} is {splits['modality']}")
    return backbone.to(accelerator.device)


def init_from_pretrained(head, pretrained, pretrained_config, args, backbone, log, backbone_given=True):
    """--pretrained_path: with --eval_only the head is the pretrained one (every tensor must fit); otherwise it is
    fine-tuned: every tensor that fits is loaded and only the last routing trains (the paper's SST-5 -> SST-2
    recipe; --finetune all trains every parameter). The backbone must be the one the file names; the authors' files
    name theirs only in the file name, so a --backbone given explicitly (e.g. a local copy) is taken as theirs."""
    state = pretrained.state_dict()
    trained_on, using = pretrained_config.get('backbone'), backbone and backbone.name
    authors = pretrained_config.get('training', {}).get('source') == 'authors_2022'
    if authors and backbone_given and trained_on not in (None, using):
        log(f"--pretrained_path {args.pretrained_path} is named for backbone {trained_on!r}; using --backbone {using!r}")
    elif trained_on not in (None, using):
        raise ValueError(f"--pretrained_path {args.pretrained_path!r} was trained with backbone "
                         f"{trained_on!r}, not --backbone {using!r}")
    revision, now = pretrained_config.get('backbone_revision'), backbone and backbone.revision
    if trained_on is not None and revision != now:
        raise ValueError(f"--pretrained_path {args.pretrained_path!r} was trained with backbone {trained_on!r} at "
                         f"revision {revision!r}, not --revision {now!r}: pass --revision {revision}"
                         if revision else f"--pretrained_path {args.pretrained_path!r} was trained with backbone "
                         f"{trained_on!r} at no pinned revision, not --revision {now!r}: leave --revision out")
    if args.eval_only:
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"--pretrained_path {args.pretrained_path!r} does not fit a {args.model} model for "
                               f"{args.dataset_name} on {args.backbone}{depths_hint(state, backbone)}: {e}") from e
        return
    own = head.state_dict()
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    head.load_state_dict(fits, strict=False)
    for name, p in head.named_parameters():
        p.requires_grad_(args.finetune == 'all' or name.startswith(last_routing(head)))
    trained = 'every parameter' if args.finetune == 'all' else f"only the last routing ({last_routing(head)[:-1]})"
    log(f"fine-tuning {args.pretrained_path} on {args.dataset_name}, training {trained}: loaded {len(fits)} of the "
        f"head's {len(own)} tensors; left at initialisation (other shapes, e.g. another number of classes): "
        f"{', '.join(sorted(set(own) - set(fits))) or 'none'}")


def remove_old_run(run):
    """--overwrite: the run replaced, none of its files stays beside ours. Nothing is removed until everything can
    be: the old run's entries are first moved aside, together, into one folder (output_dir/.overwritten-<pid>-*);
    if any cannot be moved, those already moved are put back and the run stops with the old run intact. Only then
    is the folder deleted. An entry that is a symbolic link (e.g. epoch<k> -> elsewhere) is removed as a link: what
    it points at is never touched."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        remove_run_files(run.args.output_dir)
    run.accelerator.wait_for_everyone()


def remove_run_files(out):
    """remove_old_run's work in output_dir `out` (see there)."""
    data.remove_orphans(out, '.overwritten-')             # of --overwrite runs killed while deleting
    names = run_files(out)
    if not names:
        return
    aside = tempfile.mkdtemp(dir=out, prefix=f".overwritten-{os.getpid()}-")
    moved = []
    try:
        for name in names:
            os.rename(os.path.join(out, name), os.path.join(aside, name))         # a link moves as the link
            moved.append(name)
    except OSError as e:
        failed = os.path.join(out, name)
        for back in reversed(moved):
            os.rename(os.path.join(aside, back), os.path.join(out, back))
        os.rmdir(aside)
        raise RuntimeError(f"--overwrite: cannot remove {failed} ({e.strerror or e}); nothing of the old run was "
                           f"removed") from e
    try:
        shutil.rmtree(aside)                              # links inside are unlinked, never followed
    except OSError as e:
        print(f"--overwrite: the old run was moved aside into {aside} but could not all be deleted "
              f"({e.strerror or e}): delete it by hand", file=sys.stderr)


def restore(run, checkpoint):
    """--resume: the head, optimizer, schedule and metrics history of output_dir/checkpoint.pt."""
    args, path = run.args, run.checkpoint_path
    check_resume_args(checkpoint, args, path)
    check_resume_data(checkpoint, args, run.splits, path)
    models.check_finite(checkpoint['head'], f"--resume: {path}")
    if checkpoint['scheduler']['total_steps'] != run.scheduler.total_steps:
        raise ValueError(f"--resume: {path} belongs to a run of {checkpoint['scheduler']['total_steps']} "
                         f"steps in all, this one has {run.scheduler.total_steps}: resume with the same --n_epochs "
                         f"and --n_iters_per_train_epoch (the one-cycle schedule spans the whole run)")
    try:
        run.accelerator.unwrap_model(run.head).load_state_dict(checkpoint['head'])
        run.optimizer.load_state_dict(checkpoint['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RuntimeError(f"--resume: {path} does not fit this run's {args.model} for "
                           f"{args.dataset_name} on {args.backbone}: {e}") from e
    run.scheduler.load_state_dict(checkpoint['scheduler'])
    run.history = checkpoint['history']
    run.accelerator.print(f"resumed from {path} after epoch {len(run.history)}")


def train_step(run, batch):
    """One optimizer step on a batch of the training stream (mixup, forward, loss, backward, step).
    -> (loss [], number of correct argmax predictions against the mixed targets' argmax []), on the device."""
    hidden, mask, labels = features(batch, run.backbone, run.cached)
    hidden, mask, targets = mixup(hidden, mask, labels, run.n_classes, run.mixup_alpha)
    with run.accelerator.autocast():
        scores = class_scores(run.head, hidden, mask)                           # [batch, n_classes]
        loss = soft_cross_entropy(scores, targets)
    run.optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach(), (scores.argmax(-1) == targets.argmax(-1)).sum()


def train_one_epoch(run, epoch, log_every=50):
    """Trains run.steps_per_epoch steps. The loss and accuracy add up on the device and are read every log_every
    steps (no host sync per step). -> the epoch's metrics record {epoch, train_loss, train_acc, epoch_seconds}."""
    args = run.args
    set_seed(args.rng_seed * 1000 + epoch)            # each epoch's mixup is reproducible
    run.head.train()
    started, n_seen = time.time(), 0
    total_loss = n_correct = torch.zeros((), device=run.accelerator.device)
    progress = tqdm(range(run.steps_per_epoch), desc=f"{args.dataset_name} train, epoch {epoch + 1}/{args.n_epochs}",
                    disable=not run.accelerator.is_local_main_process)
    for step in progress:
        batch = next(run.batches)
        loss, correct = train_step(run, batch)
        n_batch = len(batch[-1])
        total_loss, n_correct, n_seen = total_loss + loss.float() * n_batch, n_correct + correct, n_seen + n_batch
        if (step + 1) % log_every == 0 or step + 1 == run.steps_per_epoch:
            mean_loss = total_loss.item() / n_seen
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the training loss is {mean_loss} in epoch {epoch + 1} (by step {step + 1}); "
                                         f"the last checkpoint ({run.checkpoint_path}) is intact")
            progress.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{n_correct.item() / n_seen:.4f}",
                                 lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    return {'epoch': epoch + 1, 'train_loss': total_loss.item() / n_seen, 'train_acc': n_correct.item() / n_seen,
            'epoch_seconds': time.time() - started}


def save_epoch(run, record):
    """After an epoch: its model (epoch<k>/, as the paper keeps every epoch's), the checkpoint, the metrics."""
    run.history.append(record)
    if run.accelerator.is_main_process:
        head = run.accelerator.unwrap_model(run.head)
        epoch_dir = os.path.join(run.args.output_dir, f"epoch{record['epoch']}")
        try:
            save_model(head, epoch_dir, run.backbone, {**run.metadata, **record})
        except OSError as e:
            raise RuntimeError(f"could not write {epoch_dir} ({DISK_ERRORS.get(e.errno, e.strerror or e)}). The "
                               f"checkpoint of the epoch before, if any, is intact: run again with --resume to "
                               f"continue from it") from e
        state = {'head': head.state_dict(), 'optimizer': run.optimizer.state_dict(),
                 'scheduler': run.scheduler.state_dict(), 'history': run.history, 'args': vars(run.args),
                 'metadata': run.metadata, 'backbone': run.backbone and run.backbone.name,
                 'backbone_revision': run.backbone and run.backbone.revision,
                 'data_fingerprint': run.data_fingerprint}
        save_checkpoint(state, run.checkpoint_path)
        try:
            write_metrics(run.metrics_path, run.history)
        except OSError as e:
            raise RuntimeError(f"could not write {run.metrics_path} ({DISK_ERRORS.get(e.errno, e.strerror or e)}). "
                               f"The checkpoint of this epoch is intact and holds the metrics: run again with "
                               f"--resume") from e
    run.accelerator.wait_for_everyone()


def save_final(run, final):
    """The final model (output_dir/model/) and the final metrics record."""
    model_dir = os.path.join(run.args.output_dir, 'model')
    if run.accelerator.is_main_process:
        try:
            save_model(run.accelerator.unwrap_model(run.head), model_dir, run.backbone, final)
            write_metrics(run.metrics_path, run.history + [{'final': final}])
        except OSError as e:
            raise RuntimeError(f"could not write the model into {run.args.output_dir}: {e}. The checkpoint of the "
                               f"last epoch is intact: run again with --resume to write the model") from e
    run.accelerator.print(f"saved {model_dir}")


def main(argv=None):
    args = parse_args(argv)
    try:
        return train_and_evaluate(args)
    finally:
        release_output_dir(args.output_dir)              # held since check_output_dir (not with --eval_only)


def train_and_evaluate(args):
    """The run main composes from the stages; -> the test accuracy (or None without --run_test / --eval_only)."""
    torch.set_float32_matmul_precision(args.matmul_precision)
    run = build_run(args)
    log = run.accelerator.print
    if args.eval_only:
        acc = validate(run, 'test')
        log(f"test accuracy: {acc:.4f}")
        return acc

    # every epoch is evaluated once, as the authors did: on the validation split, or on the test split where the
    # dataset has none (imdb, imagenet-1k, cifar10, cifar100; recorded as "eval_split": "test"; nothing is selected
    # on it: the final head is the last epoch's)
    eval_split = 'valid' if 'valid' in run.eval_loaders else 'test'
    for epoch in range(len(run.history), args.n_epochs):
        record = train_one_epoch(run, epoch)
        record['eval_split'] = eval_split
        record[f'{eval_split}_acc'] = validate(run, eval_split)
        log(json.dumps(record))
        save_epoch(run, record)

    final = {**run.metadata, 'n_epochs': args.n_epochs, 'rng_seed': args.rng_seed}
    if eval_split == 'valid':                             # the final head is the last epoch's: evaluated once
        final['valid_accuracy'] = run.history[-1]['valid_acc']
    if args.run_test:
        final['test_accuracy'] = (run.history[-1]['test_acc'] if eval_split == 'test'
                                  and 'test_acc' in run.history[-1] else validate(run, 'test'))
    save_final(run, final)
    if args.run_test:
        log(f"test accuracy: {final['test_accuracy']:.4f}")
    return final.get('test_accuracy')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # OSError: FileNotFoundError, disk errors
        message = str(e).strip()
        if 'Original Traceback' in message:              # re-raised from a DataLoader worker: its last line tells
            message = message.splitlines()[-1].split(': ', 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
