"""
Datasets for the routing experiments, in one readable file.

    splits = get_dataset_splits('sst5', data_root='.data', download=False, image_size=224)
    splits['train'][0]   # -> ('The Rock is destined to be the 21st Century\'s new "Conan" and ...', 3)
    splits['valid']      # -> a Dataset, or None where the dataset has no official validation split
    splits['n_classes'], splits['modality']   # -> 5, 'text'

Every split is a map-style torch Dataset (__len__, __getitem__). Items are:
    text   : (text: str, label: int); the dataset also exposes .texts (list[str]), .labels (list[int])
    image  : (image float tensor [C, H, W], label: int)
    stereo : (stereo float tensor [2, 96, 96] in [0, 1], label: int); index 0 = left camera

Known datasets, their folder under data_root, and where they come from:

    name         folder under data_root                                    valid split?  official source
    sst5, sst2   sst/{train,dev,test}.txt  (PTB trees)                     dev           https://nlp.stanford.edu/sentiment/trainDevTestTrees_PTB.zip
    imdb         aclImdb/{train,test}/{pos,neg}/*.txt                      None          https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz
    imagenet-1k  imagenet/{train,val}/<wnid>/*.JPEG                        None (*)      https://image-net.org/ (license; no automatic download)
    cifar10      cifar-10-batches-py/{data_batch_1..5,test_batch}          None          https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    cifar100     cifar-100-python/{train,test}                             None          https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz
    smallnorb    smallnorb/smallnorb-5x*-{training,testing}-{dat,cat,info}.mat  None     https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/
    mnist        mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]   None          https://storage.googleapis.com/cvdf-datasets/mnist/
    digits       (none: bundled with scikit-learn)                         None          sklearn.datasets.load_digits

(*) ImageNet's official 'val' set is used as the 'test' split, as is customary; 'valid' is None.
'valid' is None for imdb, cifar10, cifar100, imagenet-1k, smallnorb, mnist and digits: none of them
has an official validation split, and we do not carve one out here (callers may split 'train').

With download=True, missing data is fetched from the official URL (all but imagenet-1k and digits) and
verified against pinned checksums (CHECKSUMS) before it is unpacked: a mismatch is deleted and refused.
The published 2019 weights: fetch_heinsen2019_weights() (also `python data.py heinsen2019 --download`).
"""

import functools
import gzip as _gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

DATASETS = ('sst5', 'sst2', 'imdb', 'imagenet-1k', 'cifar10', 'cifar100', 'smallnorb', 'mnist', 'digits')

# -----------------------------------------------------------------------------
# official sources

SST_URL = 'https://nlp.stanford.edu/sentiment/trainDevTestTrees_PTB.zip'
IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
IMAGENET_URL = 'https://image-net.org/'
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR100_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
SMALLNORB_URL = 'https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/'   # + <file>.mat.gz
MNIST_URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'     # + <file>.gz

SMALLNORB_PREFIX = {
    'train': 'smallnorb-5x46789x9x18x6x2x96x96-training-',
    'test': 'smallnorb-5x01235x9x18x6x2x96x96-testing-',
}
MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

