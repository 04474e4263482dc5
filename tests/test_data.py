"""
Tests for the data layer (the data/ package). Every loader is exercised on tiny files written here into tmp_path in the exact
on-disk format of the real dataset; the real SST files are used only if present (read only).
"""

import gzip
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from heinsen_replication import data
from heinsen_replication.data import write_cifar_batch
from heinsen_replication.errors import UsageError
from tests.helpers.files import SST_DIR, write_smallnorb, write_sst

REPO_ROOT = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# SST: parser, detokenizer, splits

# expected deduplicated training phrases: roots first (file order), then pre-order phrases per tree
SST_TRAIN_EXPECTED = [
    ("It's good.", 3), ("It isn't good.", 1), ("(great)", 4),
    ("It", 2), ("'s good.", 3), ("'s good", 2), ("'s", 2), ("good", 3), (".", 2),
    ("isn't good.", 1), ("isn't good", 1), ("is", 2), ("n't good", 1), ("n't", 2),
    ("(", 2), ("great)", 4), ("great", 4), (")", 2),
]

def test_parse_ptb_tree():
    tree = data.parse_ptb_tree("(3 (2 It) (4 (2 's) (2 .)))\n")
    assert tree == (3, [(2, 'It'), (4, [(2, "'s"), (2, '.')])])
    assert data.tree_leaves(tree) == ['It', "'s", '.']
    assert [node[0] for node in data.iter_subtrees(tree)] == [3, 2, 4, 2, 2]  # pre-order
    assert data.parse_ptb_tree("(2 8\u00a01\\/2)") == (2, "8\u00a01\\/2")  # U+00A0 does not split words
    for bad in ["(3 (2 It)", "(3 (2 It)))", "(x (2 It))", "(3 (2 It) word)", "(3)", "word", "(2 a) (2 b)", ""]:
        with pytest.raises(ValueError):
            data.parse_ptb_tree(bad)


@pytest.mark.parametrize('tokens, text', [
    (['It', "'s", 'a', '-LRB-', 'great', '-RRB-', 'film', ',', 'is', "n't", 'it', '?'], "It's a (great) film, isn't it?"),
    (['I', "'m", 'sure', 'they', "'ll", 'go', ';', 'we', "'d", 'stay', ':', '100', '%', '!'], "I'm sure they'll go; we'd stay: 100%!"),
    (['We', "'re", 'here', ',', 'you', "'ve", 'gone', ',', 'I', 'ca', "n't", '.'], "We're here, you've gone, I can't."),
    (['``', 'Carmen', "''", 'is', '`', 'fun', "'"], "\"Carmen\" is 'fun'"),
    (['and\\/or', '\\*\\*\\*', 'stars'], "and/or *** stars"),
    (['2\u00a01\\/2', '  ', 'hours', '...'], "2 1/2 hours ..."),
    (['the', 'Girls', "'", 'film', 'DO', "N'T"], "the Girls' film DON'T"),
    ([], ''),
])
def test_detokenize(tokens, text):
    assert data.detokenize(tokens) == text


def test_sst5_and_sst2(tmp_path):
    write_sst(tmp_path / 'sst')
    s5 = data.get_dataset_splits('sst5', data_root=str(tmp_path))
    assert (s5['n_classes'], s5['modality']) == (5, 'text')
    assert list(zip(s5['train'].texts, s5['train'].labels)) == SST_TRAIN_EXPECTED
    assert [s5['train'][i] for i in range(len(s5['train']))] == SST_TRAIN_EXPECTED
    assert s5['valid'].texts == ['8 1/2 hours.', '"Wow"!', '"Wow"!'] and s5['valid'].labels == [2, 4, 4]
    assert list(zip(s5['test'].texts, s5['test'].labels)) == [('bad.', 0), ('fine!', 3)]
    assert isinstance(s5['train'][0][0], str) and isinstance(s5['train'][0][1], int)

    s2 = data.get_dataset_splits('sst2', data_root=str(tmp_path))
    assert (s2['n_classes'], s2['modality']) == (2, 'text')
    expected2 = [(t, int(y > 2)) for t, y in SST_TRAIN_EXPECTED if y != 2]
    assert list(zip(s2['train'].texts, s2['train'].labels)) == expected2 and len(expected2) == 10
    assert s2['valid'].labels == [1, 1] and s2['test'].labels == [0, 1]


