"""
Image datasets, on torchvision's dataset classes, and the 2022 paper's preprocessing.

    image_transforms(image_size, train, crop=True)   the paper's preprocessing (PIL image -> tensor in [-1, 1])
    load_imagenet(...)  torchvision.datasets.ImageFolder on imagenet/{train,val}/<wnid>/ (one class order)
    load_cifar(...)     CIFAR10 / CIFAR100: torchvision's classes, their batches read with a restricted unpickler
    load_mnist(...)     MNIST: torchvision's class on our layout, mnist/*-ubyte[.gz], read with read_idx
    load_digits_splits()  scikit-learn's 8x8 digits (TensorImageDataset)

Imports data.downloads and data.fileio only.
"""

import gzip
import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.vision import VisionDataset

from ..errors import UsageError
from . import downloads
from .fileio import check_labels, open_maybe_gz, write_atomic

# -----------------------------------------------------------------------------
# image preprocessing


def image_transforms(image_size: int, train: bool, crop: bool = True):
    """
    The 2022 paper's preprocessing (PIL image -> float tensor [3, image_size, image_size] in [-1, 1]):
      crop=True (ImageNet-1K): resize to image_size / 0.9 square (248 x 248 for 224, bicubic), then crop
                               image_size: random in training, centred in evaluation
      crop=False (CIFAR):      resize to image_size square (bicubic)
      training adds RandAugment(); then ToTensor + Normalize(mean 0.5, std 0.5).
    These are torchvision.transforms (v1), as in the authors' code. transforms.v2 would not give the same
    results: its RandAugment draws its operations differently under the same seed, and its
    ToImage + ToDtype(scale=True) multiplies by 1/255 where ToTensor divides by 255 (1 ulp apart for about half
    of the 256 pixel values); its Resize and crops are identical.
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


def _image_folder(folder, transform, how):
    try:
        return tv_datasets.ImageFolder(folder, transform=transform)
    except FileNotFoundError as e:          # no class folders, or a class folder without images
        raise downloads.missing('ImageNet-1k images', folder, f"({e}) {how}") from None


def load_imagenet(data_root, download, image_size):
    """train = imagenet/train, test = imagenet/val (the official validation set); valid = None. Both are
    torchvision ImageFolders (.classes, .targets, .samples); the class index is the position of the wnid in
    sorted order, the same in both (val must have exactly train's wnid folders)."""
    root = os.path.join(data_root, 'imagenet')
    how = (f"ImageNet cannot be downloaded automatically (--download does not apply; license): get "
           f"ILSVRC2012 from {downloads.IMAGENET_URL} and arrange it as {os.path.abspath(root)}/{{train,val}}/<wnid>/*.JPEG "
           f"(the val images also sorted into one folder per wnid).")
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(root, split)):
            raise downloads.missing('ImageNet-1k', os.path.join(root, split), how)
    train = _image_folder(os.path.join(root, 'train'), image_transforms(image_size, train=True), how)
    test = _image_folder(os.path.join(root, 'val'), image_transforms(image_size, train=False), how)
    if test.classes != train.classes:
        only_train, only_val = set(train.classes) - set(test.classes), set(test.classes) - set(train.classes)
        raise UsageError(f"ImageNet train and val must have the same wnid folders; only in train: "
                         f"{sorted(only_train)[:5]}, only in val: {sorted(only_val)[:5]} (first 5 shown)")
    return {'train': train, 'test': test, 'n_classes': len(train.classes)}

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


def _unpickle_cifar(path, what):
    """One CIFAR python file, read with the restricted unpickler; ValueError naming the file otherwise."""
    with open(path, 'rb') as f:
        head = f.read(64)
        f.seek(0)
        try:
            return _CifarUnpickler(f, encoding='bytes').load()
        except Exception as e:
            looks = ' (it looks like an HTML page, e.g. an error page saved by a failed download)' \
                if head.lstrip().lower().startswith((b'<!doctype', b'<html')) else ''
            raise UsageError(f"{path} is not a {what}{looks}: {type(e).__name__}: {e}") from None