# Pinned checksums ('sha256:<hex>' or 'md5:<hex>') of every file that --download fetches; a download that
# does not match is deleted and refused. Sources: CIFAR's md5s as published on the CIFAR page (also
# torchvision.datasets.CIFAR10/CIFAR100.tgz_md5); IMDB's, MNIST's (these exact URLs) and smallNORB's sha256
# from the checksum files of tensorflow-datasets 4.9.10 (datasets/imdb_reviews/checksums.tsv,
# url_checksums/mnist.txt, datasets/smallnorb/checksums.tsv).
CHECKSUMS = {
    IMDB_URL: 'sha256:c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe',
    CIFAR10_URL: 'md5:c58f30108f718f92721af3b95e74349a',
    CIFAR100_URL: 'md5:eb9058c3a382ffc7106e4002c42a8d85',
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


def _pid_prefix(prefix):
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


def download_and_extract(url: str, dest_dir: str, checksum: str = None, members: dict = None) -> None:
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
    fails (e.g. no network).
    """
    if checksum is None and not members:
        raise ValueError(f"download_and_extract({url!r}): pass the pinned checksum (or member checksums); "
                         f"unverified downloads are not kept")
    os.makedirs(dest_dir, exist_ok=True)
    for prefix in ('.download-', '.gunzip-', '.extract-'):
        remove_orphans(dest_dir, prefix)                         # left behind by killed downloads
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    fd, tmp_path = tempfile.mkstemp(dir=dest_dir, prefix=_pid_prefix('.download-'))
    try:
        try:
            with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, f, length=1 << 20)
        except OSError as e:  # urllib.error.URLError, socket timeouts, connection errors are all OSErrors
            raise RuntimeError(
                f"Could not download {url} ({e}). Is the network available? You can also download it "
                f"by hand and unpack it into {os.path.abspath(dest_dir)}.") from e
        if checksum is not None:
            verify_checksum(tmp_path, checksum, f"the download of {url}")
        print(f"downloaded {url}" + (" (checksum verified)" if checksum else ""))
        lower = filename.lower()
        if lower.endswith('.zip') or lower.endswith(('.tar', '.tar.gz', '.tgz')):
            _extract_archive(tmp_path, dest_dir, is_zip=lower.endswith('.zip'), members=members, url=url)
        elif lower.endswith('.gz'):
            out_fd, out_tmp = tempfile.mkstemp(dir=dest_dir, prefix=_pid_prefix('.gunzip-'))
            try:
                with os.fdopen(out_fd, 'wb') as out, _gzip.open(tmp_path, 'rb') as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                _publish(out_tmp, os.path.join(dest_dir, filename[:-3]))
            finally:
                if os.path.exists(out_tmp):
                    os.remove(out_tmp)
        else:
            _publish(tmp_path, os.path.join(dest_dir, filename))
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _publish(tmp, path):
    """Durably move a finished temporary file into place: fsync it, give it the umask's mode, rename, fsync the folder."""
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


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
    tmp_dir = tempfile.mkdtemp(dir=dest_dir, prefix=_pid_prefix('.extract-'))
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
        _fsync_dir(dest_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def fetch_heinsen2019_weights(dest_dir: str = '.data/heinsen2019', base_url: str = HEINSEN2019_URL,
                              download: bool = True) -> dict:
    """
    The three state dicts published with the 2019 paper -> {file name: path}. Files already in dest_dir
    are verified; missing ones are downloaded from base_url + <file name> (download=True; else
    FileNotFoundError) and verified before they are kept. A sha256 mismatch raises ChecksumMismatchError
    and never leaves the file in dest_dir (a bad file already there is left as it is, for inspection).
    """
    paths, base_url = {}, base_url.rstrip('/') + '/'
    for name, checksum in HEINSEN2019_WEIGHTS.items():
        path = os.path.join(dest_dir, name)
        if not os.path.isfile(path):
            if not download:
                raise _missing('the 2019 pretrained weights', path,
                               f"Get {base_url}{name} into {os.path.abspath(dest_dir)}, or pass --download "
                               f"(python data.py heinsen2019 --download).")
            download_and_extract(base_url + name, dest_dir, checksum=checksum)
        else:
            try:
                verify_checksum(path, checksum, path)
            except ChecksumMismatchError as e:
                raise ChecksumMismatchError(f"{e} Delete {path} to download it again.") from None
        paths[name] = path
    return paths


def _missing(what, path, how):
    """The FileNotFoundError raised for a dataset that is not on disk."""
    return FileNotFoundError(f"{what} not found: expected {os.path.abspath(path)}. {how}")


def _how_to_get(url, dest):
    return (f"Get it from {url} and unpack it into {os.path.abspath(dest)}, "
            f"or pass --download (download=True) to fetch it automatically.")


def _find_maybe_gz(path):
    """Return path if it exists, else path + '.gz' if that exists, else None."""
    for p in (path, path + '.gz'):
        if os.path.isfile(p):
            return p
    return None


def _find_or_download(root, name, url_base, download, what, how):
    """root/name (or root/name.gz); with download, first fetched from url_base + name + '.gz'
    (gunzipped to root/name). Missing -> FileNotFoundError naming the path and how to get it."""
    path = _find_maybe_gz(os.path.join(root, name))
    if path is None and download:
        download_and_extract(url_base + name + '.gz', root, checksum=CHECKSUMS[url_base + name + '.gz'])
        path = _find_maybe_gz(os.path.join(root, name))
    if path is None:
        raise _missing(what, os.path.join(root, name), how)
    return path


def _is_gzip(path):
    with open(path, 'rb') as f:
        return f.read(2) == b'\x1f\x8b'


def _open_maybe_gz(path):
    """Open a file for binary reading, transparently gunzipping it (detected by its magic bytes)."""
    return _gzip.open(path, 'rb') if _is_gzip(path) else open(path, 'rb')

# -----------------------------------------------------------------------------
# text datasets


class TextDataset(Dataset):
    """In-memory (text, label) pairs. Exposes .texts (list[str]) and .labels (list[int])."""

    def __init__(self, texts, labels):
        assert len(texts) == len(labels)
        self.texts, self.labels = list(texts), [int(y) for y in labels]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i], self.labels[i]


class TextFilesDataset(Dataset):
    """
    (text, label) pairs read lazily, one text file per example (used for IMDB). Only the paths are
    listed up front; each file is read in __getitem__. Accessing .texts reads (and caches) all files.
    """

    def __init__(self, paths, labels, clean=None):
        assert len(paths) == len(labels)
        self.paths, self.labels = list(paths), [int(y) for y in labels]
        self.clean = clean  # optional str -> str applied to each file's text
        self._texts = None

    def read(self, i):
        with open(self.paths[i], encoding='utf-8') as f:
            text = f.read()
        return self.clean(text) if self.clean is not None else text

    @property
    def texts(self):
        if self._texts is None:
            self._texts = [self.read(i) for i in range(len(self))]
        return self._texts

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return (self._texts[i] if self._texts is not None else self.read(i)), self.labels[i]

# -----------------------------------------------------------------------------
# Stanford Sentiment Treebank (SST-5, SST-2): PTB trees, one per line, a 0..4 label on every node:
#   (3 (2 It) (4 (2 's) (2 .)))
# A tree here is a tuple (label: int, children), where children is a list of trees for an inner
# node and the word (str) for a leaf.

_PTB_TOKEN_RE = re.compile(r'\(|\)|[^ \t\r\n()]+')  # only ASCII whitespace separates: SST has U+00A0 inside words


def parse_ptb_tree(line: str):
    """Parse one PTB tree string into nested (label, children) tuples. Raises ValueError if malformed."""
    stack, root = [], None  # stack of open nodes: [label, children (list), words (list)]
    for tok in _PTB_TOKEN_RE.findall(line):
        if root is not None:
            raise ValueError(f"unexpected text after the end of the tree: {line[:80]!r}")
        if tok == '(':
            stack.append([None, [], []])
        elif tok == ')':
            if not stack:
                raise ValueError(f"unbalanced ')' in tree: {line[:80]!r}")
            label, children, words = stack.pop()
            if label is None or (children and words) or not (children or words):
                raise ValueError(f"malformed node in tree: {line[:80]!r}")
            node = (label, children if children else ' '.join(words))
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        else:  # an atom: the node's label if it has none yet, else a word
            if not stack:
                raise ValueError(f"text outside parentheses in tree: {line[:80]!r}")
            if stack[-1][0] is None:
                try:
                    stack[-1][0] = int(tok)
                except ValueError:
                    raise ValueError(f"non-integer label {tok!r} in tree: {line[:80]!r}") from None
            else:
                stack[-1][2].append(tok)
    if stack or root is None:
        raise ValueError(f"incomplete tree: {line[:80]!r}")
    return root


def iter_subtrees(tree):
    """Yield every subtree (root first, then pre-order, left to right), leaves included."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node[1], list):
            stack.extend(reversed(node[1]))


def tree_leaves(tree):
    """The words of a tree, left to right."""
    return [node[1] for node in iter_subtrees(tree) if isinstance(node[1], str)]


def read_ptb_trees(path: str, n_labels: int = 5):
    """Parse a file of PTB trees, one per line (blank lines ignored). Every node's label must be in
    0..n_labels-1 (SST: 0..4). Errors name the file and line: ValueError for text that is not UTF-8
    (e.g. latin-1) or is binary, malformed trees and labels out of range."""
    trees = []
    try:
        with open(path, encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                if '\x00' in line:
                    raise ValueError(f"{path}, line {line_no}: binary data (NUL bytes), not a text file of PTB trees")
                if not line.strip():
                    continue
                try:
                    tree = parse_ptb_tree(line)
                except ValueError as e:
                    raise ValueError(f"{path}, line {line_no}: {e}") from None
                bad = [node[0] for node in iter_subtrees(tree) if not 0 <= node[0] < n_labels]
                if bad:
                    raise ValueError(f"{path}, line {line_no}: label {bad[0]} is out of range "
                                     f"(sentiment labels are 0..{n_labels - 1}): {line.strip()[:80]!r}")
                trees.append(tree)
    except UnicodeDecodeError:
        line_no, bad = '?', b''
        with open(path, 'rb') as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    raw.decode('utf-8')
                except UnicodeDecodeError as e:
                    bad = raw[e.start:e.start + 1]
                    break
        raise ValueError(f"{path}, line {line_no}: not UTF-8 text (byte {bad!r}; a latin-1 copy, or a binary "
                         f"file?): the SST tree files are UTF-8") from None
    return trees


_PTB_SYMBOLS = {'-LRB-': '(', '-RRB-': ')', '-LSB-': '[', '-RSB-': ']', '-LCB-': '{', '-RCB-': '}',
                '``': '"', "''": '"', '`': "'"}
_OPENING = {'(', '[', '{'}                                # no space after these
_OPENING_QUOTES, _CLOSING_QUOTES = {'``', '`'}, {"''", "'"}  # PTB quote tokens: ` `` open, ' '' close
_ATTACH_LEFT = {"n't", "'s", "'re", "'ve", "'m", "'ll", "'d",  # no space before these (compared lower-case)
                '.', ',', ';', ':', '!', '?', '%', ')', ']', '}'}


def detokenize(tokens: list[str]) -> str:
    """
    Turn PTB tokens back into natural text:
      -LRB- -RRB- (and -LSB- ... -RCB-) -> ( ) [ ] { };  `` and '' -> ";  ` -> ';  \\/ -> /;  \\* -> *
      no space before n't 's 're 've 'm 'll 'd . , ; : ! ? % and closing brackets;
      no space after opening brackets; quotes hug their contents (`` a b '' -> "a b", ` a ' -> 'a',
      and so does a lone possessive ' as in "the Girls ' film" -> "the Girls' film");
      whitespace collapsed to single spaces (SST words may contain U+00A0, e.g. '2\\xa01\\/2' -> '2 1/2').
    E.g. ['It', "'s", 'a', '-LRB-', 'great', '-RRB-', 'film', ',', 'is', "n't", 'it', '?'] -> "It's a (great) film, isn't it?"
    """
    text, glue_next = '', True  # glue_next: the next token attaches to the previous one (no space)
    for raw in tokens:
        tok = _PTB_SYMBOLS.get(raw, raw).replace('\\/', '/').replace('\\*', '*')
        if not tok.strip():
            continue
        if not glue_next and not (tok.lower() in _ATTACH_LEFT or raw in _CLOSING_QUOTES):
            text += ' '
        text += tok
        glue_next = tok in _OPENING or raw in _OPENING_QUOTES
    return ' '.join(text.split())


def _phrases(tree):
    """-> [(label, words)] for every subtree of tree, root first, then pre-order (left to right)."""
    words, spans = [], []  # spans[k] = [label, start, end] of the k-th subtree in pre-order

    def visit(node):
        span = [node[0], len(words), None]
        spans.append(span)
        if isinstance(node[1], str):
            words.append(node[1])
        else:
            for child in node[1]:
                visit(child)
        span[2] = len(words)

    visit(tree)
    return [(label, words[start:end]) for label, start, end in spans]


def sst_examples(trees, all_phrases: bool):
    """
    (texts, labels) with 5-class labels 0..4 from a list of SST trees.
    all_phrases=False: one example per tree, the root sentence (no deduplication: dev/test as published).
    all_phrases=True: every subtree (sentences, phrases, single words), DEDUPLICATED BY TEXT, keeping
    the FIRST occurrence's label. Deterministic order: all roots first in file order, then the
    remaining phrases tree by tree in file order, each tree in pre-order (left to right).
    """
    if not all_phrases:
        return [detokenize(tree_leaves(tree)) for tree in trees], [tree[0] for tree in trees]
    phrases = [_phrases(tree) for tree in trees]
    examples = {}  # text -> label; dicts keep insertion order
    for tree_phrases in phrases:  # the roots first ...
        label, words = tree_phrases[0]
        examples.setdefault(detokenize(words), label)
    for tree_phrases in phrases:  # ... then all other phrases
        for label, words in tree_phrases[1:]:
            examples.setdefault(detokenize(words), label)
    examples.pop('', None)
    return list(examples), list(examples.values())


def sst_to_binary(texts, labels):
    """SST-2 from SST-5 labels: drop neutral (2); 0, 1 -> 0 (negative); 3, 4 -> 1 (positive)."""
    kept = [(t, int(y > 2)) for t, y in zip(texts, labels) if y != 2]
    return [t for t, _ in kept], [y for _, y in kept]


def _sst_dir(data_root, download):
    """Folder holding train.txt, dev.txt, test.txt (the official zip unpacks them into sst/trees/)."""
    root = os.path.join(data_root, 'sst')
    names = ('train.txt', 'dev.txt', 'test.txt')
    candidates = (root, os.path.join(root, 'trees'))
    for d in candidates:
        if all(os.path.isfile(os.path.join(d, f)) for f in names):
            return d
    if download:
        download_and_extract(SST_URL, root, members=SST_MEMBER_CHECKSUMS)
        return _sst_dir(data_root, download=False)
    # name the file that is missing, in the folder that holds the others
    d = max(candidates, key=lambda c: sum(os.path.isfile(os.path.join(c, f)) for f in names))
    missing = [f for f in names if not os.path.isfile(os.path.join(d, f))]
    raise _missing('Stanford Sentiment Treebank', os.path.join(d, missing[0]),
                   f"Expected train.txt, dev.txt, test.txt (PTB trees) in {os.path.abspath(d)}; missing: "
                   f"{', '.join(missing)}. " + _how_to_get(SST_URL, root))


def _sst_file_examples(path, all_phrases):
    """sst_examples() of a tree file, cached per (file, size, mtime): sst5 and sst2 parse it only once."""
    st = os.stat(path)
    return _sst_file_examples_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns, all_phrases)


@functools.lru_cache(maxsize=6)
def _sst_file_examples_cached(path, size, mtime_ns, all_phrases):
    texts, labels = sst_examples(read_ptb_trees(path), all_phrases)
    return tuple(texts), tuple(labels)  # immutable: cached results are shared between calls


def load_sst(data_root, download, binary):
    """
    SST-5 (binary=False) or SST-2 (binary=True).
    train: all deduplicated phrases of the training trees (see sst_examples);
    valid: dev root sentences; test: test root sentences. SST-2 drops neutral examples.
    """
    d = _sst_dir(data_root, download)
    files = {'train': 'train.txt', 'valid': 'dev.txt', 'test': 'test.txt'}
    splits = {split: _sst_file_examples(os.path.join(d, f), all_phrases=(split == 'train'))
              for split, f in files.items()}
    if binary:  # note: dedup happened on the 5-class labels, so SST-2 train is a subset of SST-5 train
        splits = {k: sst_to_binary(*v) for k, v in splits.items()}
    for split, (texts, _) in splits.items():
        if not texts:  # an accuracy over nothing is no result
            why = 'all its examples are neutral (label 2), which SST-2 drops' if binary else 'it holds no trees'
            raise ValueError(f"{os.path.join(d, files[split])}: the {'sst2' if binary else 'sst5'} {split} split "
                             f"is empty ({why})")
    return {k: TextDataset(*v) for k, v in splits.items()}

# -----------------------------------------------------------------------------
# IMDB (Maas et al., 2011): aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt


def _clean_imdb(text):
    """Replace the '<br />' tags in IMDB reviews with spaces and collapse whitespace."""
    return ' '.join(re.sub(r'<br\s*/?>', ' ', text, flags=re.IGNORECASE).split())


def load_imdb(data_root, download):
    root = os.path.join(data_root, 'aclImdb')
    needed = [os.path.join(root, s, c) for s in ('train', 'test') for c in ('neg', 'pos')]
    if download and not all(os.path.isdir(p) for p in needed):
        download_and_extract(IMDB_URL, data_root, checksum=CHECKSUMS[IMDB_URL])  # the archive holds aclImdb/
    for p in needed:
        if not os.path.isdir(p):
            raise _missing('IMDB', p, _how_to_get(IMDB_URL, data_root) + ' (the archive holds aclImdb/)')
    splits = {}
    for split in ('train', 'test'):
        paths, labels = [], []
        for label, cls in ((0, 'neg'), (1, 'pos')):  # label 0 = negative, 1 = positive
            folder = os.path.join(root, split, cls)
            names = sorted(n for n in os.listdir(folder) if n.endswith('.txt'))
            paths += [os.path.join(folder, n) for n in names]
            labels += [label] * len(names)
        splits[split] = TextFilesDataset(paths, labels, clean=_clean_imdb)
    return splits

# -----------------------------------------------------------------------------
# image preprocessing


def image_transforms(image_size: int, train: bool, crop: bool = True):
    """
    The 2022 paper's preprocessing (PIL image -> float tensor [3, image_size, image_size] in [-1, 1]):
      crop=True (ImageNet-1K): resize to image_size / 0.9 square (248 x 248 for 224, bicubic), then crop
                               image_size: random in training, centred in evaluation
      crop=False (CIFAR):      resize to image_size square (bicubic)
      training adds RandAugment(); then ToTensor + Normalize(mean 0.5, std 0.5).
    """
    bicubic = T.InterpolationMode.BICUBIC
    steps = []
    if crop:
        side = int(image_size / 0.9)
        steps += [T.Resize((side, side), interpolation=bicubic),
                  T.RandomCrop(image_size) if train else T.CenterCrop(image_size)]
    else:
        steps += [T.Resize((image_size, image_size), interpolation=bicubic)]
    if train:
        steps += [T.RandAugment()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))])


class ImageFilesDataset(Dataset):
    """(transform(PIL RGB image), label) pairs; images are read lazily from their paths."""

    def __init__(self, paths, labels, transform, classes=None):
        assert len(paths) == len(labels)
        self.paths, self.labels, self.transform, self.classes = list(paths), [int(y) for y in labels], transform, classes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            img = img.convert('RGB')
        return self.transform(img), self.labels[i]


class ImageArrayDataset(Dataset):
    """(transform(PIL image), label) pairs from an in-memory uint8 array [N, H, W, 3] (used for CIFAR)."""

    def __init__(self, images, labels, transform):
        assert len(images) == len(labels)
        self.images, self.labels, self.transform = images, [int(y) for y in labels], transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class TensorImageDataset(Dataset):
    """(images[i] / max_value as float tensor [C, H, W], label) pairs from a uint8 tensor [N, C, H, W]."""

    def __init__(self, images, labels, max_value):
        assert len(images) == len(labels)
        self.images, self.labels, self.max_value = images, [int(y) for y in labels], float(max_value)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / self.max_value, self.labels[i]

# -----------------------------------------------------------------------------
# ImageNet-1k: imagenet/{train,val}/<wnid>/*.JPEG, class index = position of wnid in sorted order

_IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')


def _list_image_folder(folder):
    """-> (sorted class folder names, paths, labels), files sorted within each class."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(os.path.join(folder, cls))
                       if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS))
        paths += [os.path.join(folder, cls, n) for n in names]
        labels += [label] * len(names)
    return classes, paths, labels


def load_imagenet(data_root, download, image_size):
    """train = imagenet/train, test = imagenet/val (the official validation set); valid = None."""
    root = os.path.join(data_root, 'imagenet')
    how = (f"ImageNet cannot be downloaded automatically (--download does not apply; license): get "
           f"ILSVRC2012 from {IMAGENET_URL} and arrange it as {os.path.abspath(root)}/{{train,val}}/<wnid>/*.JPEG "
           f"(the val images also sorted into one folder per wnid).")
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(root, split)):
            raise _missing('ImageNet-1k', os.path.join(root, split), how)
    train_classes, train_paths, train_labels = _list_image_folder(os.path.join(root, 'train'))
    val_classes, val_paths, val_labels = _list_image_folder(os.path.join(root, 'val'))
    if not train_classes:
        raise _missing('ImageNet-1k class folders', os.path.join(root, 'train', '<wnid>'), how)
    if val_classes != train_classes:
        only_train, only_val = set(train_classes) - set(val_classes), set(val_classes) - set(train_classes)
        raise ValueError(f"ImageNet train and val must have the same wnid folders; only in train: "
                         f"{sorted(only_train)[:5]}, only in val: {sorted(only_val)[:5]} (first 5 shown)")
    return {
        'train': ImageFilesDataset(train_paths, train_labels, image_transforms(image_size, train=True), train_classes),
        'test': ImageFilesDataset(val_paths, val_labels, image_transforms(image_size, train=False), train_classes),
        'n_classes': len(train_classes),
    }

# -----------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the official python pickles, b'data' uint8 [N, 3072] (RGB planes, 32x32)


def _cifar_allowed_globals():
    import _codecs
    from numpy._core import multiarray, numeric
    return {('numpy.core.multiarray', '_reconstruct'): multiarray._reconstruct,
            ('numpy._core.multiarray', '_reconstruct'): multiarray._reconstruct,
            ('numpy.core.numeric', '_frombuffer'): numeric._frombuffer,
            ('numpy._core.numeric', '_frombuffer'): numeric._frombuffer,
            ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
            ('_codecs', 'encode'): _codecs.encode}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR python batches hold: dicts, lists, bytes, numbers and numpy arrays.
    Any other global (a crafted file's os.system, eval, ...) is refused before it can run."""

    def find_class(self, module, name):
        allowed = _cifar_allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only "
                                         f"dicts, lists, numbers and numpy arrays")
        return allowed[(module, name)]


def read_cifar_batch(path: str, label_key: bytes, n_classes: int):
    """-> (images uint8 [N, 32, 32, 3], labels list[int]) from one official CIFAR python batch, read with a
    restricted unpickler (no code in the file can run). Errors name the file: not a CIFAR batch (e.g. an HTML
    error page saved by a failed download), missing keys, wrong shapes, labels outside 0..n_classes-1."""
    with open(path, 'rb') as f:
        head = f.read(64)
        f.seek(0)
        try:
            batch = _CifarUnpickler(f, encoding='bytes').load()
        except Exception as e:
            looks = ' (it looks like an HTML page, e.g. an error page saved by a failed download)' \
                if head.lstrip().lower().startswith((b'<!doctype', b'<html')) else ''
            raise ValueError(f"{path} is not a CIFAR python batch{looks}: {type(e).__name__}: {e}") from None
    if not isinstance(batch, dict) or b'data' not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR python batch: expected a dict with keys b'data' and "
                         f"{label_key!r}, found {keys}")
    images = batch[b'data']
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        what = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array [N, 3072] (32 x 32 RGB planes), found {what}")
    labels = batch[label_key]
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(images):
        raise ValueError(f"{path}: {label_key!r} must be a list of {len(images)} labels, found "
                         f"{len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__}")
    labels = _check_labels(labels, n_classes, path)
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _check_labels(labels, n_classes, path):
    """-> list[int]; ValueError naming the file and index of the first label outside 0..n_classes-1."""
    out = []
    for i, y in enumerate(labels.tolist() if isinstance(labels, np.ndarray) else labels):
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not 0 <= y < n_classes:
            raise ValueError(f"{path}: label {y!r} at index {i} is out of range (expected an integer in "
                             f"0..{n_classes - 1})")
        out.append(int(y))
    return out


def _read_cifar_batches(paths, label_key, n_classes):
    """-> (images uint8 [N, 32, 32, 3], labels list[int]) from CIFAR pickle files."""
    images, labels = [], []
    for path in paths:
        x, y = read_cifar_batch(path, label_key, n_classes)
        images.append(x)
        labels += y
    return np.ascontiguousarray(np.concatenate(images)), labels


def load_cifar(data_root, download, image_size, n_classes):
    """CIFAR-10 (n_classes=10) or CIFAR-100 (n_classes=100, fine labels); images go through image_transforms."""
    if n_classes == 10:
        url, folder, label_key = CIFAR10_URL, 'cifar-10-batches-py', b'labels'
        files = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
    else:
        url, folder, label_key = CIFAR100_URL, 'cifar-100-python', b'fine_labels'
        files = {'train': ['train'], 'test': ['test']}
    root = os.path.join(data_root, folder)
    paths = {split: [os.path.join(root, f) for f in names] for split, names in files.items()}
    all_paths = paths['train'] + paths['test']
    if download and not all(os.path.isfile(p) for p in all_paths):
        download_and_extract(url, data_root, checksum=CHECKSUMS[url])  # the archive holds <folder>/
    for p in all_paths:
        if not os.path.isfile(p):
            raise _missing(f'CIFAR-{n_classes}', p, _how_to_get(url, data_root) + f' (the archive holds {folder}/)')
    return {split: ImageArrayDataset(*_read_cifar_batches(paths[split], label_key, n_classes),
                                     transform=image_transforms(image_size, train=(split == 'train'), crop=False))
            for split in ('train', 'test')}

# -----------------------------------------------------------------------------
# smallNORB: the original NYU binary files (named .mat, but not MATLAB files).
# Header, all little-endian int32: magic, ndim, then max(3, ndim) dims (unused ones are 1); then the
# data, row-major. dat: uint8 [N, 2, 96, 96] (stereo pair, 0 = left camera, 1 = right);
# cat: int32 [N] category 0..4; info: int32 [N, 4] (instance, elevation, azimuth, lighting).

_NORB_DTYPES = {0x1E3D4C55: np.dtype('u1'), 0x1E3D4C54: np.dtype('<i4'), 0x1E3D4C51: np.dtype('<f4'),
                0x1E3D4C53: np.dtype('<f8'), 0x1E3D4C56: np.dtype('<i2')}
_NORB_MAGICS = {dtype: magic for magic, dtype in _NORB_DTYPES.items()}


def read_smallnorb_file(path: str) -> np.ndarray:
    """
    Read one smallNORB file (plain, or gzipped as downloaded). Plain files are memory-mapped
    read-only, so the 24300 x 2 x 96 x 96 images are not loaded until used.
    """
    with _open_maybe_gz(path) as f:
        try:
            head = f.read(8)
        except (OSError, EOFError) as e:                     # a truncated or corrupt .gz
            raise ValueError(f"{path}: not a readable smallNORB file ({e})") from None
        if len(head) < 8:
            raise ValueError(f"{path}: truncated smallNORB file ({len(head)} bytes; the header alone has at least 20)")
        magic, ndim = np.frombuffer(head, dtype='<i4').tolist()
        if magic not in _NORB_DTYPES or not 0 <= ndim <= 16:
            raise ValueError(f"{path} is not a smallNORB file (magic {magic & 0xFFFFFFFF:#x}, ndim {ndim})")
        raw_dims = f.read(4 * max(3, ndim))
        if len(raw_dims) < 4 * max(3, ndim):
            raise ValueError(f"{path}: truncated smallNORB header (expected {4 * max(3, ndim)} bytes of dims "
                             f"after the magic, found {len(raw_dims)})")
        dims = np.frombuffer(raw_dims, dtype='<i4').tolist()
        if any(d < 0 for d in dims):
            raise ValueError(f"{path}: corrupt smallNORB header (negative dims {dims})")
        shape, dtype, offset = tuple(dims[:ndim]), _NORB_DTYPES[magic], 8 + 4 * max(3, ndim)
        n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if _is_gzip(path):
            try:
                data = f.read()
            except (OSError, EOFError) as e:
                raise ValueError(f"{path}: truncated or corrupt gzip ({e})") from None
            if len(data) != n_bytes:
                raise ValueError(f"{path}: expected {n_bytes} data bytes for shape {shape}, found {len(data)}")
            return np.frombuffer(data, dtype=dtype).reshape(shape)
    if os.path.getsize(path) != offset + n_bytes:
        raise ValueError(f"{path}: size {os.path.getsize(path)} bytes does not match header (shape {shape}, {dtype})")
    return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape)


def write_smallnorb_file(path: str, array) -> None:
    """
    Write array in the smallNORB binary format. uint8 -> 'dat' magic 0x1E3D4C55; other integer
    arrays are stored as int32 -> magic 0x1E3D4C54 (as for 'cat' and 'info'). Written atomically.
    """
    array = np.asarray(array)
    if array.dtype.kind in 'iu' and array.dtype != np.uint8:
        if array.size and (array.min() < -2**31 or array.max() >= 2**31):
            raise ValueError("integer values out of int32 range")
        array = array.astype('<i4')
    dtype = array.dtype.newbyteorder('<') if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _NORB_MAGICS:
        raise ValueError(f"unsupported dtype {array.dtype} for a smallNORB file")
    dims = list(array.shape) + [1] * (3 - array.ndim)  # at least 3 dims are always written
    header = np.array([_NORB_MAGICS[dtype], array.ndim] + dims, dtype='<i4').tobytes()
    write_atomic(path, header + np.ascontiguousarray(array, dtype=dtype).tobytes())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder):
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


def save_atomic(save_fn, path):
    """save_fn(tmp_path) writes the file beside `path`; the file is fsynced, given the mode the umask
    allows (as open() would), renamed over `path` in one step and the folder fsynced, so `path` is never
    seen half-written, nor empty after a power cut (used for datasets, feature-store indexes, checkpoints
    and heads). Temporary files of killed writers (<name>.tmp-<dead pid>-*) are removed first; if save_fn
    fails (e.g. disk full), its temporary file is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphans(folder, os.path.basename(path) + '.tmp-')
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_pid_prefix(os.path.basename(path) + '.tmp-'))
    os.close(fd)
    try:
        save_fn(tmp)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data: bytes):
    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    save_atomic(write, path)


class SmallNorbDataset(Dataset):
    """
    (stereo float tensor [2, 96, 96] in [0, 1], category label) pairs; index 0 = left camera.
    train=True augments as in the 2019 paper: pad 16 pixels on each side by replicating the edges
    ([2, 128, 128]), then take a random 96 x 96 crop. pad=None scales those 16 pixels to other image
    sizes (a sixth of the side: 16 for 96 x 96, 5 for 32 x 32). Also exposes .info (numpy int32
    [N, 4]: instance, elevation, azimuth, lighting) and .labels (list[int]).
    """

    def __init__(self, images, labels, info, train: bool, pad=None):
        assert len(images) == len(labels) == len(info)
        self.images, self.labels, self.info = images, [int(y) for y in labels], np.asarray(info)
        self.train, self.pad = train, pad

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.images[i], dtype=np.float32)) / 255.0  # [2, 96, 96]
        if self.train:
            h, w = x.shape[-2:]
            pad = round(min(h, w) / 6) if self.pad is None else self.pad
            x = F.pad(x[None], (pad,) * 4, mode='replicate')[0]  # [2, 96 + 2 * pad, 96 + 2 * pad]
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, top:top + h, left:left + w].contiguous()  # [2, 96, 96]
        return x, self.labels[i]


def load_smallnorb(data_root, download):
    root = os.path.join(data_root, 'smallnorb')
    splits = {}
    for split, prefix in SMALLNORB_PREFIX.items():
        arrays = {}
        for kind in ('dat', 'cat', 'info'):
            name = f'{prefix}{kind}.mat'
            path = _find_or_download(root, name, SMALLNORB_URL, download, 'smallNORB',
                                     f"Get {SMALLNORB_URL}{name}.gz (and the other 5 files there), gunzip them into "
                                     f"{os.path.abspath(root)}, or pass --download (download=True).")
            arrays[kind] = read_smallnorb_file(path)
        dat, cat, info = arrays['dat'], arrays['cat'].reshape(-1), arrays['info']
        if dat.ndim != 4 or dat.shape[1] != 2 or info.ndim != 2 or not len(dat) == len(cat) == len(info):
            raise ValueError(f"smallNORB {split} files disagree: dat {dat.shape}, cat {cat.shape}, info {info.shape}")
        _check_labels(np.asarray(cat), 5, os.path.join(root, f'{prefix}cat.mat'))
        splits[split] = SmallNorbDataset(dat, cat, info, train=(split == 'train'))
    return splits

# -----------------------------------------------------------------------------
# MNIST: IDX files. Header, big-endian: magic = 0x0000 <dtype code> <ndim> (0x00000803 for
# uint8 images [N, 28, 28], 0x00000801 for uint8 labels [N]), ndim int32 dims; then the data.

_IDX_DTYPES = {0x08: np.dtype('u1'), 0x09: np.dtype('i1'), 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file, plain or gzipped (detected by content, whatever the file name)."""
    with _open_maybe_gz(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as e:                     # a truncated or corrupt .gz
            raise ValueError(f"{path}: truncated or corrupt gzip ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4].hex()}, {len(data)} bytes)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes; {4 + 4 * ndim} expected for {ndim} dims)")
    shape = tuple(np.frombuffer(data, dtype='>i4', count=ndim, offset=4).tolist())
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"{path}: data size does not match header shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder('='))


def write_idx(path: str, array, gzip: bool = False) -> None:
    """Write array as an IDX file (gzip-compressed if gzip=True; the name is used as given)."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder('='): code for code, dtype in _IDX_DTYPES.items()}
    if array.dtype.newbyteorder('=') not in codes:
        raise ValueError(f"unsupported dtype {array.dtype} for an IDX file")
    code = codes[array.dtype.newbyteorder('=')]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype='>i4').tobytes()
    data = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    write_atomic(path, _gzip.compress(data) if gzip else data)


def load_mnist(data_root, download):
    root = os.path.join(data_root, 'mnist')
    splits = {}
    for split, names in MNIST_FILES.items():
        arrays = []
        for name in names:
            path = _find_or_download(root, name, MNIST_URL, download, 'MNIST',
                                     f"Get {MNIST_URL}{name}.gz (and the other 3 files there) into "
                                     f"{os.path.abspath(root)} (gzipped or not), or pass --download (download=True).")
            arrays.append(read_idx(path))
            label_path = path
        images, labels = arrays  # uint8 [N, 28, 28], uint8 [N]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} disagree")
        labels = _check_labels(labels, 10, label_path)
        splits[split] = TensorImageDataset(torch.from_numpy(images.copy())[:, None], labels, 255)
    return splits

# -----------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16, 10 classes)

DIGITS_SEED = 0  # random_state of the fixed stratified 75/25 train/test split


def load_digits_splits():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # [1797, 1, 8, 8], values 0..16
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels,
                                           random_state=DIGITS_SEED)
    return {split: TensorImageDataset(images[idx], labels[idx].tolist(), 16)
            for split, idx in (('train', train_idx), ('test', test_idx))}

# -----------------------------------------------------------------------------
# main entry point


def get_dataset_splits(name: str, data_root: str = '.data', download: bool = False, image_size: int = 224) -> dict:
    """
    -> {'train': Dataset, 'valid': Dataset | None, 'test': Dataset, 'n_classes': int,
        'modality': 'text' | 'image' | 'stereo'}

    name: one of DATASETS. data_root: folder holding the datasets (layouts in the module docstring).
    download: fetch missing data from the official source (not possible for imagenet-1k).
    image_size: output side of imagenet-1k and cifar images (see image_transforms); smallnorb (96),
    mnist (28) and digits (8) keep their native sizes.
    'valid' is None for imdb, cifar10, cifar100, imagenet-1k, smallnorb, mnist and digits, which have
    no official validation split. A missing dataset raises FileNotFoundError naming the expected path.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if name in ('sst5', 'sst2'):
        n_classes, modality = (5 if name == 'sst5' else 2), 'text'
        splits = load_sst(data_root, download, binary=(name == 'sst2'))
    elif name == 'imdb':
        splits, n_classes, modality = load_imdb(data_root, download), 2, 'text'
    elif name == 'imagenet-1k':
        splits = load_imagenet(data_root, download, image_size)
        n_classes, modality = splits.pop('n_classes'), 'image'  # 1000 on the real data
    elif name in ('cifar10', 'cifar100'):
        n_classes = 10 if name == 'cifar10' else 100
        splits, modality = load_cifar(data_root, download, image_size, n_classes), 'image'
    elif name == 'smallnorb':
        splits, n_classes, modality = load_smallnorb(data_root, download), 5, 'stereo'
    elif name == 'mnist':
        splits, n_classes, modality = load_mnist(data_root, download), 10, 'image'
    else:  # digits
        splits, n_classes, modality = load_digits_splits(), 10, 'image'
    return {'train': splits['train'], 'valid': splits.get('valid'), 'test': splits['test'],
            'n_classes': n_classes, 'modality': modality}


# -----------------------------------------------------------------------------
# Feature store: a frozen backbone's hidden states of every text, computed once, memory-mapped.
# The backbone never changes, so heads can train from these instead of running it every step.


def backbone_fingerprint(backbone) -> dict:
    """What determines a text backbone's features, hashed: its weights (every tensor of the state dict),
    its config (less its path), its tokenizer (the full tokenizers JSON, or the vocabulary), the window
    (max_length), the hub revision it resolved to, and the versions of the libraries that tokenise.
    -> {'weights', 'config', 'tokenizer': sha256 hex, 'max_length', 'revision', 'transformers', 'tokenizers'}"""
    import transformers
    try:
        import tokenizers
        tokenizers_version = tokenizers.__version__
    except ImportError:
        tokenizers_version = None
    model = backbone.model
    weights = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        weights.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        weights.update(t.reshape(-1).view(torch.uint8).numpy())
    config = getattr(model, 'config', None)
    config_dict = {} if config is None else {k: v for k, v in config.to_dict().items()
                                               if k not in ('_name_or_path', 'transformers_version')}
    tokenizer = getattr(backbone, 'tokenizer', None)
    if tokenizer is None:
        tokenizer_text = ''
    elif getattr(tokenizer, 'backend_tokenizer', None) is not None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec.pop('truncation', None), spec.pop('padding', None)   # call settings, changed by every encode()
        tokenizer_text = type(tokenizer).__name__ + json.dumps(spec, sort_keys=True)
    else:
        tokenizer_text = type(tokenizer).__name__ + json.dumps(tokenizer.get_vocab(), sort_keys=True)
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()                    # noqa: E731
    return {'weights': weights.hexdigest(), 'config': sha(json.dumps(config_dict, sort_keys=True, default=str)),
            'tokenizer': sha(tokenizer_text), 'max_length': getattr(backbone, 'max_length', None),
            'revision': getattr(config, '_commit_hash', None),
            'transformers': transformers.__version__, 'tokenizers': tokenizers_version}


class FeatureStore:
    """
    Hidden states of all depths of one frozen text backbone for every text ever asked for, stored
    once as float16 and read back memory-mapped. Texts are keys, so datasets that share texts (SST-5
    and SST-2) share features. The store lives in folder/<key>/, key = a hash of backbone_fingerprint
    (weights, config, tokenizer, max_length, revision, library versions): other weights or another
    revision of the same backbone name get their own features. Layout of folder/<key>/:

        hidden.f16   float16 [n_rows, d_depth, d_emb], one row per non-padding token, append-only
        index.json   {'backbone', 'd_depth', 'd_emb', 'max_length', 'fingerprint', 'n_rows',
                      'texts': {text: [start, length]}}
        .lock        a file lock (filelock): one process at a time appends rows and rewrites the index

    Nothing is lost on interruption: rows are appended and fsynced before index.json (written
    atomically) points at them, and rows past the index's n_rows (a partial tail) are dropped on
    the next open, so encoding resumes where the last saved index ends. Several processes (runs side
    by side, or the ranks of `accelerate launch`) may share a store: writers take the lock and re-read
    the index first, so no row is written twice or pointed at by another text. A hidden.f16 shorter than
    its index (truncated or deleted) or an unreadable index.json is refused with the folder to delete.
    """

    SAVE_EVERY_SECONDS = 60

    def __init__(self, folder, backbone):
        from filelock import FileLock
        self.backbone = backbone
        fingerprint = backbone_fingerprint(backbone)
        self.key = hashlib.sha256(json.dumps(
            [backbone.name, backbone.d_depth, backbone.d_emb, fingerprint], sort_keys=True).encode()).hexdigest()
        self.folder = os.path.join(folder, self.key[:16])
        self.hidden_path = os.path.join(self.folder, 'hidden.f16')
        self.index_path = os.path.join(self.folder, 'index.json')
        self.meta = {'backbone': backbone.name, 'd_depth': backbone.d_depth, 'd_emb': backbone.d_emb,
                     'max_length': getattr(backbone, 'max_length', None), 'fingerprint': fingerprint}
        self.row_bytes = 2 * backbone.d_depth * backbone.d_emb
        os.makedirs(self.folder, exist_ok=True)
        self.lock = FileLock(os.path.join(self.folder, '.lock'))
        with self._locked():
            self._load()

    def _locked(self):
        from filelock import Timeout
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            print(f"feature cache {self.folder}: another process is writing it; waiting for it to finish")
            self.lock.acquire()
        return _Release(self.lock)

    def _damaged(self, why):
        return ValueError(f"feature cache {self.folder} is damaged: {why}. Delete this folder to rebuild the "
                          f"features (or pass another --feature_cache)")

    def _load(self):
        """(Re-)read the index, validate it against the backbone and hidden.f16, drop a partial tail (under the lock)."""
        index = {**self.meta, 'n_rows': 0, 'texts': {}}
        if os.path.exists(self.index_path):
            try:
                with open(self.index_path, encoding='utf-8') as f:
                    index = json.load(f)
                if not isinstance(index, dict) or not isinstance(index.get('texts'), dict) \
                        or not isinstance(index.get('n_rows'), int) or index['n_rows'] < 0:
                    raise ValueError("expected {'n_rows': int, 'texts': {text: [start, length]}, ...}")
            except (ValueError, UnicodeDecodeError) as e:          # json.JSONDecodeError is a ValueError
                raise self._damaged(f"{self.index_path} is not a valid index ({e})") from None
            stored = {k: index.get(k) for k in self.meta}
            if stored != self.meta:
                raise ValueError(f"feature cache {self.folder} holds features of {stored}, not of {self.meta}: "
                                 f"use another --feature_cache folder")
            n_rows = index['n_rows']
            for text, span in index['texts'].items():
                if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                        and span[0] >= 0 and span[1] >= 0 and span[0] + span[1] <= n_rows):
                    raise self._damaged(f"{self.index_path} points {text[:40]!r} at rows {span}, outside its "
                                        f"{n_rows} rows")
        needed = index['n_rows'] * self.row_bytes
        size = os.path.getsize(self.hidden_path) if os.path.exists(self.hidden_path) else 0
        if size < needed:
            raise self._damaged(f"{self.hidden_path} holds {size} bytes but index.json points at {index['n_rows']} "
                                f"rows ({needed} bytes): the file was truncated or deleted")
        if size > needed or not os.path.exists(self.hidden_path):
            with open(self.hidden_path, 'ab') as f:                  # drop a partial tail, if any
                f.truncate(needed)
        self.index = index

    def _save_index(self):
        write_atomic(self.index_path, json.dumps(self.index).encode())

    def ensure(self, texts, desc='', batch_texts=128):
        """Encodes (with the backbone) the texts not stored yet, shortest first, in batches."""
        if not set(texts) - set(self.index['texts']):
            return
        with self._locked():
            self._load()                                             # another process may have added some
            self._append(sorted(set(texts) - set(self.index['texts']), key=len), desc, batch_texts)

    def _append(self, missing, desc, batch_texts):
        from tqdm import tqdm
        if not missing:
            return
        last_save = time.time()
        progress = tqdm(total=len(missing), desc=f"encoding {desc} ({self.backbone.name})", unit='text')
        with open(self.hidden_path, 'ab') as f, progress:
            for s in range(0, len(missing), batch_texts):
                batch = missing[s:s + batch_texts]
                progress.update(len(batch))
                hidden, mask = self.backbone.encode(batch)           # [batch, n_pos, d_depth, d_emb], [batch, n_pos]
                hidden = hidden.to(torch.float16).cpu().numpy()
                lengths = (~mask).sum(dim=1).tolist()
                for text, h, length in zip(batch, hidden, lengths):
                    f.write(np.ascontiguousarray(h[:length]).tobytes())   # non-padding tokens come first
                    self.index['texts'][text] = [self.index['n_rows'], length]
                    self.index['n_rows'] += length
                if time.time() - last_save > self.SAVE_EVERY_SECONDS or s + batch_texts >= len(missing):
                    f.flush()
                    os.fsync(f.fileno())
                    self._save_index()
                    last_save = time.time()

    def dataset(self, texts, labels, desc=''):
        """-> a Dataset of (hidden float32 tensor [n_pos, d_depth, d_emb], label), encoding what is missing."""
        self.ensure(texts, desc)
        spans = [self.index['texts'][t] for t in texts]
        return CachedFeatures(self.hidden_path, self.index['n_rows'], (self.meta['d_depth'], self.meta['d_emb']),
                              spans, labels)


class _Release:
    """Context manager that releases an already acquired lock."""

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self.lock

    def __exit__(self, *exc):
        self.lock.release()


class CachedFeatures(Dataset):
    """(hidden [n_pos, d_depth, d_emb] float32, label) read from a FeatureStore's memory map;
    .lengths holds each sample's n_pos."""

    def __init__(self, hidden_path, n_rows, row_shape, spans, labels):
        self.hidden_path, self.n_rows, self.row_shape = hidden_path, n_rows, tuple(row_shape)
        self.spans, self.labels = spans, [int(y) for y in labels]
        self.lengths = [length for _, length in spans]
        self._rows = None                                            # opened lazily (also in loader workers)

    def __len__(self):
        return len(self.spans)

    def __getitem__(self, i):
        if self._rows is None:
            self._rows = np.memmap(self.hidden_path, dtype=np.float16, mode='r', shape=(self.n_rows, *self.row_shape))
        start, length = self.spans[i]
        return torch.from_numpy(self._rows[start:start + length].astype(np.float32)), self.labels[i]

    def __getstate__(self):
        return {**self.__dict__, '_rows': None}


def collate_features(batch):
    """[(hidden [n_pos_b, d_depth, d_emb], label)] -> hidden [B, n_pos, d_depth, d_emb] zero-padded,
    mask [B, n_pos] (True = padding), labels [B]."""
    from models import pad_positions
    hidden, mask = pad_positions([h for h, _ in batch])
    return hidden, mask, torch.tensor([y for _, y in batch])


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """
    Shuffled batches of similar-length samples, so little of each batch is padding (padding is
    masked, so this changes speed, not results). Each epoch: shuffle all indices, cut them into
    groups of `batch_size * group_batches`, sort each group by length, cut it into batches, and
    shuffle the batches. Draws from `generator` (default: torch's global RNG); seed it for
    reproducible passes. shuffle=False (evaluation): the same batches every time, sorted by length.
    """

    def __init__(self, lengths, batch_size, group_batches=64, shuffle=True, generator=None):
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.generator = generator
        self.group = batch_size * group_batches if shuffle else len(self.lengths)

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        if not self.shuffle:
            order = sorted(range(len(self.lengths)), key=self.lengths.__getitem__)
            return iter([order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)])
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for s in range(0, len(order), self.group):
            group = sorted(order[s:s + self.group], key=self.lengths.__getitem__)
            batches += [group[k:k + self.batch_size] for k in range(0, len(group), self.batch_size)]
        return iter([batches[k] for k in torch.randperm(len(batches), generator=self.generator).tolist()])


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(
        description="Check (and optionally download) a dataset: prints split sizes. 'heinsen2019': the 2019 "
                    "paper's published weights, into <data-root>/heinsen2019 (sha256-verified).")
    parser.add_argument('name', choices=DATASETS + ('heinsen2019',))
    parser.add_argument('--data-root', default='.data')
    parser.add_argument('--download', action='store_true')
    parser.add_argument('--base-url', default=HEINSEN2019_URL, help="heinsen2019 only: where to fetch the files from "
                        "(a mirror; file:// URLs work), default the authors' repository at the published commit")
    args = parser.parse_args()
    try:
        if args.name == 'heinsen2019':
            for name, path in fetch_heinsen2019_weights(os.path.join(args.data_root, 'heinsen2019'), args.base_url,
                                                        download=args.download).items():
                print(f"{path}: sha256 verified")
        else:
            splits = get_dataset_splits(args.name, args.data_root, args.download)
            for k in ('train', 'valid', 'test'):
                print(f"{k}: {'None' if splits[k] is None else len(splits[k])}")
            print(f"n_classes: {splits['n_classes']}, modality: {splits['modality']}")
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        import sys
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
