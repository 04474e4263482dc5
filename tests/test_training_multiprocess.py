"""The multi-process path (`accelerate launch --multi_gpu --num_processes 2 train.py ...`, as the README
documents for several GPUs), run here on CPU with gloo: a tiny head trains end to end with and without
the feature cache; the metrics cover every evaluation example once (the saved head, evaluated in one
process, gives the same test accuracy), and the checkpoint, metrics and head are written by rank 0 only."""
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

import train
from heinsen_replication.reporting import read_steps
from tests.helpers.files import metrics_records

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / 'tests' / 'helpers' / 'launch_train.py'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('accelerate') is None, reason='accelerate launch not installed')
@pytest.mark.parametrize('cached', [True, False])
def test_two_processes_train_end_to_end(tiny_sst, tiny_bert, tmp_path, cached):
    out, log = tmp_path / 'run', tmp_path / 'writes.log'
    common = ['--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst, '--batch_sz', 8,
              '--device', 'cpu'] + (['--feature_cache', str(tmp_path / 'cache')] if cached else [])
    argv = common + ['--output_dir', str(out), '--n_epochs', '3', '--lr', '3e-3', '--mixup_alpha', '0', '--run_test']
    env = {**os.environ, 'WRITES_LOG': str(log), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1',
           'PYTHONPATH': str(REPO_ROOT), 'TOKENIZERS_PARALLELISM': 'false'}
    done = subprocess.run(['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(free_port()),
                           str(LAUNCHER), *map(str, argv)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    writes = [line.split() for line in log.read_text().splitlines()]
    assert sorted(w[1] for w in writes if w[0] == 'start') == ['0', '1'] and {w[2] for w in writes if w[0] == 'start'} == {'2'}
    assert [w[:2] for w in writes if w[0] == 'model'] == [['model', '0']] * 4   # each epoch's and the final: by rank 0
    assert [w[:2] for w in writes if w[0] == 'checkpoint'] == [['checkpoint', '0']] * 3
    assert {w[1] for w in writes if w[0] == 'metrics'} == {'0'}
    records = metrics_records(out)
    assert [r.get('epoch') for r in records] == [1, 2, 3, None]
    assert records[2]['train_loss'] < records[0]['train_loss']
    for r in records[:3]:
        assert 0 <= r['valid_acc'] <= 1 and (r['valid_acc'] * 12) % 1 < 1e-9                # a count out of 12 samples
    # the saved head, evaluated in this one process, gives the accuracy the two processes reported
    test_acc = float(records[-1]['final']['test_accuracy'])
    eval_acc = train.main([*map(str, common), '--eval_only', '--pretrained_path', str(out / 'model'),
                           '--output_dir', str(tmp_path / 'eval')])
    assert f"{eval_acc:.4f}" == f"{test_acc:.4f}" or not cached and abs(eval_acc - test_acc) <= 2 / 12 + 1e-9
    assert not [p for p in os.listdir(out) if '.tmp-' in p]
    intervals = read_steps(out)                                   # written by rank 0 alone: each step once
    assert [r['step'] for r in intervals] == sorted({r['step'] for r in intervals})
    assert {r['epoch'] for r in intervals} == {1, 2, 3}
    if cached:                                                   # one consistent cache, written under the lock
        [folder] = [p for p in (tmp_path / 'cache').glob('*/*') if p.is_dir()]
        index = json.loads((folder / 'index.json').read_text())
        assert os.path.getsize(folder / 'hidden.f16') == index['n_rows'] * 2 * index['d_depth'] * index['d_emb']
        spans = sorted(index['texts'].values())
        assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))
