"""
get_dataset_splits: every dataset by name, as {'train', 'valid', 'test', 'n_classes', 'modality'}.

Imports data.text, data.images, data.smallnorb (the loaders).
"""

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
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; known sources: {', '.join(DATA_SOURCES)}")
    if source == 'hub' and name not in HUB_DATASETS:
        raise ValueError(f"data source 'hub' offers {', '.join(HUB_DATASETS)} only (no hub dataset holds the same "
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
