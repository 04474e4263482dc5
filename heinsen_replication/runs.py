"""
A run's folder (output_dir): its lock (one writer at a time), the checks before a run writes into it (overwrite,
resume: the same arguments, the same data), resuming from its checkpoint (restore), and what it writes there,
atomically (data.save_atomic: temp file, fsync, rename): after each epoch its model (epoch<k>/, save_pretrained),
checkpoint.pt and metrics.jsonl (save_epoch), at the end model/ (save_final). A failed write (disk full, ...) is a
UsageError naming its cause, and leaves the previous checkpoint intact.
"""
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import torch

from . import data
from .errors import UsageError, relative_to_cwd
from .pretrained import check_finite, torch_load_safely

RUN_FILES = ('checkpoint.pt', 'model', 'metrics.jsonl')   # what a run writes into output_dir, and epoch<k>/ folders
# What a run records as it goes (reporting.TrainingLog): removed by --overwrite, but alone no run to protect (a run
# stopped before its first checkpoint leaves them; the next start cuts them back to its own first step).
PROGRESS_FILES = ('steps.jsonl', 'trackers')
log = logging.getLogger(__name__)


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
    needed = {'head', 'optimizer', 'scheduler', 'history', 'metadata'}
    if not (isinstance(checkpoint, dict) and needed <= set(checkpoint)):
        raise UsageError(f"--resume: {path} is not a checkpoint written by train.py (no head, optimizer, scheduler, "
                         f"history and metadata); delete it to start over")
    return checkpoint


def check_output_dir(args):
    """Before any data is read or encoded: output_dir must be a writable folder, and must not hold a run
    (or the --pretrained_path head) that this run would overwrite, unless --resume or --overwrite."""
    out = args.output_dir
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
        if 'checkpoint.pt' not in existing:
            raise UsageError(f"--resume: --output_dir {out!r} holds {', '.join(existing)} but no checkpoint.pt to "
                             f"resume from; starting over would overwrite them: pass --overwrite to replace them, "
                             f"or choose a new --output_dir")


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
        raise UsageError(f"could not write checkpoint {path}{detail}: {message}. The previous checkpoint, if any, "
                           f"is intact: run again with --resume to continue from it") from e


@contextlib.contextmanager
def written(path, intact):
    """with written(path, intact): an OSError while writing path -> UsageError naming the path, why (DISK_ERRORS),
    and what is intact and what to do (intact)."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"could not write {path} ({DISK_ERRORS.get(e.errno, e.strerror or e)}). {intact}") from e


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


def save_model(model, folder, backbone, training):
    """model.save_pretrained(folder): config.json (the constructor's arguments, the backbone it trained on and the
    training metadata) and model.safetensors, each written atomically."""
    model.save_pretrained(folder, backbone=backbone and backbone.name, backbone_revision=backbone and backbone.revision,
                          training=training)


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
                         f"{args.backbone}: {e}") from e
    run.scheduler.load_state_dict(checkpoint['scheduler'])
    run.history = checkpoint['history']
    log.info(f"resumed from {path} after epoch {len(run.history)}")


def save_epoch(run, record):
    """After an epoch: its model (epoch<k>/, as the paper keeps every epoch's), the checkpoint, the metrics."""
    run.history.append(record)
    if run.accelerator.is_main_process:
        head = run.accelerator.unwrap_model(run.head)
        epoch_dir = os.path.join(run.args.output_dir, f"epoch{record['epoch']}")
        with written(epoch_dir, "The checkpoint of the epoch before, if any, is intact: run again with --resume to "
                                "continue from it"):
            save_model(head, epoch_dir, run.backbone, {**run.metadata, **record})
        state = {'head': head.state_dict(), 'optimizer': run.optimizer.state_dict(),
                 'scheduler': run.scheduler.state_dict(), 'history': run.history, 'args': vars(run.args),
                 'metadata': run.metadata, 'backbone': run.backbone and run.backbone.name,
                 'backbone_revision': run.backbone and run.backbone.revision,
                 'data_fingerprint': run.data_fingerprint}
        save_checkpoint(state, run.checkpoint_path)
        with written(run.metrics_path, "The checkpoint of this epoch is intact and holds the metrics: run again "
                                       "with --resume"):
            write_metrics(run.metrics_path, run.history)
    run.accelerator.wait_for_everyone()


def save_final(run, final):
    """The final model (output_dir/model/) and the final metrics record."""
    model_dir = os.path.join(run.args.output_dir, 'model')
    if run.accelerator.is_main_process:
        with written(model_dir, "The checkpoint of the last epoch is intact: run again with --resume to write the "
                                "model"):
            save_model(run.accelerator.unwrap_model(run.head), model_dir, run.backbone, final)
            write_metrics(run.metrics_path, run.history + [{'final': final}])
