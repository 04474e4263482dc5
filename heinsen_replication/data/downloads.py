"""
Where every dataset comes from, and verified downloads: nothing unverified is kept.

    download_and_extract(url, dest_dir, checksum=..., members=...)   fetch, verify, unpack atomically
    extract_archive(archive, dest_dir, members=...)                  unpack a zip/tar that cannot write outside dest_dir
    fetch_heinsen2019_weights(dest_dir)                              the 2019 paper's published state dicts
    CHECKSUMS, SST_MEMBER_CHECKSUMS, HEINSEN2019_WEIGHTS             the pinned checksums
    missing(what, path, how), how_to_get(url, dest)                  the FileNotFoundError of a missing dataset

Imports only data.fileio (and torchvision's pinned CIFAR URLs and md5s).
"""

import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile

from torchvision.datasets import CIFAR10 as _TorchvisionCIFAR10, CIFAR100 as _TorchvisionCIFAR100

from ..errors import UsageError
from .fileio import current_umask, fsync_dir, pid_prefix, publish, remove_orphans

# -----------------------------------------------------------------------------
# official sources

SST_URL = 'https://nlp.stanford.edu/sentiment/trainDevTestTrees_PTB.zip'
IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
IMAGENET_URL = 'https://image-net.org/'
CIFAR10_URL = _TorchvisionCIFAR10.url      # https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
CIFAR100_URL = _TorchvisionCIFAR100.url    # https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz
SMALLNORB_URL = 'https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/'   # + <file>.mat.gz
MNIST_URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'     # + <file>.gz

# The online source (data_source='hub', the `datasets` library): the Hugging Face hub datasets that hold the
# same data as the files above. IMDB: the same 25,000 + 25,000 reviews and labels. SST: the 'ptb' config holds
# the same PTB trees, every node labelled, one per line of trees/{train,dev,test}.txt (train / validation /
# test), so all subtrees are there for training. (Hub datasets with sentences only, e.g. SetFit/sst5, or GLUE's
# SST-2, whose phrases and test labels differ, are not the same data and are not offered.)
IMDB_HUB = ('stanfordnlp/imdb', 'plain_text')
SST_HUB = ('stanfordnlp/sst', 'ptb')

SMALLNORB_PREFIX = {
    'train': 'smallnorb-5x46789x9x18x6x2x96x96-training-',
    'test': 'smallnorb-5x01235x9x18x6x2x96x96-testing-',
}
MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

# Pinned checksums ('sha256:<hex>' or 'md5:<hex>') of every file that --download fetches; a download that
# does not match is deleted and refused. Sources: CIFAR's md5s as published on the CIFAR page (taken from
# torchvision.datasets.CIFAR10/CIFAR100.tgz_md5; the md5s of the files inside are torchvision's too, checked
# after unpacking); IMDB's, MNIST's (these exact URLs) and smallNORB's sha256 from the checksum files of
# tensorflow-datasets 4.9.10 (datasets/imdb_reviews/checksums.tsv, url_checksums/mnist.txt,
# datasets/smallnorb/checksums.tsv).
CHECKSUMS = {
    IMDB_URL: 'sha256:c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe',
    CIFAR10_URL: 'md5:' + _TorchvisionCIFAR10.tgz_md5,
    CIFAR100_URL: 'md5:' + _TorchvisionCIFAR100.tgz_md5,
    MNIST_URL + 'train-images-idx3-ubyte.gz': 'sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
    MNIST_URL + 'train-labels-idx1-ubyte.gz': 'sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c',
    MNIST_URL + 't10k-images-idx3-ubyte.gz': 'sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6',
    MNIST_URL + 't10k-labels-idx1-ubyte.gz': 'sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6',
    SMALLNORB_URL + SMALLNORB_PREFIX['train'] + 'dat.mat.gz':
        'sha256:5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873',
    SMALLNORB_URL + SMALLNORB_PREFIX['train'] + 'cat.mat.gz':
        'sha256:2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa',
    SMALLNORB_URL + SMALLNORB_PREFIX['train'] + 'info.mat.gz':
        'sha256:de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32',
    SMALLNORB_URL + SMALLNORB_PREFIX['test'] + 'dat.mat.gz':
        'sha256:cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474',
    SMALLNORB_URL + SMALLNORB_PREFIX['test'] + 'cat.mat.gz':
        'sha256:ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff',
    SMALLNORB_URL + SMALLNORB_PREFIX['test'] + 'info.mat.gz':
        'sha256:16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2',
}
# No published checksum of trainDevTestTrees_PTB.zip was available to us: the sha256 of its three tree
# files (the files that give the published split sizes, 8544 / 1101 / 2210 trees) are pinned instead and
# checked after unpacking, before anything is moved into place.
SST_MEMBER_CHECKSUMS = {
    'trees/train.txt': 'sha256:e2f3f41b0b1e6d4dddc0effe3bfc2d27ed8928079aa9a03d652311614fc5feb7',
    'trees/dev.txt': 'sha256:0e9336aed6e4730e19f58d00a77b3f0297efdb755f7b5e598c98a05e3f97ea40',
    'trees/test.txt': 'sha256:6e54806dee95cf80cd918e7dfb3f6770f6df24bf826f289a4d1f709e1c8f6761',
}

