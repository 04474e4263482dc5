"""Valid tree files are read whatever their byte order mark or depth: a UTF-8 BOM is not text, and trees nested
deeper than Python's recursion limit give all their phrases (no RecursionError)."""
import sys

import pytest

from heinsen_replication import data
from tests.helpers.files import SST_DEV, SST_TEST, SST_TRAIN, write_sst


def test_utf8_byte_order_mark_in_a_tree_file_is_accepted(tmp_path):
    write_sst(tmp_path / 'plain' / 'sst')
    write_sst(tmp_path / 'bom' / 'sst')
    for name in ('train.txt', 'dev.txt', 'test.txt'):
        path = tmp_path / 'bom' / 'sst' / name
        path.write_bytes(b'\xef\xbb\xbf' + path.read_bytes())
    for dataset in ('sst5', 'sst2'):
        plain = data.get_dataset_splits(dataset, data_root=str(tmp_path / 'plain'))
        bom = data.get_dataset_splits(dataset, data_root=str(tmp_path / 'bom'))
        for split in ('train', 'valid', 'test'):
            assert (bom[split].texts, bom[split].labels) == (plain[split].texts, plain[split].labels)
    assert bom['train'].texts[0] == "It's good."


def test_byte_order_mark_inside_a_file_is_still_an_error(tmp_path):
    write_sst(tmp_path / 'sst', test=["(0 (0 bad) (2 .))", "\ufeff(3 (3 fine) (2 !))"])
    with pytest.raises(ValueError, match=r"test\.txt, line 2: text outside parentheses"):
        data.get_dataset_splits('sst5', data_root=str(tmp_path))


def deep_tree(depth):
    """(2 (2 ... (2 (3 w0) (1 w1)) ... (1 w<depth-1>)) (1 w<depth>)): `depth` nested phrases, one word each."""
    tree = '(3 w0)'
    for k in range(1, depth + 1):
        tree = f'(2 {tree} (1 w{k}))'
    return tree


def test_trees_nested_deeper_than_the_recursion_limit_are_read(tmp_path):
    depth = max(3000, sys.getrecursionlimit() + 500)          # deeper than the limit, whatever raised it before
    write_sst(tmp_path / 'sst', train=SST_TRAIN + [deep_tree(depth)], dev=SST_DEV + [deep_tree(depth)], test=SST_TEST)
    splits = data.get_dataset_splits('sst5', data_root=str(tmp_path))
    words = [f'w{k}' for k in range(depth + 1)]
    assert splits['valid'].texts[-1] == ' '.join(words) and splits['valid'].labels[-1] == 2
    train = dict(zip(splits['train'].texts, splits['train'].labels))
    for k in (0, 1, depth // 2, depth):                                           # every phrase, every word
        assert train[' '.join(words[:k + 1])] == (3 if k == 0 else 2)
        assert train[f'w{k}'] == (3 if k == 0 else 1)
    assert len(train) == len(data.sst_examples(data.read_ptb_trees(str(tmp_path / 'sst' / 'train.txt'))[:4],
                                               all_phrases=True)[0]) + 2 * depth + 1
