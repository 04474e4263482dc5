"""The paper's runs as GPU users run them: the backbone's precision (autocast), no silent CPU run of a paper backbone,
one evaluation per epoch, seeded augmentations, the hub data source without loading scripts, and the full-scale smoke
run at tiny scale. (The authors' 2022 files: test_fidelity_2022.py.)"""
import os

import pytest
import torch

from heinsen_replication import backbones, checkpoints
from heinsen_replication.errors import UsageError
from heinsen_replication.pretrained import read_config
from tests.helpers.training import one_epoch_args as _sst, run as _run


def _count_autocast_forwards(backbone, batch):
    """-> (forwards of the backbone's model, how many of them ran under autocast), and the encoded hidden."""
    seen = []
    device_type = backbone.device.type
    hook = backbone.model.register_forward_hook(lambda m, args, out: seen.append(torch.is_autocast_enabled(device_type)))
    try:
        hidden, _ = backbone.encode(batch)
    finally:
        hook.remove()
    return len(seen), sum(seen), hidden


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])   # float16: the paper's (CUDA), here on the CPU
@pytest.mark.parametrize('fixture', ['tiny_roberta', 'tiny_beit'])
def test_backbone_runs_under_autocast_when_asked_and_hands_on_float32(fixture, dtype, request):
    torch.manual_seed(0)
    batch = ["a lovely film", "a dull one"] if fixture == 'tiny_roberta' else torch.randn(2, 3, 32, 32)
    plain = backbones.load_backbone(request.getfixturevalue(fixture))
    assert plain.autocast_dtype is None
    n, n_autocast, hidden32 = _count_autocast_forwards(plain, batch)
    assert (n, n_autocast) == (1, 0) and hidden32.dtype == torch.float32
    mixed = backbones.load_backbone(request.getfixturevalue(fixture), autocast_dtype=dtype)
    n, n_autocast, hidden16 = _count_autocast_forwards(mixed, batch)
    assert (n, n_autocast) == (1, 1)
    assert hidden16.dtype == torch.float32 and hidden16.shape == hidden32.shape   # the head's precision
    assert not torch.equal(hidden16, hidden32)                                      # really computed in bfloat16
    torch.testing.assert_close(hidden16, hidden32, atol=0.1, rtol=0.05)


def test_autocast_dtype_is_checked():
    with pytest.raises(ValueError, match='autocast_dtype must be None, torch.float16 or torch.bfloat16'):
        backbones.load_backbone('minilm', autocast_dtype=torch.float64)


def test_stack_depths_writes_float32_once():
    states = [torch.randn(2, 5, 4, dtype=torch.bfloat16), torch.randn(2, 5, 4)]   # mixed, as under autocast
    out = backbones.stack_depths(states)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 2, 4)
    torch.testing.assert_close(out, torch.stack([s.float() for s in states], dim=-2))


# -------------------------------------------------------------------------------------------------
# The feature cache's key
# -------------------------------------------------------------------------------------------------


def test_feature_cache_key_includes_the_backbone_precision(tiny_bert, tmp_path):
    import json
    from heinsen_replication import data
    backbone = backbones.load_backbone(tiny_bert)
    plain = data.FeatureStore(str(tmp_path), backbone)
    assert plain.meta['autocast_dtype'] is None                              # float32
    backbone.autocast_dtype = torch.bfloat16
    mixed = data.FeatureStore(str(tmp_path), backbone)
    assert mixed.folder != plain.folder and mixed.meta['autocast_dtype'] == 'bfloat16'
    mixed.ensure(['a lovely film'])
    assert json.load(open(mixed.index_path))['autocast_dtype'] == 'bfloat16'


# -------------------------------------------------------------------------------------------------
# --data_source hub without loading scripts
# -------------------------------------------------------------------------------------------------

def test_hub_repository_with_a_loading_script_falls_back_to_its_parquet_conversion(monkeypatch):
    datasets = pytest.importorskip('datasets')
    from heinsen_replication import data
    calls = []
    trees = {'train': ['(3 (3 good) (2 .))'], 'validation': ['(2 (2 ok) (2 .))'], 'test': ['(1 (1 bad) (2 .))']}

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if kwargs.get('revision') != 'refs/convert/parquet':       # what datasets 5.x says of a script repository
            raise RuntimeError("Dataset scripts are no longer supported, but found sst.py")
        return datasets.DatasetDict({k: datasets.Dataset.from_dict({'ptb_tree': v}) for k, v in trees.items()})

    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    s = data.get_dataset_splits('sst5', source='hub')
    assert calls == [('stanfordnlp/sst', 'ptb', {}),
                     ('stanfordnlp/sst', None, {'data_dir': 'ptb', 'revision': 'refs/convert/parquet'})]
    assert s['test'].labels == [1] and len(s['train']) == 3                  # the tree and its 2 subtrees