# The pretrained weights published with "An Algorithm for Routing Capsules in All Domains" (2019): legacy
# torch pickles of plain state dicts (load with torch.load(path, map_location='cpu', weights_only=True)).
HEINSEN2019_URL = 'https://raw.githubusercontent.com/glassroom/heinsen_routing/6ea5b3a92ab88e758605643fd0cba01c7fee1434/'
HEINSEN2019_WEIGHTS = {
    'smallNORB_pretrained_model_state_dict.pt': 'sha256:e4dca94f4ee01ae8dcdf1278b409e29dfc0bbf894d897d9f98e16de6d7ae7520',
    'SST2R_pretrained_model_state_dict.pt': 'sha256:9f1a804c449af5d6c04892035b1c070abafd6c207afaae9a15becfface9a9870',
    'SST5R_pretrained_model_state_dict.pt': 'sha256:15f26c32409221a74e85bc904378e301cf84bbbf63de8d35857cfbe75f45f89a',
}

# -----------------------------------------------------------------------------
# downloading: every file is verified against a pinned checksum before it is used


class ChecksumMismatchError(UsageError):
    """A downloaded (or already present) file does not have its pinned checksum."""


def file_checksum(path: str, algorithm: str = 'sha256') -> str:
    """The hex digest of a file (read in 1 MiB blocks)."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str, expected: str, what: str) -> None:
    """expected: 'sha256:<hex>' or 'md5:<hex>'. Raises ChecksumMismatchError naming `what` and both digests."""
    algorithm, _, digest = expected.partition(':')
    if algorithm not in ('sha256', 'md5') or not digest:
        raise ValueError(f"checksum of {what} must be 'sha256:<hex>' or 'md5:<hex>', got {expected!r}")
    actual = file_checksum(path, algorithm)
    if actual != digest.lower():
        raise ChecksumMismatchError(
            f"{what} does not have its pinned {algorithm} {digest} (got {actual}): the file is corrupt, "
            f"truncated or was tampered with; it was not used. Try again, or fetch it by hand from the official source.")


def download_and_extract(url: str, dest_dir: str, checksum: str = None, members: dict = None,
                         by_hand: str = None) -> None:
    """
    Download url into dest_dir, verify it, and unpack it there:
      .zip / .tar / .tar.gz / .tgz -> archive members extracted into dest_dir
      other .gz                    -> gunzipped to dest_dir/<name without .gz>
      anything else                -> saved as dest_dir/<name>
    checksum ('sha256:<hex>' or 'md5:<hex>') is the downloaded file's; members ({path inside the archive:
    checksum}) are checked after unpacking instead or as well. One of them is required: nothing unverified
    is kept (ChecksumMismatchError). Archives are unpacked by extract_archive, which cannot write outside
    its destination by design (no link, device or fifo member is ever created; every path is checked against
    the resolved destination; see there). Writing is atomic: the download and the unpacked files go to
    temporary names beside dest_dir (or inside it, where its parent is not writable or on another disk) and
    are renamed into place at the end, so an interrupted download never leaves a half-written dataset
    behind. Top-level entries that already exist in dest_dir are left untouched. Raises RuntimeError if the
    download fails (e.g. no network), saying what to put where by hand (by_hand), and leaves no empty dest_dir behind.
    """
    if checksum is None and not members:
        raise ValueError(f"download_and_extract({url!r}): pass the pinned checksum (or member checksums); "
                         f"unverified downloads are not kept")
    created = not os.path.isdir(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    work_dir = _work_dir(dest_dir)
    for folder in {os.path.realpath(dest_dir), work_dir}:
        for prefix in ('.download-', '.gunzip-', '.extract-'):
            remove_orphans(folder, prefix)                       # left behind by killed downloads
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    fd, tmp_path = tempfile.mkstemp(dir=work_dir, prefix=pid_prefix('.download-'))
    try:
        try:
            with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, f, length=1 << 20)
        except OSError as e:  # urllib.error.URLError, socket timeouts, connection errors are all OSErrors
            os.remove(tmp_path)
            if created and not os.listdir(dest_dir):
                os.rmdir(dest_dir)                               # a later attempt finds nothing half-made
            raise UsageError(
                f"Could not download {url} ({e}). Is the network available? You can also download it by hand "
                f"and " + (by_hand or (f"unpack it into {os.path.abspath(dest_dir)}." if _is_archive(filename)
                                       else f"put it into {os.path.abspath(dest_dir)}."))) from e
        if checksum is not None:
            verify_checksum(tmp_path, checksum, f"the download of {url}")
        print(f"downloaded {url}" + (" (checksum verified)" if checksum else ""))
        lower = filename.lower()
        if lower.endswith('.zip') or lower.endswith(('.tar', '.tar.gz', '.tgz')):
            extract_archive(tmp_path, dest_dir, members=members, what=url)
        elif lower.endswith('.gz'):
            out_fd, out_tmp = tempfile.mkstemp(dir=work_dir, prefix=pid_prefix('.gunzip-'))
            try:
                with os.fdopen(out_fd, 'wb') as out, gzip.open(tmp_path, 'rb') as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                publish(out_tmp, os.path.join(dest_dir, filename[:-3]))
            finally:
                if os.path.exists(out_tmp):
                    os.remove(out_tmp)
        else:
            publish(tmp_path, os.path.join(dest_dir, filename))
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _work_dir(dest_dir):
    """Where temporary files of dest_dir go: its (resolved) parent, so that a fresh extraction is renamed into
    place as a whole; dest_dir itself where the parent is not writable or is on another file system (a mount
    point), since a rename cannot cross file systems."""
    dest = os.path.realpath(dest_dir)
    parent = os.path.dirname(dest)
    try:
        if parent != dest and os.access(parent, os.W_OK | os.X_OK) and os.stat(parent).st_dev == os.stat(dest).st_dev:
            return parent
    except OSError:
        pass
    return dest


class UnsafeArchiveError(UsageError):
    """An archive member that would be written outside the destination, or is not a plain file or folder."""


def _member_path(name, archive, dest_real, root_real):
    """The path (inside root_real, the fresh extraction folder) that archive member `name` is written to, or
    UnsafeArchiveError: absolute paths, drive letters, '..' components and NUL bytes are refused lexically, and
    the joined path, resolved, must lie inside root_real (it always does once links are refused; checked anyway)."""
    parts = name.replace('\\', '/').split('/')
    if (name.startswith(('/', '\\')) or '\x00' in name or '..' in parts or (len(name) > 1 and name[1] == ':')):
        raise UnsafeArchiveError(f"archive {archive}: member {name!r} would be written outside {dest_real}; "
                                 f"refusing to unpack it")
    relative = [p for p in parts if p not in ('', '.')]
    path = os.path.realpath(os.path.join(root_real, *relative))
    if os.path.commonpath([path, root_real]) != root_real:
        raise UnsafeArchiveError(f"archive {archive}: member {name!r} resolves to {path}, outside {dest_real}; "
                                 f"refusing to unpack it")
    return path


def _tar_members(archive_path, what):
    """-> [(name, is_dir, open_fn)] of a tar archive; UnsafeArchiveError for any link, device, fifo or other
    special member (the official archives hold only files and folders)."""
    with tarfile.open(archive_path) as t:
        infos = t.getmembers()
    out = []
    for m in infos:
        if m.issym() or m.islnk():
            raise UnsafeArchiveError(f"archive {what}: member {m.name!r} is a {'symbolic' if m.issym() else 'hard'} "
                                     f"link (to {m.linkname!r}); links are refused (they could point outside the "
                                     f"destination, and no official archive holds any)")
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"archive {what}: member {m.name!r} is a device, fifo or other special file; "
                                     f"refusing to unpack it")
        out.append((m.name, m.isdir(), m))
    return out


def _zip_members(archive_path, what):
    """-> [(name, is_dir, info)] of a zip archive; UnsafeArchiveError for members whose Unix mode (the high bits
    of external_attr) says link, device, fifo or socket."""
    with zipfile.ZipFile(archive_path) as z:
        infos = z.infolist()
    out = []
    for info in infos:
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(f"archive {what}: member {info.filename!r} is a symbolic link; links are "
                                     f"refused (they could point outside the destination)")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"archive {what}: member {info.filename!r} is a device, fifo or other special "
                                     f"file; refusing to unpack it")
        out.append((info.filename, info.is_dir(), info))
    return out


def extract_archive(archive_path, dest_dir, members=None, what=None):
    """
    Unpack a zip or tar archive (gzip, bz2, xz) into dest_dir; it cannot write outside dest_dir by design:
      1. every member is listed first; a symbolic or hard link, device, fifo or other special member refuses the
         whole archive (UnsafeArchiveError, a ValueError), before anything is written;
      2. every member path is refused if absolute, with a drive letter, a '..' component or a NUL byte, and
         must resolve (realpath) inside a fresh, empty extraction folder;
      3. files are written by this function, not by tarfile/zipfile's extractall (so nothing relies on
         tarfile.data_filter, which Pythons 3.10.0-3.10.11 and 3.11.0-3.11.3 lack): opened with O_EXCL |
         O_NOFOLLOW (a name that appears twice, or any link, fails), modes from the umask (no special bits);
      4. `members` ({relative path: checksum}) are verified in the extraction folder;
      5. the folder is renamed into place as a whole when dest_dir is empty (it is made beside dest_dir), else
         its top-level entries are moved in, leaving entries that already exist untouched.
    Nothing reaches dest_dir unless every step succeeds.
    """
    what = what or archive_path
    dest_real = os.path.realpath(dest_dir)
    os.makedirs(dest_real, exist_ok=True)
    with open(archive_path, 'rb') as f:
        is_zip = f.read(4) in (b'PK\x03\x04', b'PK\x05\x06')   # a zip's first header, or an empty zip's
    try:
        listed = _zip_members(archive_path, what) if is_zip else _tar_members(archive_path, what)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"archive {what} is not a readable {'zip' if is_zip else 'tar'} archive ({e})") from e
    umask = current_umask()
    tmp_dir = os.path.realpath(tempfile.mkdtemp(dir=_work_dir(dest_real), prefix=pid_prefix('.extract-')))
    try:
        targets = [(_member_path(name, what, dest_real, tmp_dir), is_dir, ref) for name, is_dir, ref in listed]
        opener = zipfile.ZipFile(archive_path) if is_zip else tarfile.open(archive_path)
        with opener as archive:
            for path, is_dir, ref in targets:
                if path == tmp_dir:
                    continue                                     # './', the archive's root folder
                if is_dir:
                    _makedirs_inside(path, tmp_dir, what)
                    continue
                _makedirs_inside(os.path.dirname(path), tmp_dir, what)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666 & ~umask)
                except FileExistsError:
                    raise UnsafeArchiveError(f"archive {what}: member {os.path.relpath(path, tmp_dir)!r} appears "
                                             f"twice (or as a file and a folder); refusing to unpack it") from None
                with os.fdopen(fd, 'wb') as out, (archive.open(ref) if is_zip else archive.extractfile(ref)) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
        for member, checksum in (members or {}).items():
            path = os.path.join(tmp_dir, member)
            if not os.path.isfile(path):
                raise ChecksumMismatchError(f"{what} does not hold {member}: not the expected archive; it was not used")
            verify_checksum(path, checksum, f"{member} of {what}")
        os.chmod(tmp_dir, 0o777 & ~umask)
        try:
            os.rename(tmp_dir, dest_real)                        # dest_real empty (and on this file system)
            fsync_dir(os.path.dirname(dest_real))
            return
        except OSError:
            pass                                                 # not empty, or tmp_dir inside it: entry by entry
        for entry in sorted(os.listdir(tmp_dir)):
            target = os.path.join(dest_real, entry)
            if os.path.lexists(target):
                print(f"{target} already exists; leaving it as it is")
                continue
            os.rename(os.path.join(tmp_dir, entry), target)
        fsync_dir(dest_real)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _makedirs_inside(path, root, what):
    """os.makedirs(path) for a path checked to lie inside root (no links exist below root: none are created)."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UnsafeArchiveError(f"archive {what}: {os.path.relpath(path, root)!r} is both a file and a folder in "
                                 f"the archive; refusing to unpack it") from None


