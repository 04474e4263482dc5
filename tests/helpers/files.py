"""Files the tests write or find: the real SST where the README puts it, and tiny files in the real formats of SST
(PTB trees), CIFAR (pickled batches) and smallNORB (.mat). Shared by the test modules (none imports another)."""
import os
from pathlib import Path

import numpy as np

from heinsen_replication import data

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_sst():
    """The real SST: $SST_DIR, else where the README's set-up puts it (.data/sst), else beside the clone (CI)."""
    if os.environ.get('SST_DIR'):
        return Path(os.environ['SST_DIR'])
    readme_place = REPO_ROOT / '.data' / 'sst'
    return readme_place if (readme_place / 'test.txt').is_file() else REPO_ROOT.parent / 'shared' / 'data' / 'sst'


SST_DIR = find_sst()


def find_published_2019():
    """The authors' published 2019 state dicts: $HEINSEN2019_DIR, where `python -m heinsen_replication.data heinsen2019 --download`
    puts them (.data/heinsen2019), or the byte-for-byte copies beside the clone (CI); None if absent."""
    for folder in (os.environ.get('HEINSEN2019_DIR'), REPO_ROOT / '.data' / 'heinsen2019',
                   REPO_ROOT.parent / 'shared' / 'weights' / 'heinsen2019'):
        if folder and (Path(folder) / 'SST5R_pretrained_model_state_dict.pt').is_file():
            return Path(folder)
    return None


PUBLISHED_2019 = find_published_2019()

SST_TRAIN = [
    "(3 (2 It) (3 (2 (2 's) (3 good)) (2 .)))",
    "(1 (2 It) (1 (1 (2 is) (1 (2 n't) (3 good))) (2 .)))",
    "(4 (2 -LRB-) (4 (4 great) (2 -RRB-)))",
    "(0 (2 It) (3 (2 (2 's) (3 good)) (2 .)))",  # same text as the first root, other label: first wins
]
SST_DEV = [
    "(2 (2 (2 8\u00a01\\/2) (2 hours)) (2 .))",  # SST words may hold U+00A0 and escaped slashes
    "(4 (2 ``) (4 (4 (4 Wow) (2 '')) (2 !)))",
    "(4 (2 ``) (4 (4 (4 Wow) (2 '')) (2 !)))",  # duplicate roots are kept in dev/test
]
SST_TEST = ["(0 (0 bad) (2 .))", "", "(3 (3 fine) (2 !))"]  # blank lines are ignored


def write_sst(folder, train=SST_TRAIN, dev=SST_DEV, test=SST_TEST):
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (('train.txt', train), ('dev.txt', dev), ('test.txt', test)):
        (folder / name).write_text('\n'.join(lines) + '\n', encoding='utf-8')


def write_smallnorb(root, n=3):
    """Tiny smallNORB train and test files: left image of example i = 10 * i, right = 200 + i."""
    for split in ('train', 'test'):
        dat = np.zeros((n, 2, 96, 96), np.uint8)
        dat[:, 0] = (10 * np.arange(n))[:, None, None]
        dat[:, 1] = (200 + np.arange(n))[:, None, None]
        if split == 'train':
            dat[0, 0] = np.arange(96, dtype=np.uint8)[None, :]  # a horizontal ramp, to check the crops
        info = np.stack([np.arange(n), np.full(n, 3), 2 * np.arange(n), np.full(n, 5)], axis=1)
        prefix = root / data.SMALLNORB_PREFIX[split]
        data.write_smallnorb_file(f'{prefix}dat.mat', dat)
        data.write_smallnorb_file(f'{prefix}cat.mat', np.arange(n) % 5)
        data.write_smallnorb_file(f'{prefix}info.mat', info)


POSITIVE = ['good', 'great', 'lovely', 'fine', 'superb']
NEGATIVE = ['bad', 'awful', 'dull', 'poor', 'weak']


def tree(label, words):
    """A PTB tree whose root and every word carry `label`: (label (label w1) (label (label w2) ...))."""
    if len(words) == 1:
        return f"({label} {words[0]})"
    return f"({label} ({label} {words[0]}) {tree(label, words[1:])})"


def metrics_records(out):
    """A run's metrics.jsonl as its records (runs.read_metrics): one per epoch, then {'final': ...} once finished."""
    from heinsen_replication.runs import read_metrics
    epochs, final = read_metrics(out)
    return epochs + ([] if final is None else [{'final': final}])
