"""The 2022 paper's settings: the table in docs/paper_settings.md (and, when the spec is beside the clone, the spec's
own table) is the one train_all_heads.sh's paper profile prints (LAUNCH=echo): its six runs are checked against it;
also the authors' image preprocessing and mixup pairing."""
import os
import re
import shlex
import subprocess

import pytest

import train
from heinsen_replication import loaders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_TABLE = os.path.join(ROOT, 'docs', 'paper_settings.md')
SPEC = os.path.join(ROOT, '..', 'shared', 'spec', 'paper2022.md')        # only where the spec is beside the clone

# the paper's table: dataset -> (batch_sz, n_epochs, n_iters_per_train_epoch; None = one pass), in this order
PAPER_RUNS = {'imdb': (5, 10, 10000), 'sst5': (50, 10, 2000), 'sst2': (50, 3, 2000),
              'imagenet-1k': (50, 10, None), 'cifar10': (50, 10, 2000), 'cifar100': (50, 10, 2000)}
REVISIONS = {'roberta-large': '5069d8a', 'microsoft/beit-large-patch16-224': '0bd443c'}
TEXT = ('imdb', 'sst5', 'sst2')


def printed_runs(out_dir, profile='paper', **env):
    """A profile's runs, parsed by train.py's own parser (the SST-5 model the SST-2 run starts from exists)."""
    for sst5 in ('paper/seed0/sst5', 'paper-minilm/seed0/sst5', 'paper-minilm/seed2/sst5'):
        os.makedirs(os.path.join(out_dir, sst5, 'model'), exist_ok=True)
    out = subprocess.run(['bash', os.path.join(ROOT, 'train_all_heads.sh'), profile], capture_output=True, text=True,
                         env={**os.environ, 'LAUNCH': 'echo', 'OUT': str(out_dir), **env}, check=True).stdout
    runs = []
    for line in out.strip().splitlines():
        words = shlex.split(line)
        assert words[0] == 'train.py', line
        runs.append(train.parse_args(words[1:]))
    return runs


def table_of(text):
    """A markdown text's table of runs and backbone revisions -> ({dataset: (batch, epochs, iterations)}, order,
    {backbone: revision})."""
    rows = re.findall(r'^\| (imdb|sst5|sst2|imagenet-1k|cifar10|cifar100) \| (\d+) \| (\d+) \| ([^|]+)\|', text, re.M)
    runs = {name: (int(b), int(e), int(n) if n.strip().isdigit() else None) for name, b, e, n in rows}
    revisions = dict(re.findall(r'^\| (?:text|images) \| (\S+) \| ([0-9a-f]{7,40}) \|', text, re.M))
    return runs, [name for name, *_ in rows], revisions


def test_the_docs_table_is_the_codes_table(tmp_path):
    """docs/paper_settings.md == the paper profile of recipes.py (parsed by train.py's parser) == PAPER_RUNS here."""
    from heinsen_replication import recipes
    with open(DOCS_TABLE) as f:
        runs, order, revisions = table_of(f.read())
    assert runs == PAPER_RUNS and order == list(PAPER_RUNS) and revisions == REVISIONS
    os.makedirs(tmp_path / 'paper' / 'seed0' / 'sst5' / 'model')              # the SST-2 run starts from it
    code = [train.parse_args(argv) for argv in recipes.runs('paper', out=str(tmp_path)).values()]
    assert [r.dataset_name for r in code] == order
    assert {r.dataset_name: (r.batch_sz, r.n_epochs, r.n_iters_per_train_epoch) for r in code} == runs
    assert {r.backbone: r.revision for r in code} == revisions


@pytest.mark.skipif(not os.path.isfile(SPEC), reason='the spec is not beside the clone (docs/paper_settings.md is '
                                                     'checked by test_the_docs_table_is_the_codes_table)')
def test_the_docs_table_is_the_spec_table():
    with open(SPEC) as f:
        spec = table_of(f.read())
    with open(DOCS_TABLE) as f:
        assert table_of(f.read()) == spec
    assert spec[0] == PAPER_RUNS and spec[2] == REVISIONS


def test_paper_profile_prints_the_six_runs_with_the_paper_settings(tmp_path):
    runs = printed_runs(tmp_path)
    assert [r.dataset_name for r in runs] == list(PAPER_RUNS)
    for r in runs:
        assert (r.batch_sz, r.n_epochs, r.n_iters_per_train_epoch) == PAPER_RUNS[r.dataset_name], r.dataset_name
        assert r.run_test and r.resume and r.model is None and r.lr is None and r.mixup_alpha is None
        assert r.backbone == ('roberta-large' if r.dataset_name in TEXT else 'microsoft/beit-large-patch16-224')
        assert r.revision == REVISIONS[r.backbone]
        assert r.feature_cache is None                                  # ~90 GB for roberta-large on SST: opt-in
        resolved, regime = train.resolve_args(r)
        assert (resolved.model, resolved.lr, regime['pct_start']) == ('routing_head', 1e-3, 0.3)
        assert regime['mixup_alpha']['text' if r.dataset_name in TEXT else 'image'] == (0.65 if r.dataset_name in TEXT else 0.2)
    sst5, sst2 = runs[1], runs[2]
    assert sst2.pretrained_path == os.path.join(sst5.output_dir, 'model')                # after its last epoch
    assert sst5.pretrained_path is None and len({r.output_dir for r in runs}) == 6