def test_the_parquet_conversion_layout_loads_one_config_with_data_dir(tmp_path):
    """The real datasets library on the layout of refs/convert/parquet (<config>/<split>/0000.parquet, several
    configs with other columns side by side): data_dir=<config> yields that config's three splits."""
    datasets = pytest.importorskip('datasets')
    for config, column in (('ptb', 'ptb_tree'), ('default', 'sentence'), ('dictionary', 'phrase')):
        for split in ('train', 'validation', 'test'):
            (tmp_path / config / split).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict({column: [f'{config} {split} {k}' for k in range(3)]}).to_parquet(
                str(tmp_path / config / split / '0000.parquet'))
    loaded = datasets.load_dataset(str(tmp_path), data_dir='ptb')
    assert sorted(loaded) == ['test', 'train', 'validation']
    assert loaded['validation'].column_names == ['ptb_tree'] and loaded['test']['ptb_tree'][0] == 'ptb test 0'


# -------------------------------------------------------------------------------------------------
# train.py: backbone precision, no silent CPU, one evaluation per epoch, seeded augmentations, the authors' files
# -------------------------------------------------------------------------------------------------

def _count_backbone_forwards(monkeypatch, device_type='cpu'):
    """Every backbone train.py loads gets a forward hook: -> the list of torch.is_autocast_enabled(device_type), one
    per forward of the backbone's model."""
    from heinsen_replication import assembly
    seen, load = [], backbones.load_backbone

    def load_and_hook(*args, **kwargs):
        backbone = load(*args, **kwargs)
        backbone.model.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled(device_type)))
        return backbone

    monkeypatch.setattr(assembly, 'load_backbone', load_and_hook)
    return seen


def test_train_runs_the_backbone_under_autocast_in_training_evaluation_and_cache_build(tiny_sst, tiny_bert, tmp_path,
                                                                                        monkeypatch):
    seen = _count_backbone_forwards(monkeypatch)
    _run(_sst(tiny_sst, tiny_bert, tmp_path / 'live', '--mixed_precision', 'bf16', '--run_test'))   # train + valid + test
    n_live = len(seen)
    assert n_live > 3 and all(seen)
    config = read_config(tmp_path / 'live' / 'model')['training']
    assert (config['backbone_precision'], config['head_precision'], config['device']) == \
        ('bfloat16 autocast', 'float32', 'cpu (cpu)')
    head = checkpoints.from_pretrained(tmp_path / 'live' / 'model')[0]
    assert all(p.dtype == torch.float32 for p in head.parameters())
    _run(_sst(tiny_sst, tiny_bert, tmp_path / 'cached', '--mixed_precision', 'bf16', '--feature_cache', tmp_path / 'c'))
    assert len(seen) > n_live and all(seen)                                  # the cache was built under autocast
    seen.clear()
    _run(_sst(tiny_sst, tiny_bert, tmp_path / 'fp32', '--feature_cache', tmp_path / 'c'))
    assert seen and not any(seen)                                            # float32: its own features, no autocast
    assert read_config(tmp_path / 'fp32' / 'model')['training']['backbone_precision'] == 'float32'


def test_papers_backbones_refuse_a_silent_cpu_run(tmp_path, monkeypatch, capsys):
    import train
    from heinsen_replication import recipes
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for stage in ('imdb', 'sst5', 'cifar10'):
        argv = recipes.runs('paper', str(tmp_path / 'data'), str(tmp_path / 'runs'), 0)[stage]
        with pytest.raises(UsageError, match=r"one of the papers' backbones.*Pass --device cpu"):
            train.main(argv)
        assert not os.path.exists(tmp_path / 'runs' / 'paper' / 'seed0' / stage)    # stopped before anything
    for backbone in ('roberta-large', 'gpt2-large', 'openai-community/gpt2-large'):
        with pytest.raises(UsageError, match='Pass --device cpu'):
            train.main(['--dataset_name', 'sst5', '--backbone', backbone, '--output_dir', str(tmp_path / 'o')])
    with pytest.raises(UsageError, match='--device cuda: no CUDA device is usable'):
        train.main(['--dataset_name', 'sst5', '--device', 'cuda', '--output_dir', str(tmp_path / 'o')])
    with pytest.raises(Exception) as explicit:                               # --device cpu: past the check
        train.main(argv + ['--device', 'cpu'])
    assert 'Pass --device cpu' not in str(explicit.value)


def _cifar(root, n_train=4, n_test=4):
    import numpy as np
    from heinsen_replication.data import write_cifar_batch
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        write_cifar_batch(folder / f'data_batch_{i + 1}', rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                          [k % 10 for k in range(i, i + n_train)], b'labels')
    write_cifar_batch(folder / 'test_batch', rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                      [k % 10 for k in range(n_test)], b'labels')
    return root


def _record_evaluations(monkeypatch):
    import train
    calls, validate = [], train.validate
    monkeypatch.setattr(train, 'validate', lambda run, split: calls.append(split) or validate(run, split))
    return calls


