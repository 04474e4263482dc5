"""
A run's folder (output_dir): its lock (one writer at a time), the checks before a run writes into it (overwrite,
resume: the same arguments, the same data), resuming from its checkpoint (restore), and what it writes there,
atomically (data.save_atomic: temp file, fsync, rename): after each epoch its model (epoch<k>/, save_pretrained),
checkpoint.pt and metrics.jsonl (save_epoch), at the end model/ (save_final). A failed write (disk full, ...) is a
UsageError naming its cause, and leaves the previous checkpoint intact.
"""
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import torch
from safetensors import SafetensorError

from . import data
from .errors import UsageError, relative_to_cwd
from .pretrained import check_finite, torch_load_safely

RUN_FILES = ('checkpoint.pt', 'model', 'metrics.jsonl')   # what a run writes into output_dir, and epoch<k>/ folders
EPOCH_NAME = r'epoch[1-9]\d*'                              # as train.py names them: epoch1, epoch2, ... (not epoch007)
# What a run records as it goes (reporting.TrainingLog): removed by --overwrite, but alone no run to protect (a run
# stopped before its first checkpoint leaves them; the next start cuts them back to its own first step).
PROGRESS_FILES = ('steps.jsonl', 'trackers')
log = logging.getLogger(__name__)


def run_files(out):
    """The names of the files and folders of a run that output_dir holds."""
    epochs = sorted((n for n in os.listdir(out) if re.fullmatch(EPOCH_NAME, n)), key=lambda n: int(n[5:])) \
        if os.path.isdir(out) else []
    return [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))] + epochs
# The arguments that define what a run trains: --resume refuses a checkpoint written with others.
# --feature_cache is compared as on or off (the float16 cache's features, or the backbone's float32 ones); its
# folder may move, since the cache's key guarantees the same features. The data themselves are compared by their
# fingerprint (data.split_fingerprint), not by --data_root, which may move too.
RESUME_ARGS = ('model', 'dataset_name', 'backbone', 'revision', 'max_length', 'image_size', 'pretrained_path',
               'lr', 'batch_sz', 'mixup_alpha', 'finetune', 'rng_seed', 'n_epochs', 'n_iters_per_train_epoch',
               'mixed_precision', 'matmul_precision', 'feature_cache', 'n_hid', 'n_routings', 'd_hid',
               'pretrained_subset')


def load_checkpoint(path):
    """A train.py checkpoint, loaded with weights_only=True (torch_load_safely): a crafted file cannot run
    code (train.py stores its arguments and metrics as plain types)."""
    return torch_load_safely(path)


def resumed_checkpoint(path):
    """--resume: the checkpoint at path, checked to be train.py's (head, optimizer, scheduler, history and metadata),
    or None where there is none yet."""
    if not os.path.exists(path):
        return None
    checkpoint = load_checkpoint(path)
    check_checkpoint(checkpoint, path)
    return checkpoint


def check_output_dir(args):
    """Before any data is read or encoded: output_dir must be a writable folder, and must not hold a run
    (or the --pretrained_path head) that this run would overwrite, unless --resume or --overwrite."""
    out = args.output_dir
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"--output_dir {out!r} is a link to {os.path.realpath(out)}, which does not exist: create "
                         f"that folder, or choose another --output_dir")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {out!r}{relative_to_cwd(out)} is a file, not a folder: choose another "
                         f"--output_dir")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--output_dir {out!r}{relative_to_cwd(out)} is not writable ({e.strerror or e}): choose "
                         f"another --output_dir")
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
    lock_path = os.path.join(out, '.lock')
    if os.path.lexists(lock_path) and not os.path.isfile(lock_path):
        raise UsageError(f"--output_dir {out!r}: its lock file {lock_path} is not a file (a folder or a link train.py "
                         f"did not make): remove it, or choose another --output_dir")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"--output_dir {out!r} is in use: another train.py run holds {os.path.join(out, '.lock')} "
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
        raise UsageError(f"--pretrained_path {args.pretrained_path!r} is in --output_dir {out!r}, where this run "
                         f"would overwrite it with its own {os.path.basename(pretrained)}: "
                         f"choose a new --output_dir (or pass --overwrite to replace it)")
    if existing and not args.overwrite:
        if not args.resume:
            raise UsageError(f"--output_dir {out!r} holds a run ({', '.join(existing)}): pass --resume to continue it, "
                             f"--overwrite to replace it, or choose a new --output_dir")
        if 'checkpoint.pt' not in existing and any(not re.fullmatch(EPOCH_NAME, n) for n in existing):
            raise UsageError(f"--resume: --output_dir {out!r} holds {', '.join(existing)} but no checkpoint.pt to "
                             f"resume from; starting over would overwrite them: pass --overwrite to replace them, "
                             f"or choose a new --output_dir")
        # epoch<k>/ folders without a checkpoint are those of a first epoch that never completed (a write failed,
        # or the run was killed before its checkpoint): --resume starts over and writes them again
        for name in existing:
            if name not in ('checkpoint.pt', 'metrics.jsonl'):
                check_inside(out, name)


