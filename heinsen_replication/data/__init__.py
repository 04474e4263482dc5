"""
Datasets for the routing experiments (the data layer).

    from heinsen_replication import data
    splits = data.get_dataset_splits('sst5', data_root='.data', download=False, image_size=224)
    splits['train'][0]   # -> ('The Rock is destined to be the 21st Century\'s new "Conan" and ...', 3)
    splits['valid']      # -> a Dataset, or None where the dataset has no official validation split
    splits['n_classes'], splits['modality']   # -> 5, 'text'

Command line: python -m heinsen_replication.data <name> [--data_root .data] [--download] [--data_source files|hub]
prints the split sizes (fetching missing data with --download); python -m heinsen_replication.data heinsen2019
--download fetches the 2019 weights.

Every split is a map-style torch Dataset (__len__, __getitem__). Items are:
    text   : (text: str, label: int); the dataset also exposes .texts (list[str]), .labels (list[int])
    image  : (image float tensor [C, H, W], label: int); imagenet-1k, cifar and mnist are torchvision datasets
             (.targets, .classes), digits a TensorImageDataset (.images, .labels)
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
source='hub' (sst5, sst2, imdb) loads the same data from the Hugging Face hub with the `datasets` library
instead of the files (SST: stanfordnlp/sst 'ptb', the same PTB trees; IMDB: stanfordnlp/imdb).

The package, bottom layer first (no module imports one above it; nothing here imports models):
    fileio     atomic writers (save_atomic, write_atomic), orphan cleanup, gzip-or-plain reading, check_labels
    downloads  official URLs, pinned checksums, verified download_and_extract, fetch_heinsen2019_weights
    text       SST (our PTB-tree reader: all subtrees) and IMDB, from the files or the hub (`datasets`)
    images     image_transforms; ImageNet (ImageFolder), CIFAR and MNIST (torchvision classes, our safe loading), digits
    smallnorb  the smallNORB binary format (our reader/writer) and SmallNorbDataset
    features   FeatureStore, CachedFeatures, pad_positions, collate_features, LengthGroupedBatchSampler
    splits     get_dataset_splits, DATASETS
The names below are re-exported from these modules. The constants (URLs, CHECKSUMS, ...) are read from
data.downloads at call time: to change one (a mirror, in a test), set it there, not on this package. (CIFAR's URL
and md5s are the class attributes of data.CIFAR10 / data.CIFAR100, torchvision's.)
"""

from .downloads import (CHECKSUMS, CIFAR10_URL, CIFAR100_URL, HEINSEN2019_URL, HEINSEN2019_WEIGHTS, IMAGENET_URL,
                        IMDB_HUB, IMDB_URL, MNIST_FILES, MNIST_URL, SMALLNORB_PREFIX, SMALLNORB_URL, SST_HUB,
                        SST_MEMBER_CHECKSUMS, SST_URL, ChecksumMismatchError, UnsafeArchiveError,
                        download_and_extract, extract_archive, fetch_heinsen2019_weights, file_checksum,
                        verify_checksum)
from .features import (CachedFeatures, FeatureStore, LengthGroupedBatchSampler, backbone_fingerprint,
                       collate_features, pad_positions)
from .fileio import check_labels, remove_orphans, save_atomic, write_atomic
from .images import (CIFAR10, CIFAR100, DIGITS_SEED, MNIST, TensorImageDataset, image_transforms, load_cifar,
                     load_digits_splits, load_imagenet, load_mnist, read_cifar_batch, read_idx, write_cifar_batch,
                     write_idx)
from .smallnorb import SmallNorbDataset, load_smallnorb, read_smallnorb_file, write_smallnorb_file
from .splits import DATA_SOURCES, DATASETS, HUB_DATASETS, get_dataset_splits, split_fingerprint
from .text import (TextDataset, TextFilesDataset, clean_imdb, detokenize, iter_subtrees, load_imdb, load_sst,
                   parse_ptb_lines, parse_ptb_tree, read_ptb_trees, sst_examples, sst_to_binary, tree_leaves)

__all__ = [
    # datasets by name
    'get_dataset_splits', 'split_fingerprint', 'DATASETS', 'DATA_SOURCES', 'HUB_DATASETS',
    # downloads and sources
    'download_and_extract', 'extract_archive', 'UnsafeArchiveError', 'fetch_heinsen2019_weights', 'file_checksum',
    'verify_checksum', 'ChecksumMismatchError',
    'CHECKSUMS', 'SST_MEMBER_CHECKSUMS', 'HEINSEN2019_WEIGHTS', 'HEINSEN2019_URL', 'SST_URL', 'IMDB_URL',
    'IMAGENET_URL', 'CIFAR10_URL', 'CIFAR100_URL', 'SMALLNORB_URL', 'MNIST_URL', 'SMALLNORB_PREFIX', 'MNIST_FILES',
    'SST_HUB', 'IMDB_HUB',
    # text
    'TextDataset', 'TextFilesDataset', 'parse_ptb_tree', 'parse_ptb_lines', 'read_ptb_trees', 'iter_subtrees',
    'tree_leaves', 'detokenize', 'sst_examples', 'sst_to_binary', 'clean_imdb', 'load_sst', 'load_imdb',
    # images
    'image_transforms', 'TensorImageDataset', 'CIFAR10', 'CIFAR100', 'MNIST', 'read_cifar_batch', 'write_cifar_batch',
    'read_idx',
    'write_idx', 'load_imagenet', 'load_cifar', 'load_mnist', 'load_digits_splits', 'DIGITS_SEED',
    # smallNORB
    'SmallNorbDataset', 'read_smallnorb_file', 'write_smallnorb_file', 'load_smallnorb',
    # features and batching
    'FeatureStore', 'CachedFeatures', 'backbone_fingerprint', 'pad_positions', 'collate_features',
    'LengthGroupedBatchSampler',
    # file I/O
    'save_atomic', 'write_atomic', 'remove_orphans', 'check_labels',
]
