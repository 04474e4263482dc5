"""Watching a run: --log_with tensorboard writes the training figures every log interval and the evaluation every
epoch into the run's folder (read back here from the event files); steps.jsonl keeps the same figures and survives
--resume without a gap or a duplicate; train.log and the start and end summaries; logging levels."""
import json
import os

import pytest

import train
from heinsen_replication.reporting import measured_offline, read_scalars, read_steps
from tests.helpers.training import run, sst_args


def scalars(output_dir):
    return read_scalars(str(output_dir))


def test_log_with_tensorboard_writes_curves_and_steps(tiny_sst, tiny_bert, tmp_path, capsys):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--n_iters_per_train_epoch', 6, '--log_every', 2,
                 '--log_with', 'tensorboard', '--run_test'))
    found = scalars(out)
    assert [step for step, _ in found['train/train_loss']] == [2, 4, 6, 8, 10, 12]      # 3 points per epoch
    for tag in ('train/train_acc', 'train/lr', 'train/step_seconds', 'train/samples_per_second'):
        assert [step for step, _ in found[tag]] == [2, 4, 6, 8, 10, 12], tag
    assert [step for step, _ in found['valid/accuracy']] == [6, 12]                    # once per epoch
    assert [step for step, _ in found['test/accuracy']] == [12]
    steps = read_steps(out)
    assert [r['step'] for r in steps] == [2, 4, 6, 8, 10, 12] and [r['epoch'] for r in steps] == [1, 1, 1, 2, 2, 2]
    for record, (_, value) in zip(steps, found['train/train_loss']):
        assert record['train_loss'] == pytest.approx(value, rel=1e-6)
    # the epochs' records agree with their intervals: the epoch's mean loss is the mean of its intervals' (equal sizes)
    epochs = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()][:2]
    assert epochs[0]['train_loss'] == pytest.approx(sum(r['train_loss'] for r in steps[:3]) / 3, rel=1e-5)
    assert [v for _, v in found['valid/accuracy']] == pytest.approx([e['valid_acc'] for e in epochs])
    text = capsys.readouterr().out
    assert 'train.py: routing_head on sst5' in text and 'steps:     2 epoch(s) x 6 steps of 8 = 12' in text
    assert f"done: routing_head for sst5 in {out}/model/" in text and 'test accuracy' in text
    assert '--eval_only --pretrained_path' in text
    log = (out / 'train.log').read_text()
    assert 'started (pid' in log and 'train.py: routing_head on sst5' in log and 'done: routing_head' in log
    from benchmarks.training_curves import draw                                       # the figure of docs/
    draw(str(out), tmp_path / 'curves.png')
    assert (tmp_path / 'curves.png').stat().st_size > 10_000


def test_steps_record_survives_resume_without_gaps_or_duplicates(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    """A run killed in its second epoch, after logging step 8 (its checkpoint is epoch 1's, step 6), then resumed:
    steps.jsonl and the TensorBoard curves have each step once, 2, 4, ..., 12, and the resumed steps' figures are
    those of an uninterrupted run."""
    common = ['--n_epochs', 2, '--n_iters_per_train_epoch', 6, '--log_every', 2, '--log_with', 'tensorboard',
              '--rng_seed', 3]
    run(sst_args(tiny_sst, tiny_bert, tmp_path / 'straight', *common))
    real_train_step, calls = train.train_step, []

    def killed_at_step_9(run_, batch):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt('killed')
        return real_train_step(run_, batch)

    monkeypatch.setattr(train, 'train_step', killed_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'resumed', *common))
    assert [r['step'] for r in read_steps(tmp_path / 'resumed')] == [2, 4, 6, 8]
    assert [step for step, _ in scalars(tmp_path / 'resumed')['train/train_loss']] == [2, 4, 6, 8]
    monkeypatch.setattr(train, 'train_step', real_train_step)
    run(sst_args(tiny_sst, tiny_bert, tmp_path / 'resumed', *common, '--resume'))
    straight, resumed = read_steps(tmp_path / 'straight'), read_steps(tmp_path / 'resumed')
    assert [r['step'] for r in resumed] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(straight, resumed):
        assert (a['step'], a['epoch']) == (b['step'], b['epoch'])
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5) and a['lr'] == pytest.approx(b['lr'])
    curves = scalars(tmp_path / 'resumed')
    assert [step for step, _ in curves['train/train_loss']] == [2, 4, 6, 8, 10, 12]       # step 8's first try purged
    assert [v for _, v in curves['train/train_loss']] == pytest.approx([r['train_loss'] for r in resumed], rel=1e-6)
    assert [step for step, _ in curves['valid/accuracy']] == [6, 12]
    log = (tmp_path / 'resumed' / 'train.log').read_text()
    assert log.count('started (pid') == 2 and 'resuming after step 6' in log


