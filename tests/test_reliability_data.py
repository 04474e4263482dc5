"""Issue 11, data side: nothing runs from a file, nothing unverified is kept, nothing is silently wrong.
Verified downloads (file:// URLs, offline), archive member checks, the restricted CIFAR unpickler, label
validation, clear errors for bad files, durable atomic writes, and the feature cache's integrity (two
real processes writing one cache, truncation, a corrupt index, keys on the backbone's weights)."""
import gzip
import io
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from heinsen_replication import data
from heinsen_replication.data import write_cifar_batch
from heinsen_replication.errors import UsageError
from tests.helpers.files import PUBLISHED_2019, SST_DIR, write_smallnorb, write_sst

REPO_ROOT = Path(__file__).resolve().parents[1]


def sha256(path):
    return 'sha256:' + data.file_checksum(str(path))

# -----------------------------------------------------------------------------
# verified downloads


def test_every_download_has_a_pinned_checksum():
    urls = [data.IMDB_URL, data.CIFAR10_URL, data.CIFAR100_URL]
    urls += [data.MNIST_URL + name + '.gz' for names in data.MNIST_FILES.values() for name in names]
    urls += [data.SMALLNORB_URL + prefix + kind + '.mat.gz' for prefix in data.SMALLNORB_PREFIX.values()
             for kind in ('dat', 'cat', 'info')]
    for url in urls:
        algorithm, _, digest = data.CHECKSUMS[url].partition(':')
        assert len(digest) == {'md5': 32, 'sha256': 64}[algorithm], url
    assert data.CHECKSUMS[data.CIFAR10_URL] == 'md5:c58f30108f718f92721af3b95e74349a'   # the CIFAR page's md5
    assert set(data.SST_MEMBER_CHECKSUMS) == {'trees/train.txt', 'trees/dev.txt', 'trees/test.txt'}
    assert len(data.HEINSEN2019_WEIGHTS) == 3
    with pytest.raises(ValueError, match='pinned checksum'):                         # no unverified download
        data.download_and_extract('file:///nothing.zip', '/tmp/x')


@pytest.mark.skipif(not (SST_DIR / 'test.txt').is_file(), reason=f"real SST not found at {SST_DIR}")
def test_sst_member_checksums_match_the_real_files():
    for member, checksum in data.SST_MEMBER_CHECKSUMS.items():
        data.verify_checksum(str(SST_DIR / os.path.basename(member)), checksum, member)


def test_download_mismatch_is_refused_and_nothing_kept(tmp_path):
    (tmp_path / 'x.mat.gz').write_bytes(gzip.compress(b'payload'))
    dest = tmp_path / 'dest'
    with pytest.raises(data.ChecksumMismatchError, match='x.mat.gz.*tampered'):
        data.download_and_extract((tmp_path / 'x.mat.gz').as_uri(), str(dest), checksum='sha256:' + '0' * 64)
    assert os.listdir(dest) == []
    with pytest.raises(data.ChecksumMismatchError):
        data.download_and_extract((tmp_path / 'x.mat.gz').as_uri(), str(dest), checksum='md5:' + '0' * 32)
    assert os.listdir(dest) == []
    data.download_and_extract((tmp_path / 'x.mat.gz').as_uri(), str(dest), checksum=sha256(tmp_path / 'x.mat.gz'))
    assert (dest / 'x.mat').read_bytes() == b'payload'


def test_sst_download_verifies_the_tree_files(tmp_path, monkeypatch):
    """The SST zip is checked member by member (SST_MEMBER_CHECKSUMS); a tampered tree file is refused."""
    write_sst(tmp_path / 'src' / 'trees')
    with zipfile.ZipFile(tmp_path / 'sst.zip', 'w') as z:
        for f in ('train.txt', 'dev.txt', 'test.txt'):
            z.write(tmp_path / 'src' / 'trees' / f, f'trees/{f}')
    good = {f'trees/{f}': sha256(tmp_path / 'src' / 'trees' / f) for f in ('train.txt', 'dev.txt', 'test.txt')}
    monkeypatch.setattr(data.downloads, 'SST_URL', (tmp_path / 'sst.zip').as_uri())
    monkeypatch.setattr(data.downloads, 'SST_MEMBER_CHECKSUMS', {**good, 'trees/dev.txt': 'sha256:' + '1' * 64})
    with pytest.raises(data.ChecksumMismatchError, match='trees/dev.txt'):
        data.get_dataset_splits('sst5', data_root=str(tmp_path / 'root'), download=True)
    assert os.listdir(tmp_path / 'root' / 'sst') == []                              # nothing moved into place
    monkeypatch.setattr(data.downloads, 'SST_MEMBER_CHECKSUMS', good)
    assert len(data.get_dataset_splits('sst5', data_root=str(tmp_path / 'root'), download=True)['test']) == 2