def test_sst_in_trees_subfolder_as_unzipped(tmp_path):
    write_sst(tmp_path / 'sst' / 'trees')  # the official zip unpacks into trees/
    assert len(data.get_dataset_splits('sst5', data_root=str(tmp_path))['test']) == 2


def test_sst_malformed_file_names_the_line(tmp_path):
    write_sst(tmp_path / 'sst', test=["(0 (0 bad) (2 .))", "(3 (3 fine)"])
    with pytest.raises(ValueError, match=r'test\.txt, line 2'):
        data.get_dataset_splits('sst5', data_root=str(tmp_path))




@pytest.mark.slow
@pytest.mark.skipif(not (SST_DIR / 'test.txt').is_file(), reason=f"real SST not found at {SST_DIR} (set SST_DIR)")
def test_real_sst_counts(tmp_path):
    (tmp_path / 'sst').symlink_to(SST_DIR.resolve(), target_is_directory=True)  # no copy of the data
    s5 = data.get_dataset_splits('sst5', data_root=str(tmp_path))
    s2 = data.get_dataset_splits('sst2', data_root=str(tmp_path))
    assert (len(s5['test']), len(s5['valid'])) == (2210, 1101)
    assert (len(s2['test']), len(s2['valid'])) == (1821, 872)
    # regression values of the deduplicated training phrases (see data.sst_examples)
    assert (len(s5['train']), len(s2['train'])) == (159272, 77616)
    assert set(s5['train'].labels) == {0, 1, 2, 3, 4} and set(s2['train'].labels) == {0, 1}

# -----------------------------------------------------------------------------
# IMDB


def test_imdb(tmp_path):
    root = tmp_path / 'aclImdb'
    files = {
        'train/pos/1_9.txt': 'Great<br /><br />movie.', 'train/pos/0_10.txt': 'Loved it.',
        'train/neg/0_2.txt': 'Bad.<br/>Really bad.', 'test/pos/0_7.txt': 'Fine.', 'test/neg/0_1.txt': 'Awful.',
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding='utf-8')
    (root / 'train' / 'urls_pos.txt').write_text('ignored')  # extra files at the split level are ignored
    s = data.get_dataset_splits('imdb', data_root=str(tmp_path))
    assert (s['n_classes'], s['modality'], s['valid']) == (2, 'text', None)
    train = s['train']
    assert train._texts is None  # lazy: nothing read yet
    assert [train[i] for i in range(3)] == [('Bad. Really bad.', 0), ('Loved it.', 1), ('Great movie.', 1)]
    (root / 'train/pos/0_10.txt').write_text('Changed.')  # read on access, not up front
    assert train[1] == ('Changed.', 1)
    assert train.texts == ['Bad. Really bad.', 'Changed.', 'Great movie.'] and train.labels == [0, 1, 1]
    assert list(s['test']) == [('Awful.', 0), ('Fine.', 1)]

# -----------------------------------------------------------------------------
# images: transforms, ImageNet folder layout, CIFAR pickles


def test_image_transforms_shapes_and_normalization():
    white = Image.new('RGB', (60, 40), (255, 255, 255))
    x = data.image_transforms(24, train=False)(white)
    assert x.shape == (3, 24, 24) and torch.allclose(x, torch.ones_like(x))  # Normalize(0.5, 0.5): 1 -> 1
    x = data.image_transforms(24, train=False)(Image.new('RGB', (60, 40), (0, 0, 0)))
    assert torch.allclose(x, -torch.ones_like(x))
    torch.manual_seed(0)
    x = data.image_transforms(24, train=True)(Image.new('RGB', (60, 40), (10, 200, 30)))
    assert x.shape == (3, 24, 24) and x.min() >= -1 and x.max() <= 1


def write_jpeg(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, color).save(path, format='JPEG')