def test_every_dataset_is_evaluated_once_per_epoch(tiny_beit, tiny_sst, tiny_bert, tmp_path, monkeypatch):
    from tests.helpers.files import metrics_records
    calls = _record_evaluations(monkeypatch)
    out = tmp_path / 'cifar'                                                 # no validation split: the test split
    acc = _run(['--dataset_name', 'cifar10', '--backbone', tiny_beit, '--data_root', _cifar(tmp_path / 'data'),
                '--image_size', 32, '--output_dir', out, '--batch_sz', 8, '--n_epochs', 2,
                '--n_iters_per_train_epoch', 2, '--run_test', '--device', 'cpu'])
    assert calls == ['test', 'test']                                         # once per epoch, not again at the end
    records = metrics_records(out)
    assert [(r['eval_split'], 'test_acc' in r, 'valid_acc' in r) for r in records[:2]] == [('test', True, False)] * 2
    assert records[-1]['final']['test_accuracy'] == records[1]['test_acc'] == acc
    assert 'valid_accuracy' not in records[-1]['final']
    calls.clear()
    out = tmp_path / 'sst'                                                   # a validation split: that one
    _run(_sst(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--n_iters_per_train_epoch', 2, '--run_test',
              '--feature_cache', tmp_path / 'c'))
    assert calls == ['valid', 'valid', 'test']
    assert [r['eval_split'] for r in metrics_records(out)[:2]] == ['valid', 'valid']


def test_augmentations_follow_the_seed_with_workers_and_resume_continues_them():
    """The real make_loaders + training_stream with 2 workers, on a split whose 'augmentation' draws from torch's
    RNG: two seeds draw different augmentations, one seed the same ones, and a stream resumed at step k (mid-pass)
    draws what the uninterrupted one drew from step k on."""
    import argparse
    from accelerate import Accelerator
    from heinsen_replication.loaders import make_loaders, training_stream

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(()) + 10 * i, i                                 # a random draw per sample

    def draws(seed, start_step=0, n=9):
        args = argparse.Namespace(feature_cache=None, batch_sz=3, num_workers=2, rng_seed=seed, dataset_name='x')
        splits = {'train': Augmented(), 'valid': None, 'test': None, 'modality': 'image'}
        shuffle = torch.Generator()
        loaders, sampler = make_loaders(args, splits, None, Accelerator(cpu=True), shuffle)
        assert loaders['train'].num_workers == 2
        stream = training_stream(loaders['train'], shuffle, seed, start_step, sampler=sampler)
        return [next(stream)[0].tolist() for _ in range(n - start_step)]

    seed0, again, seed1 = draws(0), draws(0), draws(1)
    assert seed0 == again

    def first_pass(batches):                                                 # {sample index: its draw}
        values = sum(batches[:4], [])                                        # 10 samples, batches of 3: 4 a pass
        assert sorted(int(v // 10) for v in values) == list(range(10))       # every sample once
        return {int(v // 10): v % 10 for v in values}

    a, b = first_pass(seed0), first_pass(seed1)
    assert all(a[i] != b[i] for i in range(10))                             # each sample drawn anew by another seed
    for start in (2, 4, 5):                                                  # resumed at step k, mid-pass too
        assert draws(0, start) == seed0[start:]


@pytest.mark.slow
def test_full_scale_smoke_at_tiny_scale(tiny_sst, tmp_path):
    """benchmarks/full_scale_smoke.py, the same code at toy sizes: both runs go through train.py in their own
    process, with the paper profile's settings, and are recorded."""
    from benchmarks import full_scale_smoke
    report = tmp_path / 'report.md'
    rows = full_scale_smoke.main(['--scale', 'tiny', '--work', str(tmp_path / 'work'), '--sst_dir',
                                  os.path.join(tiny_sst, 'sst'), '--steps', '2', '--batch_sz', '8',
                                  '--report', str(report)])
    assert [(r['dataset'], r['eval_split'], r['device'], len(r['step_seconds'])) for r in rows] == \
        [('sst5', 'valid', 'cpu (cpu)', 2), ('cifar10', 'test', 'cpu (cpu)', 2)]
    assert all(r['peak_rss_gib'] > 0.1 and all(s > 0 for s in r['step_seconds']) for r in rows)
    assert '--mixed_precision' not in rows[0]['argv'] and rows[1]['argv'][rows[1]['argv'].index('--batch_sz') + 1] == '8'
    text = report.read_text()
    assert text.count('| sst5 | cpu (cpu) | float32 | 2 |') == 1 and '| cifar10 | cpu (cpu) | float32 | 2 |' in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_on_cuda_the_backbone_runs_in_float16_autocast_and_the_head_in_float32(tiny_beit, tmp_path, monkeypatch):
    """On a GPU (skipped here without one): train.py's default for the paper's head is the backbone under fp16
    autocast, the head in float32, pinned batches; all forwards of the backbone under autocast('cuda')."""
    seen = _count_backbone_forwards(monkeypatch, 'cuda')
    out = tmp_path / 'run'
    _run(['--dataset_name', 'cifar10', '--backbone', tiny_beit, '--data_root', _cifar(tmp_path / 'data'),
          '--image_size', 32, '--output_dir', out, '--batch_sz', 8, '--n_epochs', 1, '--n_iters_per_train_epoch', 2,
          '--num_workers', 2, '--device', 'cuda'])
    assert seen and all(seen)
    config = read_config(out / 'model')['training']
    assert config['backbone_precision'] == 'float16 autocast' and config['head_precision'] == 'float32'
    assert config['device'].startswith('cuda (')
