"""
File I/O helpers of the data layer (standard library only; the bottom layer: imports nothing of data/).

    save_atomic(save_fn, path) / write_atomic(path, data): a file appears whole or not at all, durably
    remove_orphans(folder, prefix): temporary files of killed writers
    open_maybe_gz(path), is_gzip(path): read files plain or gzipped alike (by their magic bytes)
    check_labels(labels, n_classes, path): labels read from a file, validated with an error naming the file
"""

import gzip
import os
import shutil
import tempfile

import numpy as np

from ..errors import UsageError


def pid_prefix(prefix):
    """Temporary names carry the writer's pid, so that orphans of killed writers can be recognised."""
    return f"{prefix}{os.getpid()}-"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(folder: str, prefix: str) -> list:
    """Remove entries of folder named <prefix><pid>-* whose writer (pid, on this machine) is dead; those of
    live processes (a concurrent writer) are kept. -> the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split('-', 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder):
    """fsync a folder, so that a rename inside it survives a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp, path):
    """Durably move a finished temporary file into place: fsync it, give it the umask's mode, rename, fsync the folder."""
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_atomic(save_fn, path):
    """save_fn(tmp_path) writes the file beside `path`; the file is fsynced, given the mode the umask
    allows (as open() would), renamed over `path` in one step and the folder fsynced, so `path` is never
    seen half-written, nor empty after a power cut (used for datasets, feature-store indexes, checkpoints
    and heads). Temporary files of killed writers (<name>.tmp-<dead pid>-*) are removed first; if save_fn
    fails (e.g. disk full), its temporary file is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphans(folder, os.path.basename(path) + '.tmp-')
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=pid_prefix(os.path.basename(path) + '.tmp-'))
    os.close(fd)
    try:
        save_fn(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data: bytes):
    """Write bytes to path with save_atomic."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    save_atomic(write, path)


def is_gzip(path):
    with open(path, 'rb') as f:
        return f.read(2) == b'\x1f\x8b'


def open_maybe_gz(path):
    """Open a file for binary reading, transparently gunzipping it (detected by its magic bytes)."""
    return gzip.open(path, 'rb') if is_gzip(path) else open(path, 'rb')


def check_labels(labels, n_classes, path):
    """-> list[int]; ValueError naming the file and index of the first label outside 0..n_classes-1."""
    out = []
    for i, y in enumerate(labels.tolist() if isinstance(labels, np.ndarray) else labels):
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not 0 <= y < n_classes:
            raise UsageError(f"{path}: label {y!r} at index {i} is out of range (expected an integer in "
                             f"0..{n_classes - 1})")
        out.append(int(y))
    return out