def test_feature_cache_is_an_option_for_sst_only(tmp_path):
    runs = printed_runs(tmp_path, FEATURE_CACHE='/somewhere/features')
    assert {r.dataset_name for r in runs if r.feature_cache == '/somewhere/features'} == {'sst5', 'sst2'}
    assert all(r.feature_cache is None for r in runs if r.dataset_name not in ('sst5', 'sst2'))


def _steps(transform):
    return [(type(t).__name__, getattr(t, 'size', None), getattr(t, 'interpolation', None)) for t in transform.transforms]


def test_the_authors_image_preprocessing():
    import torchvision.transforms as T
    from heinsen_replication import data
    bicubic = T.InterpolationMode.BICUBIC
    # ImageNet-1K: resize to 248 x 248 (224 / 0.9, bicubic), random crop 224 + RandAugment; test: center crop 224
    assert _steps(data.image_transforms(224, train=True)) == [
        ('Resize', (248, 248), bicubic), ('RandomCrop', (224, 224), None), ('RandAugment', None, T.InterpolationMode.NEAREST),
        ('ToTensor', None, None), ('Normalize', None, None)]
    assert _steps(data.image_transforms(224, train=False))[:2] == [('Resize', (248, 248), bicubic), ('CenterCrop', (224, 224), None)]
    # CIFAR: resize to 224 (bicubic) + RandAugment; test: resize only
    assert [s[0] for s in _steps(data.image_transforms(224, train=True, crop=False))] == [
        'Resize', 'RandAugment', 'ToTensor', 'Normalize']
    assert _steps(data.image_transforms(224, train=False, crop=False))[0] == ('Resize', (224, 224), bicubic)
    normalize = data.image_transforms(224, train=False).transforms[-1]
    assert tuple(normalize.mean) == tuple(normalize.std) == (0.5, 0.5, 0.5)


def test_the_authors_mixup_pairs_each_sample_with_the_next():
    import torch
    torch.manual_seed(0)
    hidden = torch.arange(4.0)[:, None, None, None].expand(4, 2, 1, 3).clone()      # sample b is all b
    labels = torch.tensor([0, 1, 2, 0])
    mixed, _, targets = loaders.mixup(hidden, None, labels, 3, alpha=0.65)
    r = (mixed[:, 0, 0, 0] - hidden[:, 0, 0, 0]) / (hidden[[1, 2, 3, 0], 0, 0, 0] - hidden[:, 0, 0, 0])
    torch.testing.assert_close(mixed, hidden.lerp(hidden[[1, 2, 3, 0]], r.view(4, 1, 1, 1)))
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(targets, one_hot.lerp(one_hot[[1, 2, 3, 0]], r[:, None]))
    assert ((r > 0) & (r < 1)).all() and len(set(r.tolist())) == 4                   # r ~ Beta per sample


def test_paper_minilm_profile_is_the_papers_sst_recipe_on_the_offline_backbone(tmp_path):
    for seed in (0, 2):
        sst5, sst2 = printed_runs(tmp_path, 'paper-minilm', SEED=str(seed))
        for r in (sst5, sst2):
            assert (r.batch_sz, r.n_epochs, r.n_iters_per_train_epoch) == PAPER_RUNS[r.dataset_name]
            assert (r.backbone, r.rng_seed, r.model, r.lr, r.mixup_alpha) == ('minilm', seed, None, None, None)
            assert r.feature_cache and r.run_test and r.resume and r.matmul_precision == 'medium'
        assert sst2.pretrained_path == os.path.join(sst5.output_dir, 'model') and f'seed{seed}' in sst5.output_dir


def test_offline_profile_uses_bfloat16_only_where_it_measures_faster(monkeypatch, tmp_path):
    """Having AVX512-BF16 is not enough: the offline profile encodes in bfloat16 autocast (and uses matmul precision
    'medium') only where cpu_bfloat16_is_faster times bfloat16 products faster than float32 ones on this CPU. The
    choice is recorded on the first start: a resumed run keeps it whatever a new timing says."""
    from heinsen_replication import recipes
    measured = recipes.cpu_bfloat16_is_faster

    def precisions(out):
        os.makedirs(out / 'offline' / 'seed0' / 'sst5' / 'model', exist_ok=True)
        return {(args.mixed_precision, args.matmul_precision)
                for args in map(train.parse_args, recipes.runs('offline', out=str(out)).values())}

    for faster in (False, True):
        monkeypatch.setattr(recipes, 'cpu_bfloat16_is_faster', lambda faster=faster: faster)
        expected = ('bf16', 'medium') if faster else (None, 'highest')
        assert precisions(tmp_path / str(faster)) == {expected}
        monkeypatch.setattr(recipes, 'cpu_bfloat16_is_faster', lambda faster=faster: not faster)   # timed again: flips
        assert precisions(tmp_path / str(faster)) == {expected}                                      # resumed: kept
        assert (tmp_path / str(faster) / 'offline' / 'seed0' / 'precision.txt').read_text() == (
            'bfloat16\n' if faster else 'float32\n')
    (tmp_path / 'True' / 'offline' / 'seed0' / 'precision.txt').write_text('fp8\n')
    with pytest.raises(ValueError, match=r"precision.txt must hold 'bfloat16' or 'float32'.*got 'fp8'"):
        precisions(tmp_path / 'True')
    monkeypatch.setattr(recipes, 'cpu_has_bfloat16', lambda: False)                  # no instructions: not timed
    measured.cache_clear()
    assert measured() is False
    measured.cache_clear()