def _is_archive(filename):
    return filename.lower().endswith(('.zip', '.tar', '.tar.gz', '.tgz', '.gz'))


def fetch_heinsen2019_weights(dest_dir: str = '.data/heinsen2019', base_url: str = HEINSEN2019_URL,
                              download: bool = True) -> dict:
    """
    The three state dicts published with the 2019 paper -> {file name: path}. Files already in dest_dir
    are verified; missing ones are downloaded from base_url + <file name> (download=True; else
    FileNotFoundError) and verified before they are kept. A sha256 mismatch raises ChecksumMismatchError
    and never leaves the file in dest_dir (a bad file already there is left as it is, for inspection).
    """
    paths, base_url = {}, base_url.rstrip('/') + '/'
    absent = [name for name in HEINSEN2019_WEIGHTS if not os.path.isfile(os.path.join(dest_dir, name))]
    for name, checksum in HEINSEN2019_WEIGHTS.items():
        path = os.path.join(dest_dir, name)
        if not os.path.isfile(path):
            if not download:
                raise missing('the 2019 pretrained weights', path,
                              f"Missing: {', '.join(absent)}. Download {' and '.join(base_url + n for n in absent)} "
                              f"into {os.path.abspath(dest_dir)}, or pass --download "
                              f"(python -m heinsen_replication.data heinsen2019 --download).")
            try:
                download_and_extract(base_url + name, dest_dir, checksum=checksum)
            except ChecksumMismatchError:
                raise
            except UsageError as e:                      # no network: name every file still missing, to download
                raise UsageError(
                    f"Could not download {base_url + name} ({e.__cause__ or e}). Download the missing files "
                    f"{', '.join(absent)} by hand ({', '.join(base_url + n for n in absent)}) into "
                    f"{os.path.abspath(dest_dir)}; they are used as they are (nothing to unpack).") from e
        else:
            try:
                verify_checksum(path, checksum, path)
            except ChecksumMismatchError as e:
                raise ChecksumMismatchError(f"{e} Delete {path} to download it again.") from None
        paths[name] = path
    return paths

# -----------------------------------------------------------------------------
# missing data: errors that say where the data was expected and how to get it


def missing(what, path, how):
    """The UsageError raised for a dataset that is not on disk."""
    return UsageError(f"{what} not found: expected {os.path.abspath(path)}. {how}")


def how_to_get(url, dest):
    return (f"Get it from {url} and unpack it into {os.path.abspath(dest)}, "
            f"or pass --download (download=True) to fetch it automatically.")


def _find_maybe_gz(path):
    """Return path if it exists, else path + '.gz' if that exists, else None."""
    for p in (path, path + '.gz'):
        if os.path.isfile(p):
            return p
    return None


def find_or_download(root, name, url_base, download, what, how):
    """root/name (or root/name.gz); with download, first fetched from url_base + name + '.gz' (verified against
    CHECKSUMS, gunzipped to root/name). Missing -> FileNotFoundError naming the path and how to get it."""
    path = _find_maybe_gz(os.path.join(root, name))
    if path is None and download:
        download_and_extract(url_base + name + '.gz', root, checksum=CHECKSUMS[url_base + name + '.gz'])
        path = _find_maybe_gz(os.path.join(root, name))
    if path is None:
        raise missing(what, os.path.join(root, name), how)
    return path
