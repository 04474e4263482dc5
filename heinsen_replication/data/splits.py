"""
get_dataset_splits: every dataset by name, as {'train', 'valid', 'test', 'n_classes', 'modality'}.

Imports data.text, data.images, data.smallnorb (the loaders).
"""

from ..errors import UsageError
from .images import load_cifar, load_digits_splits, load_imagenet, load_mnist
from .smallnorb import load_smallnorb
from .text import load_imdb, load_sst

DATASETS = ('sst5', 'sst2', 'imdb', 'imagenet-1k', 'cifar10', 'cifar100', 'smallnorb', 'mnist', 'digits')
DATA_SOURCES = ('files', 'hub')
HUB_DATASETS = ('sst5', 'sst2', 'imdb')      # the datasets source='hub' offers (the same data as the files)


def get_dataset_splits(name: str, data_root: str = '.data', download: bool = False, image_size: int = 224,
                       source: str = 'files') -> dict:
    """
    -> {'train': Dataset, 'valid': Dataset | None, 'test': Dataset, 'n_classes': int,
        'modality': 'text' | 'image' | 'stereo'}

    name: one of DATASETS. data_root: folder holding the datasets (layouts in the package docstring).
    download: fetch missing data from the official source (not possible for imagenet-1k).
    image_size: output side of imagenet-1k and cifar images (see image_transforms); smallnorb (96),
    mnist (28) and digits (8) keep their native sizes.
    source: 'files' (default, offline: the official files under data_root) or 'hub' (sst5, sst2, imdb only:
    the same data from the Hugging Face hub with the `datasets` library; data_root and download unused).
    'valid' is None for imdb, cifar10, cifar100, imagenet-1k, smallnorb, mnist and digits, which have
    no official validation split. A missing dataset raises FileNotFoundError naming the expected path.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if source not in DATA_SOURCES:
        raise UsageError(f"unknown data source {source!r}; known sources: {', '.join(DATA_SOURCES)}")
    if source == 'hub' and name not in HUB_DATASETS:
        raise UsageError(f"data source 'hub' offers {', '.join(HUB_DATASETS)} only (no hub dataset holds the same "
                         f"data as the official files of {name}); use data source 'files'")
    if name in ('sst5', 'sst2'):
        n_classes, modality = (5 if name == 'sst5' else 2), 'text'
        splits = load_sst(data_root, download, binary=(name == 'sst2'), source=source)
    elif name == 'imdb':
        splits, n_classes, modality = load_imdb(data_root, download, source=source), 2, 'text'
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


def split_fingerprint(dataset) -> str:
    """The sha256 (16 hex digits) of what a split holds: its examples and labels, whatever the source (files or
    hub) or the folder it was read from. Texts: every text and label (IMDB: every file's bytes); images: the
    pixel arrays and labels (CIFAR, MNIST, digits, smallNORB); ImageNet folders: each image's path below the
    root, size and label (not the pixels: 150 GB). None for a split that is absent, '?' for a dataset type not
    known here. train.py's --resume compares them, so a run never continues on other data."""
    import hashlib

    import numpy as np
    import torch
    if dataset is None:
        return None
    h = hashlib.sha256(type(dataset).__name__.encode())

    def add(value):
        if torch.is_tensor(value):
            value = value.detach().cpu().contiguous().numpy()
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype} {value.shape}".encode())
            h.update(memoryview(np.ascontiguousarray(value)).cast('B'))
        else:
            h.update(repr(value).encode('utf-8', 'surrogatepass'))
        h.update(b'\x00')

    labels = getattr(dataset, 'labels', None)
    if hasattr(dataset, 'paths'):                                    # TextFilesDataset: the files' bytes
        for path in dataset.paths:
            with open(path, 'rb') as f:
                add(f.read())
        add(list(labels))
    elif hasattr(dataset, 'texts'):                                  # TextDataset
        for text in dataset.texts:
            add(text)
        add(list(labels))
    elif hasattr(dataset, 'samples') and hasattr(dataset, 'root'):   # ImageFolder
        import os
        for path, label in dataset.samples:
            add((os.path.relpath(path, dataset.root), os.path.getsize(path), label))
    elif hasattr(dataset, 'data') and hasattr(dataset, 'targets'):  # CIFAR, MNIST
        add(dataset.data)
        add(dataset.targets if torch.is_tensor(dataset.targets) else list(dataset.targets))
    elif hasattr(dataset, 'images') and labels is not None:          # digits, smallNORB
        add(dataset.images)
        add(list(labels))
    else:
        return '?'
    return h.hexdigest()[:16]
