"""
Where every dataset comes from, and verified downloads: nothing unverified is kept.

    download_and_extract(url, dest_dir, checksum=..., members=...)   fetch, verify, unpack atomically
    fetch_heinsen2019_weights(dest_dir)                              the 2019 paper's published state dicts
    CHECKSUMS, SST_MEMBER_CHECKSUMS, HEINSEN2019_WEIGHTS             the pinned checksums
    missing(what, path, how), how_to_get(url, dest)                  the FileNotFoundError of a missing dataset

Imports only data.fileio (and torchvision's pinned CIFAR URLs and md5s).
"""

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile

from torchvision.datasets import CIFAR10 as _TorchvisionCIFAR10, CIFAR100 as _TorchvisionCIFAR100

from .fileio import fsync_dir, pid_prefix, publish, remove_orphans

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


class ChecksumMismatchError(RuntimeError):
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
    is kept (ChecksumMismatchError). Archive members that would land outside dest_dir (absolute paths,
    '..', links pointing out, devices) are refused on every Python, with or without tarfile.data_filter.
    Writing is atomic: everything goes to a temporary name inside dest_dir first and is renamed at
    the end, so an interrupted download never leaves a half-written dataset behind. Top-level
    entries that already exist in dest_dir are left untouched. Raises RuntimeError if the download
    fails (e.g. no network), saying what to put where by hand (by_hand), and leaves no empty dest_dir behind.
    """
    if checksum is None and not members:
        raise ValueError(f"download_and_extract({url!r}): pass the pinned checksum (or member checksums); "
                         f"unverified downloads are not kept")
    created = not os.path.isdir(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    for prefix in ('.download-', '.gunzip-', '.extract-'):
        remove_orphans(dest_dir, prefix)                         # left behind by killed downloads
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    fd, tmp_path = tempfile.mkstemp(dir=dest_dir, prefix=pid_prefix('.download-'))
    try:
        try:
            with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, f, length=1 << 20)
        except OSError as e:  # urllib.error.URLError, socket timeouts, connection errors are all OSErrors
            os.remove(tmp_path)
            if created and not os.listdir(dest_dir):
                os.rmdir(dest_dir)                               # a later attempt finds nothing half-made
            raise RuntimeError(
                f"Could not download {url} ({e}). Is the network available? You can also download it by hand "
                f"and " + (by_hand or (f"unpack it into {os.path.abspath(dest_dir)}." if _is_archive(filename)
                                       else f"put it into {os.path.abspath(dest_dir)}."))) from e
        if checksum is not None:
            verify_checksum(tmp_path, checksum, f"the download of {url}")
        print(f"downloaded {url}" + (" (checksum verified)" if checksum else ""))
        lower = filename.lower()
        if lower.endswith('.zip') or lower.endswith(('.tar', '.tar.gz', '.tgz')):
            _extract_archive(tmp_path, dest_dir, is_zip=lower.endswith('.zip'), members=members, url=url)
        elif lower.endswith('.gz'):
            out_fd, out_tmp = tempfile.mkstemp(dir=dest_dir, prefix=pid_prefix('.gunzip-'))
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


def _check_tar_members(t, archive, dest):
    """Refuse tar members that would be written outside dest (checked here: tarfile.data_filter is missing
    from Python 3.10.0-3.10.11 and 3.11.0-3.11.3) and anything that is not a file, folder or inner link."""
    for m in t.getmembers():
        name = m.name.replace('\\', '/')
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == '..' or norm.startswith('../') or (len(name) > 1 and name[1] == ':'):
            raise ValueError(f"archive {archive}: member {m.name!r} would be written outside {dest}; refusing to unpack it")
        if m.issym() or m.islnk():
            link = m.linkname.replace('\\', '/')
            target = os.path.normpath(os.path.join(os.path.dirname(norm), link) if m.issym() else link)
            if os.path.isabs(link) or target == '..' or target.startswith('../'):
                raise ValueError(f"archive {archive}: link {m.name!r} -> {m.linkname!r} points outside {dest}; "
                                 f"refusing to unpack it")
        elif not (m.isfile() or m.isdir()):
            raise ValueError(f"archive {archive}: member {m.name!r} is a device or fifo; refusing to unpack it")


def _extract_archive(archive_path, dest_dir, is_zip, members=None, url=None):
    """Extract a zip/tar archive into a temporary folder in dest_dir, verify `members` ({relative path:
    checksum}), then move its entries into place."""
    what = url or archive_path
    tmp_dir = tempfile.mkdtemp(dir=dest_dir, prefix=pid_prefix('.extract-'))
    try:
        if is_zip:
            with zipfile.ZipFile(archive_path) as z:
                z.extractall(tmp_dir)  # zipfile refuses absolute paths and '..' components
        else:
            with tarfile.open(archive_path) as t:
                _check_tar_members(t, what, dest_dir)
                if hasattr(tarfile, 'data_filter'):  # Python >= 3.10.12 / 3.11.4: also refuses special bits
                    t.extractall(tmp_dir, filter='data')
                else:
                    t.extractall(tmp_dir)
        for member, checksum in (members or {}).items():
            path = os.path.join(tmp_dir, member)
            if not os.path.isfile(path):
                raise ChecksumMismatchError(f"{what} does not hold {member}: not the expected archive; it was not used")
            verify_checksum(path, checksum, f"{member} of {what}")
        for entry in sorted(os.listdir(tmp_dir)):
            target = os.path.join(dest_dir, entry)
            if os.path.exists(target):
                print(f"{target} already exists; leaving it as it is")
                continue
            os.replace(os.path.join(tmp_dir, entry), target)
        fsync_dir(dest_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


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
                              f"(python -m data heinsen2019 --download).")
            try:
                download_and_extract(base_url + name, dest_dir, checksum=checksum)
            except ChecksumMismatchError:
                raise
            except RuntimeError as e:                    # no network: name every file still missing, to download
                raise RuntimeError(
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
    """The FileNotFoundError raised for a dataset that is not on disk."""
    return FileNotFoundError(f"{what} not found: expected {os.path.abspath(path)}. {how}")


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