def test_quiet_prints_nothing_but_warnings_and_keeps_the_log_file(tiny_sst, tiny_bert, tmp_path, capsys):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--n_iters_per_train_epoch', 2, '--quiet'))
    printed = capsys.readouterr()
    assert printed.out == '' and 'sst5 train' not in printed.err                     # no messages, no progress bar
    assert 'done: routing_head for sst5' in (out / 'train.log').read_text()
    assert read_steps(out) and not (out / 'trackers').exists()                         # no tracker unless asked


def test_log_with_a_tracker_that_is_not_installed_is_a_one_line_error(tiny_sst, tiny_bert, tmp_path, capsys):
    from heinsen_replication.reporting import trackers_available
    absent = next(name for name in ('clearml', 'dvclive', 'aim', 'swanlab') if name not in trackers_available())
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset_name', 'sst5', '--log_with', f'tensorboard,{absent}'])
    assert f'--log_with {absent}: not an installed tracker' in capsys.readouterr().err


def test_the_offline_job_says_what_it_will_do_and_where_its_heads_are(tiny_sst, tiny_bert, tmp_path):
    """`bash train_all_heads.sh offline` (LAUNCH=echo: the runs printed, not run) starts with the job's summary,
    its estimated cost from the committed measurement, and ends with each head's folder, figures and commands;
    stdout stays the runs alone. The SST-5 head here is a real tiny run in the job's folder."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sst5 = tmp_path / 'offline' / 'seed0' / 'sst5'
    run(sst_args(tiny_sst, tiny_bert, sst5, '--n_epochs', 1, '--n_iters_per_train_epoch', 2, '--run_test', '--quiet'))
    done = subprocess.run(['bash', os.path.join(root, 'train_all_heads.sh'), 'offline'], capture_output=True,
                          text=True, check=True, env={**os.environ, 'LAUNCH': 'echo', 'OUT': str(tmp_path),
                                                      'DATA_ROOT': tiny_sst})
    assert [line.split()[0] for line in done.stdout.splitlines()] == ['train.py', 'train.py']
    start, end = done.stderr.split('train_all_heads.sh offline: done')
    assert start.startswith('train_all_heads.sh offline: 2 run(s), seed 0') and 'routing_head for sst2 on minilm' in start
    measured = measured_offline(os.path.join(root, 'docs', 'resources', 'record.json'))     # the committed record
    assert f"{measured['wall_s'] / 60:.1f} min from scratch on {measured['meta']['cpu_count']} cores of " \
           f"{measured['meta']['cpu_model']}" in start and 'estimate:  about ' in start
    assert ('sst5 finished' if not measured.get('runs') else 'sst2 2000 steps') in start     # sst5 is done: skipped
    final = json.loads((sst5 / 'metrics.jsonl').read_text().splitlines()[-1])['final']
    assert f"sst5:      {sst5}/model/: valid accuracy {final['valid_accuracy']:.2%}, test accuracy " \
           f"{final['test_accuracy']:.2%}" in end
    assert f"--eval_only --pretrained_path {sst5}/model" in end and 'sst2:      no model in' in end
    assert f"models.from_pretrained('{sst5}/model')" in end