def test_imagenet_folder(tmp_path):
    root = tmp_path / 'imagenet'
    write_jpeg(root / 'train/n02/b.JPEG', (255, 255, 255))
    write_jpeg(root / 'train/n02/a.JPEG', (255, 255, 255))
    write_jpeg(root / 'train/n01/c.JPEG', (0, 0, 0))
    write_jpeg(root / 'val/n01/d.JPEG', (0, 0, 0))
    write_jpeg(root / 'val/n02/e.JPEG', (255, 255, 255), size=(50, 20))
    s = data.get_dataset_splits('imagenet-1k', data_root=str(tmp_path), image_size=32)
    assert (s['n_classes'], s['modality'], s['valid']) == (2, 'image', None)
    assert isinstance(s['train'], torchvision.datasets.ImageFolder)
    assert s['train'].targets == [0, 1, 1] and s['train'].classes == s['test'].classes == ['n01', 'n02']  # sorted wnids
    assert [os.path.basename(p) for p, _ in s['train'].samples] == ['c.JPEG', 'a.JPEG', 'b.JPEG']
    x, y = s['train'][1]
    assert x.shape == (3, 32, 32) and y == 1
    x, y = s['test'][1]
    assert x.shape == (3, 32, 32) and y == 1 and x.min() > 0.9  # white -> ~1 after Normalize(0.5, 0.5)
    x, y = s['test'][0]
    assert y == 0 and x.max() < -0.9

    write_jpeg(root / 'val/n03/f.JPEG', (0, 0, 0))  # val must have the same wnids as train
    with pytest.raises(ValueError, match='n03'):
        data.get_dataset_splits('imagenet-1k', data_root=str(tmp_path), image_size=32)