def test_mnist_download_is_verified(tmp_path, monkeypatch):
    src = tmp_path / 'mirror'
    src.mkdir()
    data.write_idx(str(src / 'train-images-idx3-ubyte.gz'), np.zeros((2, 28, 28), np.uint8), gzip=True)
    monkeypatch.setattr(data.downloads, 'MNIST_URL', src.as_uri() + '/')
    monkeypatch.setattr(data.downloads, 'CHECKSUMS', {src.as_uri() + '/train-images-idx3-ubyte.gz': 'sha256:' + 'a' * 64})
    with pytest.raises(data.ChecksumMismatchError, match='train-images-idx3-ubyte.gz'):
        data.get_dataset_splits('mnist', data_root=str(tmp_path), download=True)
    assert not (tmp_path / 'mnist' / 'train-images-idx3-ubyte').exists()

# -----------------------------------------------------------------------------
# the 2019 published weights


@pytest.mark.skipif(PUBLISHED_2019 is None, reason="the published 2019 weights are not present")
@pytest.mark.slow
def test_fetch_heinsen2019_weights_verified(tmp_path):
    base_url = PUBLISHED_2019.resolve().as_uri() + '/'
    dest = tmp_path / 'heinsen2019'
    paths = data.fetch_heinsen2019_weights(str(dest), base_url=base_url)
    assert sorted(paths) == sorted(data.HEINSEN2019_WEIGHTS)
    for name, path in paths.items():
        assert Path(path).read_bytes() == (PUBLISHED_2019 / name).read_bytes()
    state = torch.load(paths['SST5R_pretrained_model_state_dict.pt'], map_location='cpu', weights_only=True)
    assert isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
    assert data.fetch_heinsen2019_weights(str(dest), base_url='file:///nonexistent/') == paths   # present: verified

    # a tampered copy at the source: refused, never kept
    mirror = tmp_path / 'mirror'
    shutil.copytree(PUBLISHED_2019, mirror)
    os.chmod(mirror / 'SST2R_pretrained_model_state_dict.pt', 0o644)
    with open(mirror / 'SST2R_pretrained_model_state_dict.pt', 'r+b') as f:
        f.seek(1000)
        f.write(b'\x00\x01')
    dest2 = tmp_path / 'dest2'
    with pytest.raises(data.ChecksumMismatchError, match='SST2R_pretrained_model_state_dict.pt'):
        data.fetch_heinsen2019_weights(str(dest2), base_url=mirror.as_uri() + '/')
    assert not (dest2 / 'SST2R_pretrained_model_state_dict.pt').exists()
    assert not [n for n in os.listdir(dest2) if n.startswith('.')]                  # no temporary leftovers

    # a tampered file already present: refused
    os.chmod(dest / 'SST5R_pretrained_model_state_dict.pt', 0o644)
    with open(dest / 'SST5R_pretrained_model_state_dict.pt', 'ab') as f:
        f.write(b'x')
    with pytest.raises(data.ChecksumMismatchError, match='SST5R'):
        data.fetch_heinsen2019_weights(str(dest), base_url=base_url)

    # the command line (never the network: a file:// mirror)
    cli = [sys.executable, '-m', 'heinsen_replication.data', 'heinsen2019', '--data_root', str(tmp_path / 'cli')]
    out = subprocess.run(cli, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and 'pass --download' in out.stderr and 'Traceback' not in out.stderr
    out = subprocess.run(cli + ['--download', '--base_url', base_url], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.count('sha256 verified') == 3, out.stderr
    out = subprocess.run(cli + ['--download', '--base_url', mirror.as_uri() + '/', '--data_root', str(tmp_path / 'cli2')],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and 'error: ' in out.stderr and 'does not have its pinned sha256' in out.stderr


# -----------------------------------------------------------------------------
# archive members outside the destination


def crafted_tar(path, name=None, link=None):
    with tarfile.open(path, 'w:gz') as t:
        info = tarfile.TarInfo('ok/fine.txt')
        info.size = 2
        t.addfile(info, io.BytesIO(b'ok'))
        if name is not None:
            info = tarfile.TarInfo(name)
            info.size = 4
            t.addfile(info, io.BytesIO(b'evil'))
        if link is not None:
            info = tarfile.TarInfo('ok/link')
            info.type, info.linkname = tarfile.SYMTYPE, link
            t.addfile(info)


@pytest.mark.parametrize('has_data_filter', [True, False])
@pytest.mark.parametrize('name, link', [('../../escaped.txt', None), ('/tmp/escaped-abs.txt', None),
                                        (None, '../../../escaped-dir')])
def test_tar_members_outside_dest_are_refused(tmp_path, monkeypatch, has_data_filter, name, link):
    if not has_data_filter:                                   # as on Python 3.10.0-3.10.11, 3.11.0-3.11.3
        monkeypatch.delattr(tarfile, 'data_filter', raising=False)
    archive = tmp_path / 'a.tar.gz'
    crafted_tar(archive, name, link)
    dest = tmp_path / 'deep' / 'dest'
    with pytest.raises(ValueError, match='outside'):
        data.download_and_extract(archive.as_uri(), str(dest), checksum=sha256(archive))
    assert not (tmp_path / 'deep' / 'escaped.txt').exists() and not (tmp_path / 'escaped.txt').exists()
    assert not os.path.exists('/tmp/escaped-abs.txt')
    assert os.listdir(dest) == []                                                   # nothing extracted at all

# -----------------------------------------------------------------------------
# CIFAR: no code runs from a batch file; clear errors


class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / 'cifar-10-batches-py'
    for i in range(5):
        write_cifar_batch(root / f'data_batch_{i + 1}', np.zeros((1, 32, 32, 3), np.uint8), [1], b'labels')
    with open(root / 'test_batch', 'wb') as f:
        pickle.dump({b'data': np.zeros((1, 3072), np.uint8), b'labels': [RunsCode()]}, f)
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR python batch.*refusing to load posix.system"):
        data.get_dataset_splits('cifar10', data_root=str(tmp_path), image_size=32)
    assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_cifar_restricted_unpickler_reads_real_format(tmp_path, protocol):
    images = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(tmp_path / 'b', 'wb') as f:
        pickle.dump({b'batch_label': b'x', b'labels': [0, 9, 3], b'data': images, b'filenames': [b'a'] * 3}, f,
                    protocol=protocol)
    x, y = data.read_cifar_batch(str(tmp_path / 'b'), b'labels', 10)
    assert y == [0, 9, 3] and np.array_equal(x, images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_bad_files_name_the_file(tmp_path):
    (tmp_path / 'html').write_bytes(b'<!DOCTYPE html><html><body>503 Service Unavailable</body></html>')
    with pytest.raises(ValueError, match=r'html is not a CIFAR python batch \(it looks like an HTML page'):
        data.read_cifar_batch(str(tmp_path / 'html'), b'labels', 10)
    with open(tmp_path / 'nokeys', 'wb') as f:
        pickle.dump({b'data': np.zeros((1, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"nokeys is not a CIFAR python batch: expected a dict with keys b'data' and b'labels'"):
        data.read_cifar_batch(str(tmp_path / 'nokeys'), b'labels', 10)
    with open(tmp_path / 'shape', 'wb') as f:
        pickle.dump({b'data': np.zeros((1, 100), np.uint8), b'labels': [1]}, f)
    with pytest.raises(ValueError, match=r"shape: b'data' must be a uint8 array \[N, 3072\]"):
        data.read_cifar_batch(str(tmp_path / 'shape'), b'labels', 10)


@pytest.mark.parametrize('bad', [10, -1])
def test_cifar_labels_out_of_range(tmp_path, bad):
    write_cifar_batch(tmp_path / 'b', np.zeros((3, 32, 32, 3), np.uint8), [1, bad, 2], b'labels')
    with pytest.raises(ValueError, match=rf"b: label {bad} at index 1 is out of range \(expected an integer in 0..9\)"):
        data.read_cifar_batch(str(tmp_path / 'b'), b'labels', 10)
    write_cifar_batch(tmp_path / 'c', np.zeros((1, 32, 32, 3), np.uint8), [100], b'fine_labels')
    with pytest.raises(ValueError, match='label 100 at index 0'):
        data.read_cifar_batch(str(tmp_path / 'c'), b'fine_labels', 100)

# -----------------------------------------------------------------------------
# SST: labels, encodings, missing files, empty splits


@pytest.mark.parametrize('label', [7, -1, 5])
def test_sst_label_out_of_range_names_file_and_line(tmp_path, label):
    write_sst(tmp_path / 'sst', dev=["(2 (2 fine) (2 .))", f"(3 (3 good) ({label} .))"])
    with pytest.raises(ValueError, match=rf"dev\.txt, line 2: label {label} is out of range"):
        data.get_dataset_splits('sst5', data_root=str(tmp_path))


def test_sst_latin1_and_binary_files_name_the_path(tmp_path):
    write_sst(tmp_path / 'sst')
    (tmp_path / 'sst' / 'train.txt').write_bytes("(3 (3 caf\u00e9) (2 .))\n(2 (2 na\u00efve) (2 .))\n".encode('utf-8')
                                                 + "(3 (3 fa\u00e7ade) (2 .))\n".encode('latin-1'))
    with pytest.raises(ValueError, match=r"train\.txt, line 3: not UTF-8 text"):
        data.get_dataset_splits('sst5', data_root=str(tmp_path))
    (tmp_path / 'sst' / 'train.txt').write_bytes(b'\x00\x01\x02' * 100)
    with pytest.raises(ValueError, match=r"train\.txt, line 1: binary data"):
        data.get_dataset_splits('sst2', data_root=str(tmp_path))
    (tmp_path / 'sst' / 'train.txt').write_bytes(os.urandom(4096).replace(b'\x00', b'\xff'))
    with pytest.raises(ValueError, match=r"train\.txt"):
        data.get_dataset_splits('sst5', data_root=str(tmp_path))


def test_sst_missing_dev_is_named(tmp_path):
    write_sst(tmp_path / 'sst')
    os.remove(tmp_path / 'sst' / 'dev.txt')
    with pytest.raises(UsageError) as e:
        data.get_dataset_splits('sst5', data_root=str(tmp_path))
    assert 'missing: dev.txt' in str(e.value) and 'train.txt' not in str(e.value).split('.')[0]
    assert 'expected ' + str(tmp_path / 'sst' / 'dev.txt') in str(e.value)


def test_sst_empty_or_all_neutral_split_refused(tmp_path):
    write_sst(tmp_path / 'sst', test=["(2 (2 meh) (2 .))", "(2 (2 so-so) (2 .))"])
    assert len(data.get_dataset_splits('sst5', data_root=str(tmp_path))['test']) == 2
    with pytest.raises(ValueError, match=r"test\.txt: the sst2 test split is empty \(all its examples are neutral"):
        data.get_dataset_splits('sst2', data_root=str(tmp_path))
    write_sst(tmp_path / 'sst', dev=[''])
    with pytest.raises(ValueError, match=r"dev\.txt: the sst5 valid split is empty \(it holds no trees\)"):
        data.get_dataset_splits('sst5', data_root=str(tmp_path))

# -----------------------------------------------------------------------------
# MNIST, smallNORB: truncated headers and labels out of range


def test_mnist_truncated_header_and_bad_labels(tmp_path):
    root = tmp_path / 'mnist'
    images = np.zeros((2, 28, 28), np.uint8)
    data.write_idx(str(root / 'train-images-idx3-ubyte'), images)
    data.write_idx(str(root / 'train-labels-idx1-ubyte'), np.array([1, 2], np.uint8))
    data.write_idx(str(root / 't10k-images-idx3-ubyte'), images)
    data.write_idx(str(root / 't10k-labels-idx1-ubyte'), np.array([3, 12], np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: label 12 at index 1 is out of range"):
        data.get_dataset_splits('mnist', data_root=str(tmp_path))
    (root / 'train-images-idx3-ubyte').write_bytes(bytes([0, 0, 8, 3]) + struct.pack('>i', 2))   # dims cut off
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated IDX header"):
        data.get_dataset_splits('mnist', data_root=str(tmp_path))
    (root / 'train-images-idx3-ubyte').write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + os.urandom(1000))[:100])  # cut gzip
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated or corrupt gzip"):
        data.get_dataset_splits('mnist', data_root=str(tmp_path))


def test_smallnorb_truncated_header_and_bad_labels(tmp_path):
    root = tmp_path / 'smallnorb'
    write_smallnorb(root)
    cat = root / f"{data.SMALLNORB_PREFIX['test']}cat.mat"
    data.write_smallnorb_file(str(cat), np.array([0, 5, 1]))
    with pytest.raises(ValueError, match=r"testing-cat\.mat: label 5 at index 1 is out of range"):
        data.get_dataset_splits('smallnorb', data_root=str(tmp_path))
    for cut in (0, 3, 6, 12):
        cat.write_bytes(struct.pack('<5i', 0x1E3D4C54, 1, 3, 1, 1)[:cut])
        with pytest.raises(ValueError, match=r"testing-cat\.mat: truncated smallNORB"):
            data.get_dataset_splits('smallnorb', data_root=str(tmp_path))

# -----------------------------------------------------------------------------
# atomic writes: fsync of file and folder, umask, orphans


def test_save_atomic_fsyncs_file_then_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append('dir' if stat.S_ISDIR(os.fstat(fd).st_mode) else 'file')
                        or real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append('rename') or real_replace(a, b))
    data.write_atomic(str(tmp_path / 'f.bin'), b'1234')
    assert events == ['file', 'rename', 'dir'] and (tmp_path / 'f.bin').read_bytes() == b'1234'


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_save_atomic_honours_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        data.write_atomic(str(tmp_path / 'f.bin'), b'x')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'f.bin').st_mode) == mode


def test_save_atomic_removes_orphans_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    orphan = tmp_path / f'checkpoint.pt.tmp-{dead.pid}-abc123'
    orphan.write_bytes(b'half')
    live = tmp_path / f'checkpoint.pt.tmp-{os.getppid()}-def456'                    # a live writer's: kept
    live.write_bytes(b'busy')
    other = tmp_path / f'head.safetensors.tmp-{dead.pid}-x'                          # another file's: not ours
    other.write_bytes(b'x')
    data.write_atomic(str(tmp_path / 'checkpoint.pt'), b'new')
    assert not orphan.exists() and live.exists() and other.exists()
    assert (tmp_path / 'checkpoint.pt').read_bytes() == b'new'


def test_save_atomic_failure_keeps_the_old_file(tmp_path):
    data.write_atomic(str(tmp_path / 'f'), b'old')

    def disk_full(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'ne')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError, match='No space left'):
        data.save_atomic(disk_full, str(tmp_path / 'f'))
    assert (tmp_path / 'f').read_bytes() == b'old' and os.listdir(tmp_path) == ['f']

# -----------------------------------------------------------------------------
# the feature cache


@pytest.fixture(scope='module')
def bert(tiny_bert):
    from heinsen_replication import backbones
    return backbones.load_backbone(tiny_bert)


TEXTS = [f"the film is {w} number {k}" for k in range(12) for w in ('good', 'bad')]


def direct_features(backbone, texts):
    hidden, mask = backbone.encode(texts)
    return [h[~m].to(torch.float16).float() for h, m in zip(hidden, mask)]


def test_feature_cache_truncated_or_deleted_hidden_is_refused(bert, tmp_path):
    store = data.FeatureStore(str(tmp_path), bert)
    store.ensure(TEXTS)
    size = os.path.getsize(store.hidden_path)
    with open(store.hidden_path, 'r+b') as f:
        f.truncate(size - 7)
    with pytest.raises(ValueError, match=r"is damaged: .*hidden\.f16 holds \d+ bytes but index\.json points at"):
        data.FeatureStore(str(tmp_path), bert)
    assert os.path.getsize(store.hidden_path) == size - 7                          # not "repaired" with zeros
    os.remove(store.hidden_path)
    with pytest.raises(ValueError, match=r"truncated or deleted.*Rebuild it: rm -r "):
        data.FeatureStore(str(tmp_path), bert)


@pytest.mark.parametrize('content', [b'{"n_rows": 3, "texts": {"a": [0, ', b'\x00\x00garbage', b'[1, 2]',
                                     b'{"n_rows": 1, "texts": {"a": [0, 5]}}'])
def test_feature_cache_corrupt_index_is_refused(bert, tmp_path, content):
    store = data.FeatureStore(str(tmp_path), bert)
    store.ensure(TEXTS[:2])
    if content.startswith(b'{"n_rows": 1'):                                       # a span past n_rows
        index = json.loads(Path(store.index_path).read_text())
        index['texts']['a'] = [index['n_rows'] - 1, 5]
        content = json.dumps(index).encode()
    Path(store.index_path).write_bytes(content)
    with pytest.raises(ValueError, match=r"feature cache .* is damaged: .*index"):
        data.FeatureStore(str(tmp_path), bert)


def test_feature_cache_keyed_on_weights(tiny_bert, tmp_path):
    """A local folder with new weights (same path, same name) gets new features, not the old ones."""
    from heinsen_replication import backbones
    import transformers
    folder = tmp_path / 'model'
    shutil.copytree(tiny_bert, folder)
    old = backbones.load_backbone(str(folder))
    store = data.FeatureStore(str(tmp_path / 'cache'), old)
    before = store.dataset(TEXTS[:2], [0, 1])[0][0]
    model = transformers.BertModel.from_pretrained(str(folder))
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(2.0)
    model.save_pretrained(str(folder))
    new = backbones.load_backbone(str(folder))
    store2 = data.FeatureStore(str(tmp_path / 'cache'), new)
    assert store2.folder != store.folder
    after = store2.dataset(TEXTS[:2], [0, 1])[0][0]
    torch.testing.assert_close(after, direct_features(new, TEXTS[:1])[0])
    assert not torch.allclose(after, before)
    # ... and another window (max_length) too
    short = backbones.load_backbone(str(folder), max_length=8)
    assert data.FeatureStore(str(tmp_path / 'cache'), short).folder not in (store.folder, store2.folder)
    assert data.backbone_fingerprint(new)['weights'] != data.backbone_fingerprint(old)['weights']
    assert set(data.backbone_fingerprint(new)) >= {'config', 'tokenizer', 'revision', 'transformers', 'tokenizers'}


WRITER = textwrap.dedent('''
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from heinsen_replication import backbones, data
    backbone = backbones.load_backbone({model!r})
    store = data.FeatureStore({cache!r}, backbone)
    open({ready!r} + str(os.getpid()), 'w').close()
    while not os.path.exists({go!r}):          # both writers start together, on a fresh cache
        time.sleep(0.01)
    texts = [t for k, t in enumerate({texts!r}) if k % 3 != int(sys.argv[1])]
    store.ensure(texts, batch_texts=2)
''')


@pytest.mark.slow
def test_two_processes_writing_one_fresh_cache(bert, tiny_bert, tmp_path):
    cache = tmp_path / 'cache'
    script = tmp_path / 'writer.py'
    script.write_text(WRITER.format(model=tiny_bert, cache=str(cache), ready=str(tmp_path / 'ready-'),
                                    go=str(tmp_path / 'go'), texts=TEXTS))
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, str(script), str(k)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for k in (0, 1)]
    for _ in range(3000):
        if len([n for n in os.listdir(tmp_path) if n.startswith('ready-')]) == 2 or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    (tmp_path / 'go').touch()
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    store = data.FeatureStore(str(cache), bert)                                     # opens cleanly
    assert set(store.index['texts']) == set(TEXTS)
    spans = sorted(store.index['texts'].values())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))               # no two texts share rows
    assert spans[-1][0] + spans[-1][1] == store.index['n_rows']
    assert os.path.getsize(store.hidden_path) == store.index['n_rows'] * store.row_bytes
    cached = store.dataset(TEXTS, [0] * len(TEXTS))
    for k, expected in enumerate(direct_features(bert, TEXTS)):
        torch.testing.assert_close(cached[k][0], expected, atol=2e-3, rtol=2e-3, msg=TEXTS[k])
