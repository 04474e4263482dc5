"""The feature cache never hands out damaged or batch-dependent features: every text's rows carry a checksum
verified when they are read (NaN rows, flipped bits, swapped rows or index entries are refused, naming the text
and the command that rebuilds the cache); features not finite in float16 are refused when encoded; the cache key
covers the tokenizer's settings; text backbones always pad on the right; a full or read-only disk while the cache
is written is a clear error that keeps what was stored."""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from heinsen_replication import backbones, data
from heinsen_replication.errors import UsageError

TEXTS = ['a good film', 'a bad film', 'the film is long and good', 'the film is long and bad',
         'bad', 'good', 'it is what it is', 'a film']


@pytest.fixture(scope='module')
def bert(tiny_bert):
    return backbones.load_backbone(tiny_bert)


@pytest.fixture
def store(bert, tmp_path):
    store = data.FeatureStore(str(tmp_path / 'cache'), bert)
    store.ensure(TEXTS)
    return store


def rows_of(store, text):
    start, length, _ = store.index['texts'][text]
    return start, length


def write_rows(store, start, rows):
    with open(store.hidden_path, 'r+b') as f:
        f.seek(start * store.row_bytes)
        f.write(np.ascontiguousarray(rows, dtype=np.float16).tobytes())


def read_rows(store, start, length):
    with open(store.hidden_path, 'rb') as f:
        f.seek(start * store.row_bytes)
        return np.frombuffer(f.read(length * store.row_bytes), np.float16).reshape(length, -1).copy()


def assert_refused(store, *damaged):
    """A fresh opening of the store refuses to read the damaged texts, naming each and the rebuild command; every
    other text reads."""
    reopened = data.FeatureStore(str(Path(store.folder).parents[1]), store.backbone)
    dataset = reopened.dataset(TEXTS, [0] * len(TEXTS))
    for text in damaged:
        with pytest.raises(ValueError, match=rf"feature cache {store.folder} is damaged: the features of the text "
                                             rf"'{text}' \(rows \d+ to \d+ of .*hidden.f16\) do not match their "
                                             rf"checksum.*Rebuild it: rm -r {store.folder} and run the same command"):
            dataset[TEXTS.index(text)]
    for k, text in enumerate(TEXTS):
        if text not in damaged:
            assert torch.isfinite(dataset[k][0]).all()


def test_clean_cache_reads_the_features_it_stored(store, bert):
    dataset = store.dataset(TEXTS, list(range(len(TEXTS))))
    hidden, mask = bert.encode(TEXTS)
    for k in range(len(TEXTS)):
        torch.testing.assert_close(dataset[k][0], hidden[k][~mask[k]].half().float())
        torch.testing.assert_close(dataset[k][0], dataset[k][0])                   # verified once, read again


def test_nan_rows_in_the_cache_are_refused(store):
    start, length = rows_of(store, 'a good film')
    write_rows(store, start + 1, np.full((1, store.row_bytes // 2), np.nan))
    assert_refused(store, 'a good film')


def test_one_flipped_bit_in_the_cache_is_refused(store):
    start, length = rows_of(store, 'the film is long and bad')
    with open(store.hidden_path, 'r+b') as f:
        f.seek(start * store.row_bytes + 37)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))
    assert_refused(store, 'the film is long and bad')


def test_rows_swapped_between_texts_are_refused(store):
    """Two texts of the same length whose rows trade places in hidden.f16: both are refused."""
    (a, n), (b, m) = rows_of(store, 'a good film'), rows_of(store, 'a bad film')
    assert n == m
    rows_a, rows_b = read_rows(store, a, n), read_rows(store, b, m)
    assert not np.array_equal(rows_a, rows_b)
    write_rows(store, a, rows_b)
    write_rows(store, b, rows_a)
    assert_refused(store, 'a good film', 'a bad film')


def test_index_entries_swapped_between_texts_are_refused(store):
    """The checksum covers the text too: an index whose entries (rows and checksums) trade places is refused."""
    index = json.loads(Path(store.index_path).read_text())
    texts = index['texts']
    texts['a good film'], texts['a bad film'] = texts['a bad film'], texts['a good film']
    Path(store.index_path).write_text(json.dumps(index))
    assert_refused(store, 'a good film', 'a bad film')


def test_an_index_without_checksums_is_refused(store):
    index = json.loads(Path(store.index_path).read_text())
    index['texts'] = {t: span[:2] for t, span in index['texts'].items()}
    Path(store.index_path).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"is damaged: .*index.json points .* not \[start, length, checksum\]"):
        data.FeatureStore(str(Path(store.folder).parents[1]), store.backbone)