def read_cifar_batch(path: str, label_key: bytes, n_classes: int):
    """-> (images uint8 [N, 32, 32, 3], labels list[int]) from one official CIFAR python batch, read with a
    restricted unpickler (no code in the file can run). Errors name the file: not a CIFAR batch (e.g. an HTML
    error page saved by a failed download), missing keys, wrong shapes, labels outside 0..n_classes-1."""
    batch = _unpickle_cifar(path, 'CIFAR python batch')
    if not isinstance(batch, dict) or b'data' not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UsageError(f"{path} is not a CIFAR python batch: expected a dict with keys b'data' and "
                         f"{label_key!r}, found {keys}")
    images = batch[b'data']
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        what = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise UsageError(f"{path}: b'data' must be a uint8 array [N, 3072] (32 x 32 RGB planes), found {what}")
    labels = batch[label_key]
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(images):
        raise UsageError(f"{path}: {label_key!r} must be a list of {len(images)} labels, found "
                         f"{len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__}")
    labels = check_labels(labels, n_classes, path)
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels



def write_cifar_batch(path, images, labels, label_key: bytes) -> None:
    """images uint8 [N, 32, 32, 3] -> the official pickle: b'data' uint8 [N, 3072] as RGB planes (read_cifar_batch's
    inverse; tiny datasets in the real format for tests and benchmarks)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    batch = {b'batch_label': b'test', label_key: list(labels),
             b'data': images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
             b'filenames': [b'x.png'] * len(images)}
    with open(path, 'wb') as f:
        pickle.dump(batch, f)

class CIFAR10(tv_datasets.CIFAR10):
    """
    torchvision.datasets.CIFAR10 (its URL, md5s, file lists, .data uint8 [N, 32, 32, 3], .targets, .classes,
    __getitem__ -> (transform(PIL image), label)), with the loading overridden. root = data_root, holding
    cifar-10-batches-py/ (torchvision's layout too).

    Why we override the loading (and only it): torchvision's __init__ and _load_meta read the batch files with
    plain pickle.load, which runs whatever code a crafted or tampered file holds. Here every file is read with a
    restricted unpickler (numpy arrays and plain types only) and validated (keys, shapes, labels in range), with
    errors naming the file. download() fetches torchvision's URL through our verified, atomic
    downloads.download_and_extract (torchvision's download keeps an archive that fails its md5 and unpacks in
    place), checking the archive's md5 and, after unpacking, every file's md5 from torchvision's lists. Files
    already present are validated by content, not by md5 (so any well-formed copy loads). The label names come
    from batches.meta (meta for CIFAR-100) when present, else are the class indices as strings.
    """

    label_key = b'labels'
    n_classes = 10

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        folder = os.path.join(self.root, self.base_folder)
        if download and not self._files_present():
            self.download()
        for name, _ in self.train_list + self.test_list:
            if not os.path.isfile(os.path.join(folder, name)):
                raise downloads.missing(f'CIFAR-{self.n_classes}', os.path.join(folder, name),
                                        downloads.how_to_get(self.url, self.root)
                                        + f' (the archive holds {self.base_folder}/)')
        images, self.targets = [], []
        for name, _ in (self.train_list if train else self.test_list):
            x, y = read_cifar_batch(os.path.join(folder, name), self.label_key, self.n_classes)
            images.append(x)
            self.targets += y
        self.data = np.ascontiguousarray(np.concatenate(images))     # uint8 [N, 32, 32, 3]
        self._load_meta()

    def _files_present(self):
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

    def _load_meta(self):
        path = os.path.join(self.root, self.base_folder, self.meta['filename'])
        self.classes = [str(i) for i in range(self.n_classes)]
        if os.path.isfile(path):
            meta, key = _unpickle_cifar(path, 'CIFAR python meta file'), self.meta['key'].encode()
            names = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(names, list) or len(names) != self.n_classes:
                raise UsageError(f"{path}: expected {key!r}, a list of {self.n_classes} label names")
            self.classes = [n.decode('utf-8') if isinstance(n, bytes) else str(n) for n in names]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def download(self):
        """Fetch and unpack the official archive into root (verified: the archive's md5 and every file's)."""
        if self._files_present():
            return
        members = {f'{self.base_folder}/{name}': f'md5:{md5}'
                   for name, md5 in self.train_list + self.test_list + [(self.meta['filename'], self.meta['md5'])]}
        downloads.download_and_extract(self.url, self.root, checksum=downloads.CHECKSUMS[self.url], members=members)


class CIFAR100(CIFAR10, tv_datasets.CIFAR100):
    """torchvision.datasets.CIFAR100 (fine labels, 0..99), loaded as CIFAR10 above (restricted unpickler)."""

    label_key = b'fine_labels'
    n_classes = 100


def load_cifar(data_root, download, image_size, n_classes):
    """CIFAR-10 (n_classes=10) or CIFAR-100 (n_classes=100, fine labels); images go through image_transforms."""
    cls = CIFAR10 if n_classes == 10 else CIFAR100
    return {split: cls(data_root, train=(split == 'train'), download=download,
                       transform=image_transforms(image_size, train=(split == 'train'), crop=False))
            for split in ('train', 'test')}

# -----------------------------------------------------------------------------
# MNIST: IDX files. Header, big-endian: magic = 0x0000 <dtype code> <ndim> (0x00000803 for
# uint8 images [N, 28, 28], 0x00000801 for uint8 labels [N]), ndim int32 dims; then the data.

_IDX_DTYPES = {0x08: np.dtype('u1'), 0x09: np.dtype('i1'), 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file, plain or gzipped (detected by content, whatever the file name)."""
    with open_maybe_gz(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as e:                     # a truncated or corrupt .gz
            raise UsageError(f"{path}: truncated or corrupt gzip ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UsageError(f"{path} is not an IDX file (magic {data[:4].hex()}, {len(data)} bytes)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise UsageError(f"{path}: truncated IDX header ({len(data)} bytes; {4 + 4 * ndim} expected for {ndim} dims)")
    shape = tuple(np.frombuffer(data, dtype='>i4', count=ndim, offset=4).tolist())
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise UsageError(f"{path}: data size does not match header shape {shape}")
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
    write_atomic(path, _gzip_compress(data) if gzip else data)


_gzip_compress = gzip.compress   # write_idx's argument `gzip` shadows the module


class MNIST(tv_datasets.MNIST):
    """
    torchvision.datasets.MNIST (.data uint8 [N, 28, 28], .targets, .classes, __getitem__ -> (transform(PIL
    image), label)), reading our layout: root = data_root, files in data_root/mnist/ (train-images-idx3-ubyte,
    ..., each plain or gzipped as downloaded), where torchvision reads root/MNIST/raw/ (unpacked files only).

    Why we override the loading: torchvision's IDX reader reads unpacked files only and checks them with bare
    asserts that name no file, and it does not check the labels. Here read_idx reads either and its errors name
    the file (not an IDX file, truncated header, truncated gzip, size mismatch), and labels outside 0..9 are
    refused. download() fetches the official files through our verified downloads (pinned sha256,
    downloads.CHECKSUMS), not torchvision's (which keeps a file that fails its md5).
    """

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        arrays, paths = [], []
        for name in downloads.MNIST_FILES['train' if train else 'test']:
            paths.append(downloads.find_or_download(
                self.raw_folder, name, downloads.MNIST_URL, download, 'MNIST',
                f"Get {downloads.MNIST_URL}{name}.gz (and the other 3 files there) into "
                f"{os.path.abspath(self.raw_folder)} (gzipped or not), or pass --download (download=True)."))
            arrays.append(read_idx(paths[-1]))
        images, labels = arrays  # uint8 [N, 28, 28], uint8 [N]
        if images.dtype != np.uint8:
            raise UsageError(f"{paths[0]}: MNIST images must be uint8, found {images.dtype}")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UsageError(f"MNIST {'train' if train else 'test'}: images {images.shape} and labels {labels.shape} "
                             f"disagree")
        self.data = torch.from_numpy(np.ascontiguousarray(images))
        self.targets = torch.tensor(check_labels(labels, 10, paths[1]), dtype=torch.int64)

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, 'mnist')


def load_mnist(data_root, download):
    """MNIST items: (float tensor [1, 28, 28] in [0, 1] (pixel / 255), label)."""
    return {split: MNIST(data_root, train=(split == 'train'), download=download, transform=T.ToTensor())
            for split in ('train', 'test')}

# -----------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16, 10 classes)

DIGITS_SEED = 0  # random_state of the fixed stratified 75/25 train/test split


def load_digits_splits():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise UsageError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # [1797, 1, 8, 8], values 0..16
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels,
                                           random_state=DIGITS_SEED)
    return {split: TensorImageDataset(images[idx], labels[idx].tolist(), 16)
            for split, idx in (('train', train_idx), ('test', test_idx))}
