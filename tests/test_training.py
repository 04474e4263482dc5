"""train.py end to end with tiny randomly initialised BERT, RoBERTa and BEiT backbones."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from heinsen_replication import checkpoints, loaders, models, runs
from heinsen_replication.data import write_cifar_batch
from heinsen_replication.errors import UsageError
from tests.helpers.files import metrics_records as metrics
from tests.helpers.training import run, sst_args




def test_train_checkpoint_eval_with_feature_cache(tiny_sst, tiny_bert, tmp_path, capsys):
    out = tmp_path / 'run'
    cache = tmp_path / 'cache'
    acc = run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--run_test', '--feature_cache', cache))
    records = metrics(out)
    assert [r['epoch'] for r in records[:2]] == [1, 2] and 'valid_acc' in records[0]
    for epoch in (1, 2):                                                   # every epoch's model is kept
        config = checkpoints.from_pretrained(out / f'epoch{epoch}')[1]
        assert config['training']['epoch'] == epoch and config['training']['valid_acc'] == records[epoch - 1]['valid_acc']
    (last, _), (final, config) = checkpoints.from_pretrained(out / 'epoch2'), checkpoints.from_pretrained(out / 'model')
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    assert records[2]['final']['test_accuracy'] == acc
    # the final model: config.json (typed) and model.safetensors, with what it was trained on
    assert sorted(os.listdir(out / 'model')) == ['README.md', 'config.json', 'model.safetensors']
    assert type(final) is models.RoutingHead and (config['d_depth'], config['d_emb'], config['n_classes']) == (3, 32, 5)
    assert config['backbone'] == tiny_bert and config['training']['test_accuracy'] == acc
    assert config['training']['dataset_name'] == 'sst5' and config['training']['model'] == 'routing_head'
    [hidden] = (cache / tiny_bert.replace('/', '--')).glob('*/hidden.f16')        # <backbone>/<fingerprint>/
    assert os.path.getsize(hidden) > 0
    capsys.readouterr()
    # --eval_only prints the test accuracy as its last line: from the (float16) cache exactly the
    # training run's; from the live float32 backbone up to near-ties of this untrained head flipping
    for extra, tolerance in ((['--feature_cache', cache], 0), ([], 2 / 12)):
        eval_acc = run(sst_args(tiny_sst, tiny_bert, tmp_path / 'eval', '--eval_only',
                                '--pretrained_path', out / 'model', *extra))
        assert abs(eval_acc - acc) <= tolerance + 1e-9
        assert capsys.readouterr().out.strip().splitlines()[-1] == f'test accuracy: {eval_acc:.4f}'


def test_training_stream_cycles_reshuffled_passes_and_resumes_mid_pass():
    """The paper's stream: epochs of n steps take consecutive batches of passes that each cover the training split
    once, reshuffled at every pass; a stream started at step k (--resume) continues exactly where step k was."""
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=torch.utils.data.RandomSampler(dataset, generator=generator),
                                         generator=torch.Generator())                                # 4 batches a pass
    stream = loaders.training_stream(loader, generator, seed=5, start_step=0)
    batches = [next(stream)[0].tolist() for _ in range(12)]                       # 3 passes
    passes = [sum(batches[k:k + 4], []) for k in (0, 4, 8)]
    assert all(sorted(p) == list(range(10)) for p in passes) and passes[0] != passes[1]
    for start in (3, 4, 6):
        resumed = loaders.training_stream(loader, generator, seed=5, start_step=start)
        assert [next(resumed)[0].tolist() for _ in range(12 - start)] == batches[start:]


@pytest.mark.parametrize('steps', [[], ['--n_iters_per_train_epoch', 5]])   # epochs that end mid-pass, too
def test_kill_and_resume_equals_uninterrupted(tiny_sst, tiny_bert, tmp_path, monkeypatch, steps):
    common = ['--n_epochs', 3, '--feature_cache', tmp_path / 'cache', '--rng_seed', 3, *steps]
    run(sst_args(tiny_sst, tiny_bert, tmp_path / 'straight', *common))
    real_save_checkpoint = runs.save_checkpoint

    def killed_after_first_checkpoint(state, path):
        real_save_checkpoint(state, path)
        raise KeyboardInterrupt('killed')                      # before metrics.jsonl is written

    monkeypatch.setattr(runs, 'save_checkpoint', killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'resumed', *common))
    monkeypatch.setattr(runs, 'save_checkpoint', real_save_checkpoint)
    assert not os.path.exists(tmp_path / 'resumed' / 'model')
    assert not [p for p in os.listdir(tmp_path / 'resumed') if '.tmp' in p]          # no half-written files
    run(sst_args(tiny_sst, tiny_bert, tmp_path / 'resumed', *common, '--resume'))
    assert [r.get('epoch') for r in metrics(tmp_path / 'resumed')] == [1, 2, 3, None]
    straight, resumed = (load_file(tmp_path / run_dir / 'model' / 'model.safetensors') for run_dir in ('straight', 'resumed'))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], msg=k)


def test_loss_falls_and_learns_tiny_sst(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 6, '--n_iters_per_train_epoch', 10, '--lr', 3e-3,
                 '--mixup_alpha', 0, '--feature_cache', tmp_path / 'cache'))
    losses = [r['train_loss'] for r in metrics(out)[:-1]]
    assert losses[-1] < 0.7 * losses[0], losses


def test_finetune_last_routing_from_sst5_head_for_sst2(tiny_sst, tiny_roberta, tmp_path, capsys):
    sst5 = tmp_path / 'sst5'
    run(sst_args(tiny_sst, tiny_roberta, sst5, '--n_epochs', 1))
    before = load_file(sst5 / 'model' / 'model.safetensors')
    out = tmp_path / 'sst2'
    args = sst_args(tiny_sst, tiny_roberta, out, '--n_epochs', 1, '--pretrained_path', sst5 / 'model', '--run_test')
    args[1] = 'sst2'
    run(args)
    assert 'left at init' in capsys.readouterr().out
    after = load_file(out / 'model' / 'model.safetensors')
    assert after['route.2.W_S'].shape == (64, 2)
    for k in before:                                           # all but the last routing stay frozen
        if not k.startswith('route.2.'):
            torch.testing.assert_close(after[k], before[k], msg=k)
    assert not torch.equal(after['route.2.W_F2'], before['route.2.W_F2'])
    everything = tmp_path / 'sst2_all'                           # --finetune all (a diagnostic variant): all train
    args = sst_args(tiny_sst, tiny_roberta, everything, '--n_epochs', 1, '--pretrained_path', sst5 / 'model',
                    '--finetune', 'all')
    args[1] = 'sst2'
    run(args)
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset_name', 'sst2', '--finetune', 'all'])      # nothing to fine-tune
    assert '--finetune all fine-tunes a pretrained model: pass --pretrained_path' in capsys.readouterr().err
    tuned = load_file(everything / 'model' / 'model.safetensors')
    assert not torch.equal(tuned['W'], before['W']) and not torch.equal(tuned['route.0.W_F2'], before['route.0.W_F2'])


def test_image_dataset_with_tiny_beit(tiny_beit, tmp_path, capsys):
    root = tmp_path / 'cifar-10-batches-py'
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        write_cifar_batch(root / f'data_batch_{i + 1}', rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
                          [i, 9 - i, 2, 3], b'labels')
    write_cifar_batch(root / 'test_batch', rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), [3, 7, 1, 1], b'labels')
    out = tmp_path / 'run'
    acc = run(['--dataset_name', 'cifar10', '--backbone', tiny_beit, '--data_root', tmp_path, '--image_size', 32,
               '--output_dir', out, '--batch_sz', 8, '--n_epochs', 1, '--run_test', '--device', 'cpu'])
    assert checkpoints.from_pretrained(out / 'model')[1]['training']['test_accuracy'] == acc
    with pytest.raises(ValueError, match='--feature_cache is for text'):
        run(['--dataset_name', 'cifar10', '--backbone', tiny_beit, '--data_root', tmp_path, '--image_size', 32,
             '--output_dir', tmp_path / 'r2', '--feature_cache', tmp_path / 'c', '--device', 'cpu'])
    with pytest.raises(ValueError, match="--model capsules2019 has the 2019 paper's models for text datasets"):
        run(['--model', 'capsules2019', '--dataset_name', 'cifar10', '--backbone', tiny_beit, '--data_root', tmp_path,
             '--image_size', 32, '--output_dir', tmp_path / 'r3', '--device', 'cpu'])


def test_bad_arguments_give_clear_errors(tiny_sst, tiny_bert, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(['--dataset_name', 'sst7'])
    assert "unknown --dataset_name 'sst7'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(['--dataset_name', 'sst5', '--eval_only'])
    assert '--eval_only needs --pretrained_path' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(['--dataset_name', 'sst5', '--pretrained_path', tmp_path / 'nope.safetensors'])
    assert 'no such folder or file' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(['--dataset_name', 'sst5', '--chunk_elements', '0'])
    assert '--chunk_elements must be a positive int (elements per chunk), got 0' in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        run(sst_args(tiny_sst, 'nope', tmp_path / 'r'))
    with pytest.raises(UsageError, match='sst'):
        run(sst_args(tmp_path / 'empty', tiny_bert, tmp_path / 'r'))
    out = tmp_path / 'corrupt'
    out.mkdir()
    (out / 'checkpoint.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UsageError, match='corrupt'):
        run(sst_args(tiny_sst, tiny_bert, out, '--resume'))
    (out / 'head.safetensors').write_bytes(b'garbage')
    with pytest.raises(UsageError, match='not a readable safetensors'):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'r', '--eval_only', '--pretrained_path', out / 'head.safetensors'))


def test_length_grouped_batches_cover_every_sample_once():
    from heinsen_replication import data
    lengths = torch.randint(1, 50, (1000,)).tolist()
    for shuffle in (True, False):
        batches = list(data.LengthGroupedBatchSampler(lengths, 32, group_batches=16, shuffle=shuffle))
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) <= 32 for b in batches)
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
        assert spread < 6                                    # random batches of 32 would spread over ~45
    assert batches == list(data.LengthGroupedBatchSampler(lengths, 32, shuffle=False))


def test_data_source_hub_trains_on_the_same_data(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    """--data_source hub: the trees come from datasets.load_dataset (here a stand-in built from the same files; the
    hub is never reached) and give the run the files give."""
    datasets = pytest.importorskip('datasets')
    from pathlib import Path
    folder = next(d for d in (Path(tiny_sst) / 'sst', Path(tiny_sst) / 'sst' / 'trees') if (d / 'dev.txt').is_file())
    trees = {split: {'ptb_tree': [t for t in (folder / f'{name}.txt').read_text(encoding='utf-8').splitlines() if t.strip()]}
             for split, name in (('train', 'train'), ('validation', 'dev'), ('test', 'test'))}
    monkeypatch.setattr(datasets, 'load_dataset', lambda path, name=None, **kw: datasets.DatasetDict(
        {k: datasets.Dataset.from_dict(v) for k, v in trees.items()}))
    from_files = run(sst_args(tiny_sst, tiny_bert, tmp_path / 'files', '--n_epochs', 1, '--run_test'))
    from_hub = run(sst_args(tmp_path / 'empty', tiny_bert, tmp_path / 'hub', '--n_epochs', 1, '--run_test',
                            '--data_source', 'hub'))
    same = lambda r: {k: v for k, v in r.items() if k != 'epoch_seconds'}          # noqa: E731
    assert from_hub == from_files and same(metrics(tmp_path / 'hub')[0]) == same(metrics(tmp_path / 'files')[0])
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset_name', 'cifar10', '--data_source', 'hub'])


def test_chunk_elements_reaches_the_head(tiny_sst, tiny_bert, tmp_path):
    """--chunk_elements sets the chunk size of the head's streamed routings (default None: per device)."""
    run_ = train.build_run(train.parse_args([str(a) for a in sst_args(tiny_sst, tiny_bert, tmp_path / 'a',
                                                                        '--chunk_elements', 300)]))
    assert [r.chunk_elements for r in run_.head.route] == [300] * 3
    run_ = train.build_run(train.parse_args([str(a) for a in sst_args(tiny_sst, tiny_bert, tmp_path / 'b')]))
    assert [r.chunk_elements for r in run_.head.route] == [None] * 3
