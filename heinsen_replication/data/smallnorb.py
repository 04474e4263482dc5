"""
smallNORB (the 2019 paper's vision dataset): the original NYU binary files and SmallNorbDataset. No
library reads this format (torchvision has no smallNORB), so the reader and writer are our own.

    read_smallnorb_file(path), write_smallnorb_file(path, array)
    load_smallnorb(data_root, download) -> {'train', 'test': SmallNorbDataset}

Imports data.downloads and data.fileio only.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UsageError
from . import downloads
from .fileio import check_labels, is_gzip, open_maybe_gz, write_atomic

# The files are named .mat, but are not MATLAB files. Header, all little-endian int32: magic, ndim, then
# max(3, ndim) dims (unused ones are 1); then the data, row-major. dat: uint8 [N, 2, 96, 96] (stereo pair,
# 0 = left camera, 1 = right); cat: int32 [N] category 0..4; info: int32 [N, 4] (instance, elevation,
# azimuth, lighting).

_NORB_DTYPES = {0x1E3D4C55: np.dtype('u1'), 0x1E3D4C54: np.dtype('<i4'), 0x1E3D4C51: np.dtype('<f4'),
                0x1E3D4C53: np.dtype('<f8'), 0x1E3D4C56: np.dtype('<i2')}
_NORB_MAGICS = {dtype: magic for magic, dtype in _NORB_DTYPES.items()}


def read_smallnorb_file(path: str) -> np.ndarray:
    """
    Read one smallNORB file (plain, or gzipped as downloaded). Plain files are memory-mapped
    read-only, so the 24300 x 2 x 96 x 96 images are not loaded until used.
    """
    with open_maybe_gz(path) as f:
        try:
            head = f.read(8)
        except (OSError, EOFError) as e:                     # a truncated or corrupt .gz
            raise UsageError(f"{path}: not a readable smallNORB file ({e})") from None
        if len(head) < 8:
            raise UsageError(f"{path}: truncated smallNORB file ({len(head)} bytes; the header alone has at least 20)")
        magic, ndim = np.frombuffer(head, dtype='<i4').tolist()
        if magic not in _NORB_DTYPES or not 0 <= ndim <= 16:
            raise UsageError(f"{path} is not a smallNORB file (magic {magic & 0xFFFFFFFF:#x}, ndim {ndim})")
        raw_dims = f.read(4 * max(3, ndim))
        if len(raw_dims) < 4 * max(3, ndim):
            raise UsageError(f"{path}: truncated smallNORB header (expected {4 * max(3, ndim)} bytes of dims "
                             f"after the magic, found {len(raw_dims)})")
        dims = np.frombuffer(raw_dims, dtype='<i4').tolist()
        if any(d < 0 for d in dims):
            raise UsageError(f"{path}: corrupt smallNORB header (negative dims {dims})")
        shape, dtype, offset = tuple(dims[:ndim]), _NORB_DTYPES[magic], 8 + 4 * max(3, ndim)
        n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if is_gzip(path):
            try:
                data = f.read()
            except (OSError, EOFError) as e:
                raise UsageError(f"{path}: truncated or corrupt gzip ({e})") from None
            if len(data) != n_bytes:
                raise UsageError(f"{path}: expected {n_bytes} data bytes for shape {shape}, found {len(data)}")
            return np.frombuffer(data, dtype=dtype).reshape(shape)
    if os.path.getsize(path) != offset + n_bytes:
        raise UsageError(f"{path}: size {os.path.getsize(path)} bytes does not match header (shape {shape}, {dtype})")
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
    """data_root/smallnorb/<prefix>{dat,cat,info}.mat (or .mat.gz) -> {'train', 'test': SmallNorbDataset}."""
    root = os.path.join(data_root, 'smallnorb')
    splits = {}
    for split, prefix in downloads.SMALLNORB_PREFIX.items():
        arrays = {}
        for kind in ('dat', 'cat', 'info'):
            name = f'{prefix}{kind}.mat'
            path = downloads.find_or_download(
                root, name, downloads.SMALLNORB_URL, download, 'smallNORB',
                f"Get {downloads.SMALLNORB_URL}{name}.gz (and the other 5 files there), gunzip them into "
                f"{os.path.abspath(root)}, or pass --download (download=True).")
            arrays[kind] = read_smallnorb_file(path)
        dat, cat, info = arrays['dat'], arrays['cat'].reshape(-1), arrays['info']
        if dat.ndim != 4 or dat.shape[1] != 2 or info.ndim != 2 or not len(dat) == len(cat) == len(info):
            raise UsageError(f"smallNORB {split} files disagree: dat {dat.shape}, cat {cat.shape}, info {info.shape}")
        check_labels(np.asarray(cat), 5, os.path.join(root, f'{prefix}cat.mat'))
        splits[split] = SmallNorbDataset(dat, cat, info, train=(split == 'train'))
    return splits