def check_resume_args(checkpoint, args, path, defaults):
    """Refuse to resume a checkpoint written with other training-defining arguments (RESUME_ARGS), naming them.
    defaults: {name: train.py's default}, for arguments newer than the checkpoint."""
    saved = checkpoint.get('args')
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} records no arguments, so it cannot be checked against this run's; "
                         f"delete it to start over, or use a new --output_dir")
    current = vars(args)

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
        raise UsageError(f"--resume: {path} was trained with {details}: resume with the same arguments, or start "
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
        raise UsageError(f"--resume: {path} was trained on other data: the {', '.join(differ)} split"
                         f"{'s differ' if len(differ) > 1 else ' differs'} from the one it recorded"
                         f"{' (' + moved + ')' if moved else ''}: resume on the same data, or start a new run in "
                         f"another --output_dir")


# What of a backbone's fingerprint (data.backbone_fingerprint) a run records and checks: what it computes with
PROVENANCE = {'weights': 'weights', 'config': 'config', 'tokenizer': 'tokenizer (vocabulary and rules)',
              'tokenizer_settings': 'tokenizer settings (padding and truncation side, special tokens, init arguments)'}


def backbone_provenance(backbone):
    """What identifies the backbone a run really used: sha256 of its weights (every tensor of its state dict, as
    loaded), its config, its tokenizer and the tokenizer's settings (data.backbone_fingerprint, computed once per
    backbone: one pass over the weights in memory, about 0.4 s for minilm's 90 MB on this repository's CPU, a few
    seconds for roberta-large's 1.4 GB; shared with the feature cache's key). None without a backbone."""
    if backbone is None:
        return None
    fingerprint = data.backbone_fingerprint(backbone)
    return {k: fingerprint[k] for k in PROVENANCE}


def check_provenance(recorded, backbone, what):
    """The backbone fingerprint a checkpoint or head recorded (backbone_provenance) against the backbone this run
    loaded: UsageError naming what changed (weights, config, tokenizer, its settings). A file written before
    fingerprints were recorded (the published heads, the authors' files) is said, not refused."""
    if backbone is None:
        return
    if not isinstance(recorded, dict):
        print(f"{what} records no fingerprint of its backbone (written before they were recorded): it cannot be "
              f"checked that --backbone {backbone.name} is the one it was trained on", file=sys.stderr)
        return
    now = backbone_provenance(backbone)
    changed = [PROVENANCE[k] for k in PROVENANCE if k in recorded and recorded[k] != now[k]]
    if changed:
        raise UsageError(f"{what} was trained on a backbone {backbone.name!r} whose {', '.join(changed)} differ from "
                         f"those of --backbone {backbone.name!r} now: the same name, another model; use the backbone "
                         f"it was trained on, or start a new run in another --output_dir")


CHECKPOINT_TYPES = {'head': dict, 'optimizer': dict, 'scheduler': dict, 'history': list, 'metadata': dict,
                    'args': dict}


def check_checkpoint(checkpoint, path):
    """A checkpoint.pt must be the dict train.py writes: its parts of the types train.py gives them (history a list
    of epoch records, the scheduler's total_steps an int, ...); UsageError naming the part otherwise."""
    def bad(why):
        return UsageError(f"--resume: {path} is not a checkpoint written by train.py ({why}); delete it to start "
                          f"over, or use a new --output_dir")
    if not isinstance(checkpoint, dict):
        raise bad(f"it holds a {type(checkpoint).__name__}, not a dict")
    for key, kind in CHECKPOINT_TYPES.items():
        if not isinstance(checkpoint.get(key), kind):
            raise bad(f"its {key!r} is {type(checkpoint.get(key)).__name__ if key in checkpoint else 'missing'}, "
                      f"not a {kind.__name__}")
    if not all(isinstance(r, dict) and type(r.get('epoch')) is int for r in checkpoint['history']):
        raise bad("its 'history' holds other things than epoch records {'epoch': int, ...}")
    if [r['epoch'] for r in checkpoint['history']] != list(range(1, len(checkpoint['history']) + 1)):
        raise bad("its 'history' does not number the epochs 1, 2, ...")
    if type(checkpoint['scheduler'].get('total_steps')) is not int:
        raise bad("its scheduler records no int total_steps")
    if not all(torch.is_tensor(v) for v in checkpoint['head'].values()):
        raise bad("its 'head' holds other things than tensors")


def data_fingerprint(splits):
    """{split: data.split_fingerprint} of the splits a run trains and evaluates on."""
    return {k: data.split_fingerprint(splits[k]) for k in ('train', 'valid', 'test') if splits.get(k) is not None}


DISK_ERRORS = {errno.ENOSPC: 'disk full: free some space', errno.EDQUOT: 'disk quota exceeded: free some space',
               errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied', errno.EPERM: 'not permitted'}
# How libraries that raise no OSError (safetensors' SafetensorError, Rust's io::Error text; torch's RuntimeError)
# name these causes in their messages
_DISK_ERROR_TEXTS = {errno.ENOSPC: ('No space left', 'os error 28', 'code: 28', 'StorageFull'),
                     errno.EDQUOT: ('quota exceeded', 'os error 122', 'code: 122', 'FilesystemQuotaExceeded'),
                     errno.EROFS: ('Read-only file system', 'os error 30', 'code: 30', 'ReadOnlyFilesystem'),
                     errno.EACCES: ('Permission denied', 'os error 13', 'code: 13', 'PermissionDenied')}
# What a failed write may raise, whichever library writes: OSError (ours, json), RuntimeError (torch.save:
# '[enforce fail at inline_container.cc] unexpected pos'), SafetensorError (safetensors' own type)
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


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


class written:
    """Any failure of the write of `path` inside the block, whichever library raises it (WRITE_ERRORS), becomes one
    line (UsageError): what could not be written, the cause (disk full, quota, read-only, permission: from the
    errno, the library's message or the free space left), how much room the write needs and how much is free, and
    `then`: what is intact and how to go on (run again with --resume). Our bugs (other exceptions) pass through."""

    def __init__(self, path, then, needed_bytes=0, what=''):
        self.path, self.then, self.needed, self.what = path, then, needed_bytes, what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, WRITE_ERRORS):
            return False
        folder = os.path.abspath(self.path if os.path.isdir(self.path) else os.path.dirname(self.path) or '.')
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        text = str(e).strip()
        code = e.errno if isinstance(e, OSError) and e.errno in DISK_ERRORS else next(
            (c for c, texts in _DISK_ERROR_TEXTS.items() if any(t in text for t in texts)), None)
        if code is None and not isinstance(e, OSError) and disk_full(folder, self.needed):
            code = errno.ENOSPC
        message = f"could not write {self.what}{self.path}"
        if code is not None:
            message += f" ({DISK_ERRORS[code]})"
        if code is None or not isinstance(e, OSError):
            message += f": {text.splitlines()[0] if text else type(e).__name__}"
        message += f". {self.then}"
        if code in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                free = None
            message += (f" (free at least {max(self.needed, 1 << 20) / 2**20:.0f} MiB in {folder}"
                        + (f"; {free / 2**20:.0f} MiB are free now)" if free is not None else ')'))
        raise UsageError(message) from e


def save_checkpoint(state, path):
    """The checkpoint, atomically; a failed write (disk full, ...) leaves the previous checkpoint intact."""
    with written(path, "The previous checkpoint, if any, is intact: run again with --resume to continue from it",
                      state_bytes(state), what='checkpoint '):
        data.save_atomic(lambda tmp: torch.save(state, tmp), path)


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


def reproduce_command(argv):
    """The command that trains a run again: `python train.py` and its arguments, less those about the run folder's
    state (--resume, --overwrite)."""
    import shlex
    return shlex.join(['python', 'train.py', *(a for a in argv if a not in ('--resume', '--overwrite'))])


def save_model(model, folder, backbone, training, then):
    """model.save_pretrained(folder): config.json (the constructor's arguments, the backbone it trained on and its
    fingerprint, the training metadata) and model.safetensors, each written atomically. A folder that is a link
    leaving the run's folder is never written through (check_inside); a failed write is one line (written)
    ending with `then`."""
    check_inside(os.path.dirname(os.path.abspath(folder)), os.path.basename(folder))
    with written(folder, then, state_bytes(model.state_dict())):
        model.save_pretrained(folder, backbone=backbone and backbone.name,
                              backbone_revision=backbone and backbone.revision,
                              backbone_fingerprint=backbone and backbone_provenance(backbone), training=training)


def check_inside(out, name):
    """output_dir/name (model/, epoch<k>/) must not be a link that leaves output_dir: writing through it would
    change another run's files (UsageError, saying which link to remove)."""
    path = os.path.join(out, name)
    real = os.path.realpath(path)
    if os.path.islink(path) or os.path.commonpath([real, os.path.realpath(out)]) != os.path.realpath(out):
        raise UsageError(f"{path} is a link to {real}, outside the run's folder {out}: this run never writes "
                         f"through it (it would change another run's files); remove the link (rm {path}) and run "
                         f"again")


def remove_run_files(out):
    """--overwrite's work in output_dir `out` (train.remove_old_run): the old run's entries moved aside together,
    then deleted (see there)."""
    data.remove_orphans(out, '.overwritten-')             # of --overwrite runs killed while deleting
    names = run_files(out) + [f for f in PROGRESS_FILES if os.path.lexists(os.path.join(out, f))]
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
        raise UsageError(f"--overwrite: cannot remove {failed} ({e.strerror or e}); nothing of the old run was "
                           f"removed") from e
    try:
        shutil.rmtree(aside)                              # links inside are unlinked, never followed
    except OSError as e:
        print(f"--overwrite: the old run was moved aside into {aside} but could not all be deleted "
              f"({e.strerror or e}): delete it by hand", file=sys.stderr)


def remove_old_run(accelerator, out):
    """--overwrite: the run in output_dir `out` replaced, none of its files stays beside ours (remove_run_files, by
    the main process while the others wait)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_run_files(out)
    accelerator.wait_for_everyone()


def restore(run, checkpoint, defaults):
    """--resume: run's head, optimizer, schedule and metrics history from its checkpoint, once the checkpoint is
    checked against the run: its arguments (check_resume_args; defaults: train.py's), its data, finite values and
    the schedule's length."""
    args, path = run.args, run.checkpoint_path
    check_resume_args(checkpoint, args, path, defaults)
    check_resume_data(checkpoint, args, run.splits, path)
    check_provenance(checkpoint.get('backbone_fingerprint'), run.backbone, f"--resume: {path}")
    check_finite(checkpoint['head'], f"--resume: {path}")
    if checkpoint['scheduler']['total_steps'] != run.scheduler.total_steps:
        raise UsageError(f"--resume: {path} belongs to a run of {checkpoint['scheduler']['total_steps']} "
                         f"steps in all, this one has {run.scheduler.total_steps}: resume with the same --n_epochs "
                         f"and --n_iters_per_train_epoch (the one-cycle schedule spans the whole run)")
    try:
        run.accelerator.unwrap_model(run.head).load_state_dict(checkpoint['head'])
        run.optimizer.load_state_dict(checkpoint['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"--resume: {path} does not fit this run's {args.model} for {args.dataset_name} on "
                         f"{args.backbone}: {' '.join(str(e).split())}") from e
    run.scheduler.load_state_dict(checkpoint['scheduler'])
    run.history = checkpoint['history']
    log.info(f"resumed from {path} after epoch {len(run.history)}")


def save_epoch(run, record):
    """After an epoch: its model (epoch<k>/, as the paper keeps every epoch's), the checkpoint, the metrics."""
    run.history.append(record)
    if run.accelerator.is_main_process:
        head = run.accelerator.unwrap_model(run.head)
        epoch_dir = os.path.join(run.args.output_dir, f"epoch{record['epoch']}")
        save_model(head, epoch_dir, run.backbone, {**run.metadata, **record},
                   then="The checkpoint of the epoch before, if any, is intact: run again with --resume to continue "
                        "from it")
        state = {'head': head.state_dict(), 'optimizer': run.optimizer.state_dict(),
                 'scheduler': run.scheduler.state_dict(), 'history': run.history, 'args': vars(run.args),
                 'metadata': run.metadata, 'backbone': run.backbone and run.backbone.name,
                 'backbone_revision': run.backbone and run.backbone.revision,
                 'backbone_fingerprint': backbone_provenance(run.backbone), 'data_fingerprint': run.data_fingerprint}
        save_checkpoint(state, run.checkpoint_path)
        with written(run.metrics_path, "The checkpoint of this epoch is intact and holds the metrics: run again "
                                       "with --resume"):
            write_metrics(run.metrics_path, run.history)
    run.accelerator.wait_for_everyone()


def save_final(run, final):
    """The final model (output_dir/model/) and the final metrics record."""
    model_dir = os.path.join(run.args.output_dir, 'model')
    if run.accelerator.is_main_process:
        then = "The checkpoint of the last epoch is intact: run again with --resume to write the model"
        save_model(run.accelerator.unwrap_model(run.head), model_dir, run.backbone, final, then=then)
        with written(run.metrics_path, then):
            write_metrics(run.metrics_path, run.history + [{'final': final}])