def test_features_not_finite_in_float16_are_refused_when_encoded(bert, tmp_path, monkeypatch):
    real_encode_rows = bert.encode_rows

    def overflowing(texts, dtype=torch.float32, **kwargs):                       # only one text's rows, not the first
        rows, lengths = real_encode_rows(texts, dtype=torch.float32, **kwargs)
        k = list(texts).index('the film is long and bad')
        start = sum(lengths[:k])
        rows[start:start + lengths[k]] *= 1e6                                     # beyond float16's 65504
        return rows.to(dtype), lengths

    store = data.FeatureStore(str(tmp_path / 'cache'), bert)
    store.ensure(TEXTS[:2])
    monkeypatch.setattr(bert, 'encode_rows', overflowing)
    with pytest.raises(ValueError, match=r"not finite in float16 .* for the text 'the film is long and bad'.*without "
                                         r"--feature_cache"):
        store.ensure(TEXTS[:5])
    assert set(store.index['texts']) == set(TEXTS[:2])                            # what was stored is kept
    monkeypatch.undo()
    reopened = data.FeatureStore(str(tmp_path / 'cache'), bert)
    assert set(reopened.index['texts']) == set(TEXTS[:2])
    assert os.path.getsize(reopened.hidden_path) == reopened.index['n_rows'] * reopened.row_bytes
    assert len(reopened.dataset(TEXTS, [0] * len(TEXTS))) == len(TEXTS)


@pytest.mark.parametrize('failure', [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_while_building_is_a_clear_error_and_keeps_the_cache(bert, tmp_path, monkeypatch,
                                                                                    failure):
    store = data.FeatureStore(str(tmp_path / 'cache'), bert)
    store.ensure(TEXTS[:3])
    stored = dict(store.index['texts'])

    def fail(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(os, 'fsync', fail)                  # where a full disk shows: the data reach it
    with pytest.raises(UsageError, match=rf"feature cache {store.folder}: cannot write it "
                                      rf"\((disk full|read-only file system): .*What was stored before is kept") as e:
        store.ensure(TEXTS)
    assert e.value.__cause__.errno == failure and '\n' not in str(e.value)
    monkeypatch.undo()
    reopened = data.FeatureStore(str(tmp_path / 'cache'), bert)
    assert reopened.index['texts'] == stored
    assert len(reopened.dataset(TEXTS, [0] * len(TEXTS))) == len(TEXTS)           # and it resumes


def test_read_only_cache_folder_is_a_clear_error(bert, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / 'cache'))

    monkeypatch.setattr(os, 'makedirs', read_only)
    with pytest.raises(UsageError, match=r"feature cache .*: cannot write it \(read-only file system"):
        data.FeatureStore(str(tmp_path / 'cache'), bert)


def left_padding_copy(tiny_bert, tmp_path, **settings):
    folder = tmp_path / 'model'
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / 'tokenizer_config.json').read_text())
    (folder / 'tokenizer_config.json').write_text(json.dumps({**config, **settings}))
    return str(folder)


def test_a_left_padding_tokenizer_is_switched_to_right_padding(tiny_bert, bert, tmp_path):
    folder = left_padding_copy(tiny_bert, tmp_path, padding_side='left')
    import transformers
    assert transformers.AutoTokenizer.from_pretrained(folder).padding_side == 'left'
    with pytest.warns(UserWarning, match="pads on the left; padding on the right instead"):
        left = backbones.load_backbone(folder)
    assert left.tokenizer.padding_side == 'right'
    short, long = 'good', 'the film is long and good and long and good'
    alone, alone_mask = left.encode([short])
    batch, batch_mask = left.encode([short, long])                                 # features never depend on the batch
    torch.testing.assert_close(batch[0][~batch_mask[0]], alone[0][~alone_mask[0]])
    expected, expected_mask = bert.encode([short])
    torch.testing.assert_close(alone, expected)
    # the cache: the same features, so the same fingerprint as the right-padding tokenizer's (the same files)
    assert data.backbone_fingerprint(left) == data.backbone_fingerprint(bert)


def test_encode_pads_on_the_right_even_if_the_tokenizer_is_switched_later(bert):
    short, long = 'good', 'the film is long and good and long and good'
    alone, mask = bert.encode([short])
    bert.tokenizer.padding_side = 'left'
    try:
        batch, batch_mask = bert.encode([short, long])
        assert data.features.tokenizer_settings(bert.tokenizer)['padding_side'] == 'left'
    finally:
        bert.tokenizer.padding_side = 'right'
    torch.testing.assert_close(batch[0][~batch_mask[0]], alone[0][~mask[0]])


@pytest.mark.parametrize('settings', [{'truncation_side': 'left'}, {'do_lower_case': False},
                                      {'cls_token': '[MASK]'}])
def test_cache_key_covers_the_tokenizer_settings(tiny_bert, bert, tmp_path, settings):
    other = backbones.load_backbone(left_padding_copy(tiny_bert, tmp_path, **settings))
    changed = {k for k, v in data.backbone_fingerprint(other).items() if data.backbone_fingerprint(bert)[k] != v}
    assert 'tokenizer_settings' in changed and 'weights' not in changed


def test_cache_key_covers_the_revision_asked_for(bert, tmp_path, monkeypatch):
    key = data.FeatureStore(str(tmp_path / 'c'), bert).folder
    monkeypatch.setattr(bert, 'revision', 'v2')
    assert data.FeatureStore(str(tmp_path / 'c'), bert).folder != key