def test_cifar10(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'cifar-10-batches-py'
    train_images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    for i in range(5):
        write_cifar_batch(root / f'data_batch_{i + 1}', train_images[2 * i:2 * i + 2], [i, 9 - i], b'labels')
    red = np.zeros((2, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    write_cifar_batch(root / 'test_batch', red, [3, 7], b'labels')
    s = data.get_dataset_splits('cifar10', data_root=str(tmp_path), image_size=32)
    assert (s['n_classes'], s['modality'], s['valid']) == (10, 'image', None)
    assert isinstance(s['train'], torchvision.datasets.CIFAR10)
    assert len(s['train']) == 10 and s['train'].targets == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert np.array_equal(s['train'].data, train_images)  # planes -> HWC round trip
    assert s['train'].classes == [str(i) for i in range(10)]  # no batches.meta here: the indices
    x, y = s['test'][1]
    assert x.shape == (3, 32, 32) and y == 7
    assert torch.allclose(x[0], torch.ones(32, 32)) and torch.allclose(x[1:], -torch.ones(2, 32, 32))
    x, y = s['train'][0]
    assert x.shape == (3, 32, 32) and y == 0


def test_cifar100_upscaled(tmp_path):
    root = tmp_path / 'cifar-100-python'
    images = np.full((3, 32, 32, 3), 128, np.uint8)
    for split in ('train', 'test'):
        path = root / split
        write_cifar_batch(path, images, [5, 99, 0], b'fine_labels')
        with open(path, 'rb') as f:  # the real files also hold coarse labels
            batch = pickle.load(f)
        batch[b'coarse_labels'] = [1, 19, 0]
        with open(path, 'wb') as f:
            pickle.dump(batch, f)
    s = data.get_dataset_splits('cifar100', data_root=str(tmp_path), image_size=48)
    assert isinstance(s['test'], torchvision.datasets.CIFAR100)
    assert s['n_classes'] == 100 and s['test'].targets == [5, 99, 0]
    x, y = s['test'][1]
    assert x.shape == (3, 48, 48) and y == 99

def test_cifar_label_names_from_meta_and_torchvision_layout(tmp_path):
    """batches.meta (read with the restricted unpickler too) gives torchvision's .classes; the folder layout is
    torchvision's, so torchvision's own CIFAR10 class reads the same root (the data are the same)."""
    root = tmp_path / 'cifar-10-batches-py'
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        write_cifar_batch(root / name, images, [4, 2], b'labels')
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    with open(root / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [n.encode() for n in names], b'num_vis': 3072}, f)
    test = data.get_dataset_splits('cifar10', data_root=str(tmp_path), image_size=32)['test']
    assert test.classes == names and test.class_to_idx['deer'] == 4
    assert 'Split: Test' in repr(test)                                            # torchvision's repr
    with open(root / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': names[:3]}, f)
    with pytest.raises(ValueError, match=r"batches\.meta: expected b'label_names', a list of 10 label names"):
        data.get_dataset_splits('cifar10', data_root=str(tmp_path), image_size=32)


def cifar_archive(tmp_path, tamper=None):
    """A CIFAR-10-shaped .tar.gz (tiny batches) -> (its file:// URL, {file name: md5}); tamper: a file name whose
    bytes change after its md5 was taken (as if altered inside a correctly-checksummed archive)."""
    src = tmp_path / 'src' / 'cifar-10-batches-py'
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for k, name in enumerate(names):
        write_cifar_batch(src / name, np.full((1, 32, 32, 3), k, np.uint8), [k], b'labels')
    with open(src / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [b'c%d' % i for i in range(10)]}, f)
    md5s = {name: data.file_checksum(str(src / name), 'md5') for name in names + ['batches.meta']}
    if tamper:
        write_cifar_batch(src / tamper, np.zeros((1, 32, 32, 3), np.uint8), [9], b'labels')
    archive = tmp_path / 'mirror' / 'cifar-10-python.tar.gz'
    archive.parent.mkdir()
    with tarfile.open(archive, 'w:gz') as t:
        t.add(src, arcname='cifar-10-batches-py')
    return archive.as_uri(), md5s


@pytest.mark.parametrize('tamper', [None, 'data_batch_3'])
def test_cifar_download_verifies_archive_and_files(tmp_path, monkeypatch, tamper):
    """download=True: torchvision's file lists and md5s, our verified download (the archive's checksum, then every
    unpacked file's md5 before anything is moved into place). The URL and md5s here are a local mirror's."""
    mirror_url, md5s = cifar_archive(tmp_path, tamper)

    class MirroredCIFAR10(data.CIFAR10):                     # torchvision's class attributes, pointed at the mirror
        train_list = [[f'data_batch_{i}', md5s[f'data_batch_{i}']] for i in range(1, 6)]
        test_list = [['test_batch', md5s['test_batch']]]
        meta = {**data.CIFAR10.meta, 'md5': md5s['batches.meta']}
        url = mirror_url

    monkeypatch.setitem(data.downloads.CHECKSUMS, mirror_url, 'sha256:' + data.file_checksum(mirror_url[len('file://'):]))
    root = tmp_path / 'root'
    if tamper:
        with pytest.raises(data.ChecksumMismatchError, match='cifar-10-batches-py/data_batch_3'):
            MirroredCIFAR10(str(root), train=True, download=True)
        assert os.listdir(root) == []                                               # nothing moved into place
        return
    train = MirroredCIFAR10(str(root), train=True, download=True)
    assert train.targets == [0, 1, 2, 3, 4] and train.classes[3] == 'c3' and len(os.listdir(root)) == 1
    assert MirroredCIFAR10(str(root), train=False, download=True).targets == [5]    # present: not fetched again

# -----------------------------------------------------------------------------
# smallNORB binary format


def test_smallnorb_format_by_hand(tmp_path):
    # int32 'cat' file, written byte by byte: magic, ndim=1, three dims (unused ones = 1), data; little-endian
    cat_bytes = (bytes.fromhex('544c3d1e') + bytes.fromhex('01000000') + bytes.fromhex('03000000')
                 + bytes.fromhex('01000000') * 2 + struct.pack('<3i', 4, 0, 2))
    (tmp_path / 'cat.mat').write_bytes(cat_bytes)
    cat = data.read_smallnorb_file(str(tmp_path / 'cat.mat'))
    assert cat.shape == (3,) and cat.dtype == np.int32 and cat.tolist() == [4, 0, 2]
    data.write_smallnorb_file(str(tmp_path / 'cat2.mat'), np.array([4, 0, 2], dtype=np.int64))
    assert (tmp_path / 'cat2.mat').read_bytes() == cat_bytes

    # uint8 'dat' file with ndim=4: 4 dims, no padding dims
    dat_bytes = struct.pack('<6i', 0x1E3D4C55, 4, 1, 2, 2, 2) + bytes(range(8))
    assert dat_bytes[:4] == b'\x55\x4c\x3d\x1e'
    (tmp_path / 'dat.mat').write_bytes(dat_bytes)
    dat = data.read_smallnorb_file(str(tmp_path / 'dat.mat'))
    assert dat.shape == (1, 2, 2, 2) and dat.dtype == np.uint8 and dat.ravel().tolist() == list(range(8))
    data.write_smallnorb_file(str(tmp_path / 'dat2.mat'), np.arange(8, dtype=np.uint8).reshape(1, 2, 2, 2))
    assert (tmp_path / 'dat2.mat').read_bytes() == dat_bytes

    # gzipped (as downloaded) reads the same; a truncated file is rejected
    (tmp_path / 'cat.mat.gz').write_bytes(gzip.compress(cat_bytes))
    assert data.read_smallnorb_file(str(tmp_path / 'cat.mat.gz')).tolist() == [4, 0, 2]
    (tmp_path / 'bad.mat').write_bytes(cat_bytes[:-4])
    with pytest.raises(ValueError):
        data.read_smallnorb_file(str(tmp_path / 'bad.mat'))


def test_smallnorb_dataset(tmp_path):
    write_smallnorb(tmp_path / 'smallnorb')
    s = data.get_dataset_splits('smallnorb', data_root=str(tmp_path))
    assert (s['n_classes'], s['modality'], s['valid']) == (5, 'stereo', None)
    x, y = s['test'][2]
    assert x.shape == (2, 96, 96) and x.dtype == torch.float32 and y == 2
    assert torch.allclose(x[0], torch.full((96, 96), 20 / 255)) and torch.allclose(x[1], torch.full((96, 96), 202 / 255))
    assert s['test'].info.shape == (3, 4) and s['test'].info[2].tolist() == [2, 3, 4, 5]
    assert s['train'].labels == [0, 1, 2]

    # training items: replicate-pad 16 pixels, random 96x96 crop -> a shifted ramp with clamped edges
    torch.manual_seed(0)
    shifts = set()
    for _ in range(10):
        x, y = s['train'][0]
        assert x.shape == (2, 96, 96) and y == 0 and torch.allclose(x[1], torch.full((96, 96), 200 / 255))
        row = (x[0, 50] * 255).round().long()
        assert torch.equal(x[0], x[0, :1].expand(96, 96))  # rows unchanged by a vertical shift
        shift = int(row[48]) - 48
        assert -16 <= shift <= 16 and torch.equal(row, (torch.arange(96) + shift).clamp(0, 95))
        shifts.add(shift)
    assert len(shifts) > 1  # actually random


def test_smallnorb_mismatched_files(tmp_path):
    write_smallnorb(tmp_path / 'smallnorb')
    data.write_smallnorb_file(str(tmp_path / 'smallnorb' / f"{data.SMALLNORB_PREFIX['test']}cat.mat"), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match='disagree'):
        data.get_dataset_splits('smallnorb', data_root=str(tmp_path))

# -----------------------------------------------------------------------------
# MNIST IDX files


def test_idx_format(tmp_path):
    hand = bytes([0, 0, 0x08, 0x01]) + (3).to_bytes(4, 'big') + bytes([7, 0, 9])  # labels, big-endian dims
    (tmp_path / 'labels').write_bytes(hand)
    assert data.read_idx(str(tmp_path / 'labels')).tolist() == [7, 0, 9]
    data.write_idx(str(tmp_path / 'labels2'), np.array([7, 0, 9], np.uint8))
    assert (tmp_path / 'labels2').read_bytes() == hand
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28).astype(np.uint8)
    data.write_idx(str(tmp_path / 'images.gz'), images, gzip=True)
    raw = gzip.decompress((tmp_path / 'images.gz').read_bytes())
    assert raw[:16] == bytes([0, 0, 8, 3]) + struct.pack('>3i', 2, 28, 28)
    assert np.array_equal(data.read_idx(str(tmp_path / 'images.gz')), images)
    ints = np.array([[1, -2], [300000, 4]], np.int32)
    data.write_idx(str(tmp_path / 'ints'), ints)
    assert np.array_equal(data.read_idx(str(tmp_path / 'ints')), ints)


def test_mnist_gz_and_plain(tmp_path):
    root = tmp_path / 'mnist'
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    train_images[0] = 255
    data.write_idx(str(root / 'train-images-idx3-ubyte.gz'), train_images, gzip=True)
    data.write_idx(str(root / 'train-labels-idx1-ubyte'), np.array([3, 1, 4, 1, 5], np.uint8))
    data.write_idx(str(root / 't10k-images-idx3-ubyte'), train_images[:2])
    data.write_idx(str(root / 't10k-labels-idx1-ubyte.gz'), np.array([9, 2], np.uint8), gzip=True)
    s = data.get_dataset_splits('mnist', data_root=str(tmp_path))
    assert (s['n_classes'], s['modality'], s['valid']) == (10, 'image', None)
    assert isinstance(s['train'], torchvision.datasets.MNIST)
    assert (len(s['train']), len(s['test'])) == (5, 2) and s['test'].targets.tolist() == [9, 2]
    x, y = s['train'][0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3 and torch.all(x == 1)
    x, y = s['train'][2]
    assert torch.allclose(x[0], torch.from_numpy(train_images[2]).float() / 255) and y == 4

# -----------------------------------------------------------------------------
# digits (scikit-learn)


def test_digits():
    pytest.importorskip('sklearn')
    s = data.get_dataset_splits('digits')
    assert (s['n_classes'], s['modality'], s['valid']) == (10, 'image', None)
    assert (len(s['train']), len(s['test'])) == (1347, 450)
    x, y = s['test'][0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and 0 <= y <= 9
    assert max(s['train'][i][0].max().item() for i in range(50)) == 1.0  # 16 -> 1
    counts = np.bincount(s['test'].labels, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # stratified: ~45 per class
    again = data.get_dataset_splits('digits')  # fixed seed: the same split every time
    assert again['test'].labels == s['test'].labels and torch.equal(again['test'].images, s['test'].images)

# -----------------------------------------------------------------------------
# the online source: the `datasets` library (Hugging Face hub). The hub is never reached: datasets.load_dataset,
# the public boundary, is replaced by one that returns the hub's layout built here from the same data.


def fake_load_dataset(monkeypatch, expected, splits):
    """datasets.load_dataset(*expected) -> a DatasetDict of `splits` ({split: {column: values}}); records calls."""
    datasets = pytest.importorskip('datasets')
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        assert (path, name) == expected
        return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})

    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    return calls


def sst_hub_splits(folder):
    """The hub's stanfordnlp/sst 'ptb' config: one ptb_tree per line of trees/{train,dev,test}.txt."""
    read = lambda name: [line.rstrip('\n') for line in open(folder / name, encoding='utf-8') if line.strip()]  # noqa: E731
    return {'train': {'ptb_tree': read('train.txt')}, 'validation': {'ptb_tree': read('dev.txt')},
            'test': {'ptb_tree': read('test.txt')}}


def assert_same_text_splits(a, b):
    for split in ('train', 'valid', 'test'):
        assert a[split].texts == b[split].texts and a[split].labels == b[split].labels, split
    assert (a['n_classes'], a['modality']) == (b['n_classes'], b['modality'])


@pytest.mark.parametrize('name', ['sst5', 'sst2'])
def test_sst_from_the_hub_equals_the_files(tmp_path, monkeypatch, name):
    write_sst(tmp_path / 'sst')
    calls = fake_load_dataset(monkeypatch, ('stanfordnlp/sst', 'ptb'), sst_hub_splits(tmp_path / 'sst'))
    hub = data.get_dataset_splits(name, data_root=str(tmp_path / 'nothing'), source='hub')
    assert calls == [('stanfordnlp/sst', 'ptb')]
    assert_same_text_splits(hub, data.get_dataset_splits(name, data_root=str(tmp_path)))


@pytest.mark.slow
@pytest.mark.skipif(not (SST_DIR / 'test.txt').is_file(), reason=f"real SST not found at {SST_DIR} (set SST_DIR)")
def test_real_sst_from_the_hub_layout_equals_the_files(tmp_path, monkeypatch):
    (tmp_path / 'sst').symlink_to(SST_DIR.resolve(), target_is_directory=True)
    fake_load_dataset(monkeypatch, ('stanfordnlp/sst', 'ptb'), sst_hub_splits(tmp_path / 'sst'))
    hub = data.get_dataset_splits('sst5', source='hub')
    assert (len(hub['train']), len(hub['valid']), len(hub['test'])) == (159272, 1101, 2210)
    assert_same_text_splits(hub, data.get_dataset_splits('sst5', data_root=str(tmp_path)))


def test_sst_from_the_hub_bad_tree_names_the_split_and_line(monkeypatch):
    splits = {'train': {'ptb_tree': ['(3 (3 good) (2 .))']}, 'validation': {'ptb_tree': ['(2 (2 ok) (2 .))', '(9 x)']},
              'test': {'ptb_tree': ['(1 (1 bad) (2 .))']}}
    fake_load_dataset(monkeypatch, ('stanfordnlp/sst', 'ptb'), splits)
    with pytest.raises(ValueError, match=r"stanfordnlp/sst \(ptb\) validation, line 2: label 9 is out of range"):
        data.get_dataset_splits('sst5', source='hub')


def test_imdb_from_the_hub(monkeypatch):
    splits = {'train': {'text': ['Great<br /><br />movie.', 'Bad.'], 'label': [1, 0]},
              'test': {'text': ['Fine.'], 'label': [1]}, 'unsupervised': {'text': ['?'], 'label': [-1]}}
    calls = fake_load_dataset(monkeypatch, ('stanfordnlp/imdb', 'plain_text'), splits)
    s = data.get_dataset_splits('imdb', source='hub')
    assert calls and (s['n_classes'], s['modality'], s['valid']) == (2, 'text', None)
    assert list(s['train']) == [('Great movie.', 1), ('Bad.', 0)] and s['test'].texts == ['Fine.']  # cleaned as files
    splits['test']['label'] = [2]
    with pytest.raises(ValueError, match=r"stanfordnlp/imdb \(plain_text\) test: label 2 at index 0 is out of range"):
        data.get_dataset_splits('imdb', source='hub')


def test_hub_unreachable_or_not_offered(monkeypatch):
    datasets = pytest.importorskip('datasets')

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(UsageError, match=r"Could not load SST from the Hugging Face hub.*offline.*'files'"):
        data.get_dataset_splits('sst5', source='hub')
    with pytest.raises(ValueError, match=r"data source 'hub' offers sst5, sst2, imdb only"):
        data.get_dataset_splits('cifar10', source='hub')
    with pytest.raises(ValueError, match='unknown data source'):
        data.get_dataset_splits('sst5', source='web')

# -----------------------------------------------------------------------------
# errors and downloading


@pytest.mark.parametrize('name, url', [
    ('sst5', 'trainDevTestTrees_PTB.zip'), ('sst2', 'trainDevTestTrees_PTB.zip'), ('imdb', 'aclImdb_v1.tar.gz'),
    ('cifar10', 'cifar-10-python.tar.gz'), ('cifar100', 'cifar-100-python.tar.gz'),
    ('smallnorb', 'cs.nyu.edu'), ('mnist', 'storage.googleapis.com'), ('imagenet-1k', 'image-net.org'),
])
def test_missing_dataset_message(tmp_path, name, url):
    with pytest.raises(UsageError) as e:
        data.get_dataset_splits(name, data_root=str(tmp_path))
    message = str(e.value)
    assert str(tmp_path) in message and url in message and '--download' in message


def test_unknown_dataset():
    with pytest.raises(ValueError) as e:
        data.get_dataset_splits('sst3')
    assert all(name in str(e.value) for name in data.DATASETS)


def test_download_unreachable(tmp_path):
    with pytest.raises(UsageError, match='127.0.0.1'):
        data.download_and_extract('http://127.0.0.1:9/nothing.zip', str(tmp_path / 'dest'), checksum='sha256:00')
    assert not (tmp_path / 'dest').exists()     # no temporary file, nor the folder it made, left behind
    (tmp_path / 'kept').mkdir()
    with pytest.raises(UsageError, match='127.0.0.1'):
        data.download_and_extract('http://127.0.0.1:9/nothing.zip', str(tmp_path / 'kept'), checksum='sha256:00')
    assert os.listdir(tmp_path / 'kept') == []  # a folder that was there stays, empty


def test_download_and_extract_local_archives(tmp_path):
    # file:// URLs exercise the download + unpack path offline
    write_sst(tmp_path / 'src' / 'trees')
    with zipfile.ZipFile(tmp_path / 'trees.zip', 'w') as z:
        for f in ('train.txt', 'dev.txt', 'test.txt'):
            z.write(tmp_path / 'src' / 'trees' / f, f'trees/{f}')
    data.download_and_extract((tmp_path / 'trees.zip').as_uri(), str(tmp_path / 'root' / 'sst'),
                              checksum='md5:' + data.file_checksum(tmp_path / 'trees.zip', 'md5'))
    assert len(data.get_dataset_splits('sst5', data_root=str(tmp_path / 'root'))['train']) == len(SST_TRAIN_EXPECTED)

    with tarfile.open(tmp_path / 'a.tar.gz', 'w:gz') as t:
        t.add(tmp_path / 'src', arcname='folder')
    data.download_and_extract((tmp_path / 'a.tar.gz').as_uri(), str(tmp_path / 'out'),
                              checksum='sha256:' + data.file_checksum(tmp_path / 'a.tar.gz'))
    assert (tmp_path / 'out' / 'folder' / 'trees' / 'dev.txt').read_text() == (tmp_path / 'src' / 'trees' / 'dev.txt').read_text()

    (tmp_path / 'x.mat.gz').write_bytes(gzip.compress(b'payload'))
    data.download_and_extract((tmp_path / 'x.mat.gz').as_uri(), str(tmp_path / 'out'),
                              checksum='sha256:' + data.file_checksum(tmp_path / 'x.mat.gz'))
    assert (tmp_path / 'out' / 'x.mat').read_bytes() == b'payload'
    assert sorted(os.listdir(tmp_path / 'out')) == ['folder', 'x.mat']  # no temporary leftovers


@pytest.mark.slow                                  # subprocesses: python -m heinsen_replication.data, a full import each
def test_command_line(tmp_path):
    """python -m heinsen_replication.data <name> [--data_root] [--download] [--data_source]: split sizes, or a clear error."""
    import subprocess
    write_sst(tmp_path / 'sst')
    run = lambda *args: subprocess.run([sys.executable, '-m', 'heinsen_replication.data', *args], cwd=REPO_ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    out = run('sst5', '--data_root', str(tmp_path))
    assert out.returncode == 0 and out.stdout.splitlines()[:3] == ['train: 18', 'valid: 3', 'test: 2'], out.stderr
    out = run('imdb', '--data_root', str(tmp_path))
    assert out.returncode == 2 and 'aclImdb' in out.stderr and '--download' in out.stderr and 'Traceback' not in out.stderr
    out = run('mnist', '--data_source', 'hub')
    assert out.returncode == 2 and "offers sst5, sst2, imdb only" in out.stderr


@pytest.mark.slow                                  # a fresh interpreter per module
def test_the_data_layer_is_layered():
    """data/ modules import only modules listed before them (bottom layer first), and nothing imports models."""
    import ast
    import subprocess
    order = ['fileio', 'downloads', 'text', 'images', 'smallnorb', 'features', 'splits', '__main__']
    assert sorted(p.stem for p in (REPO_ROOT / 'heinsen_replication' / 'data').glob('*.py')) == sorted(order + ['__init__'])
    for k, name in enumerate(order):
        tree = ast.parse((REPO_ROOT / 'heinsen_replication' / 'data' / f'{name}.py').read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                top = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or '']
                assert not any(t.split('.')[0] in ('models', 'train', 'data') for t in top), (name, top)
        assert imported <= set(order[:k]), (name, imported - set(order[:k]))
    out = subprocess.run([sys.executable, '-c', 'import sys; from heinsen_replication import data; assert "heinsen_replication.models" not in sys.modules'], cwd=REPO_ROOT)
    assert out.returncode == 0


def test_failed_sst_download_leaves_nothing_and_says_where_to_put_the_files(tmp_path, monkeypatch):
    """First contact without network: no empty .data/sst/ left behind (a later copy or link would nest inside it),
    and the error names the three files and the folder they go to."""
    monkeypatch.setattr(data.downloads, 'SST_URL', (tmp_path / 'unreachable.zip').as_uri())
    with pytest.raises(UsageError, match=r"put its three PTB tree files trees/train.txt, trees/dev.txt and "
                                           r"trees/test.txt into .*/root/sst/"):
        data.get_dataset_splits('sst5', data_root=str(tmp_path / 'root'), download=True)
    assert not (tmp_path / 'root' / 'sst').exists()
