"""train.py: one writer per run folder; a head or a checkpoint is never used with another backbone, revision or
dataset than it was trained on; no accuracy is reported from non-finite scores; failed writes (full disk, read-only
folder) and bad arguments are one clear error; --overwrite removes nothing until it can remove everything."""
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

import train
from heinsen_replication import data, runs
from heinsen_replication.errors import UsageError
from tests.helpers.training import run, short_sst_args as sst_args

REPO_ROOT = Path(__file__).resolve().parents[1]




# -----------------------------------------------------------------------------
# one writer per run folder


def test_a_run_folder_in_use_is_refused_at_once(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    out.mkdir()
    held = FileLock(str(out / '.lock'))
    held.acquire()
    loaded = []
    monkeypatch.setattr(data, 'get_dataset_splits', lambda *a, **k: loaded.append(1))
    try:
        for extra in ([], ['--resume'], ['--overwrite']):
            with pytest.raises(ValueError, match=rf"--output_dir '{out}' is in use: another train.py run holds "
                                                 rf"{out}/.lock .*wait for it to finish, or choose another"):
                run(sst_args(tiny_sst, tiny_bert, out, *extra))
        assert loaded == [] and os.listdir(out) == ['.lock']                     # stopped before any work
    finally:
        held.release()


def test_the_lock_is_released_when_a_run_ends_or_fails(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    with pytest.raises(ValueError, match='holds a run'):                           # fails after taking the lock
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))            # the lock is free again
    lock = FileLock(str(out / '.lock'))
    lock.acquire(timeout=0)
    lock.release()


RUNNER = textwrap.dedent('''
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import train
    real = train.train_one_epoch

    def waits(run, epoch, **kwargs):                   # holds the run in its first epoch until told to go on
        open({started!r}, 'w').close()
        while not os.path.exists({go!r}):
            time.sleep(0.05)
        return real(run, epoch, **kwargs)

    train.train_one_epoch = waits
    train.cli(sys.argv[1:])
''')


@pytest.mark.slow
def test_two_processes_on_one_run_folder(tiny_sst, tiny_bert, tmp_path):
    """Started together, the second run (and a --resume of the first) stops at once; the folder holds one run."""
    out, script = tmp_path / 'run', tmp_path / 'runner.py'
    script.write_text(RUNNER.format(started=str(tmp_path / 'started'), go=str(tmp_path / 'go')))
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'OMP_NUM_THREADS': '1'}
    argv = [str(a) for a in sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--feature_cache', tmp_path / 'c')]
    first = subprocess.Popen([sys.executable, str(script), *argv, '--rng_seed', '1'], env=env, cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):
            if (tmp_path / 'started').exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert (tmp_path / 'started').exists(), first.communicate()
        for extra in (['--rng_seed', '2'], ['--rng_seed', '1', '--resume']):
            second = subprocess.run([sys.executable, str(script), *argv, *extra], env=env, cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=600)
            assert second.returncode == 2, second.stderr
            assert f"error: --output_dir '{out}' is in use" in second.stderr and 'Traceback' not in second.stderr
        (tmp_path / 'go').touch()
        stdout, stderr = first.communicate(timeout=600)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, stderr
    checkpoint = runs.load_checkpoint(str(out / 'checkpoint.pt'))
    assert checkpoint['args']['rng_seed'] == 1
    assert json.loads((out / 'epoch1' / 'config.json').read_text())['training']['epoch'] == 1
    assert sorted(set(os.listdir(out)) - {'steps.jsonl', 'train.log'}) == ['.lock', 'checkpoint.pt', 'epoch1', 'metrics.jsonl',
                                                                      'model']


# -----------------------------------------------------------------------------
# provenance: backbone, revision, data


@pytest.fixture
def trained(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--feature_cache', tmp_path / 'cache'))
    return out


@pytest.mark.parametrize('older', [False, True], ids=['checkpoint', 'checkpoint of an older train.py'])
def test_checkpoint_as_pretrained_path_checks_its_backbone(trained, tiny_sst, tiny_roberta, tmp_path, older):
    """The checkpoint's backbone (or, in older checkpoints, its --backbone argument) is compared, as model/'s is."""
    path = trained / 'checkpoint.pt'
    if older:
        checkpoint = runs.load_checkpoint(str(path))
        del checkpoint['backbone'], checkpoint['backbone_revision']
        path = tmp_path / 'older.pt'
        torch.save(checkpoint, path)
    for pretrained in (path, trained / 'model'):
        with pytest.raises(ValueError, match=rf"--pretrained_path '{pretrained}' was trained with backbone "
                                             rf"'.*tiny-bert.*', not --backbone '.*tiny-roberta.*'"):
            run(['--dataset_name', 'sst5', '--backbone', tiny_roberta, '--data_root', tiny_sst, '--device', 'cpu',
                 '--eval_only', '--pretrained_path', pretrained])


def test_pretrained_path_checks_the_backbone_revision(trained, tiny_sst, tiny_bert, tmp_path):
    model = tmp_path / 'model'
    shutil.copytree(trained / 'model', model)
    config = json.loads((model / 'config.json').read_text())
    (model / 'config.json').write_text(json.dumps({**config, 'backbone_revision': 'v1'}))
    with pytest.raises(ValueError, match=r"at revision 'v1', not --revision None: pass --revision v1"):
        run(['--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst, '--device', 'cpu',
             '--eval_only', '--pretrained_path', model])
    checkpoint = runs.load_checkpoint(str(trained / 'checkpoint.pt'))
    checkpoint['backbone_revision'] = 'v1'
    torch.save(checkpoint, tmp_path / 'pinned.pt')
    with pytest.raises(ValueError, match=r"at revision 'v1', not --revision None"):
        run(['--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst, '--device', 'cpu',
             '--eval_only', '--pretrained_path', tmp_path / 'pinned.pt'])


def test_resume_on_other_data_is_refused_and_the_same_data_moved_is_not(trained, tiny_sst, tiny_bert, tmp_path):
    argv = sst_args(tiny_sst, tiny_bert, trained, '--n_epochs', 1, '--feature_cache', tmp_path / 'cache', '--resume')
    other = tmp_path / 'other'
    shutil.copytree(Path(tiny_sst) / 'sst', other / 'sst')
    lines = (other / 'sst' / 'train.txt').read_text().splitlines()
    (other / 'sst' / 'train.txt').write_text('\n'.join(lines[1:] + lines[:1]) + '\n')   # the same trees, reordered
    checkpoint_bytes = (trained / 'checkpoint.pt').read_bytes()
    with pytest.raises(ValueError, match=rf"--resume: .*checkpoint.pt was trained on other data: the train split "
                                         rf"differs from the one it recorded \(--data_root '{tiny_sst}' \(now "
                                         rf"'{other}'\)\)"):
        run([*argv[:5], other, *argv[6:]])
    assert (trained / 'checkpoint.pt').read_bytes() == checkpoint_bytes
    moved = tmp_path / 'moved'
    shutil.copytree(Path(tiny_sst) / 'sst', moved / 'sst')
    run([*argv[:5], moved, *argv[6:]])                                             # the same data elsewhere


def test_data_fingerprint_sees_texts_and_labels(tiny_sst):
    splits = data.get_dataset_splits('sst5', data_root=tiny_sst)
    train_split = splits['train']
    before = data.split_fingerprint(train_split)
    assert before == data.split_fingerprint(data.TextDataset(train_split.texts, train_split.labels))
    assert before != data.split_fingerprint(data.TextDataset(train_split.texts, [0] + train_split.labels[1:]))
    assert before != data.split_fingerprint(data.TextDataset(train_split.texts[:-1], train_split.labels[:-1]))
    assert data.split_fingerprint(splits['valid']) != data.split_fingerprint(splits['test'])


@pytest.mark.parametrize('name, before, after, refused', [
    ('feature_cache', 'a', None, r"--feature_cache 'a' \(now None\)"),
    ('feature_cache', None, 'a', r"--feature_cache None \(now 'a'\)"),
    ('feature_cache', 'a', 'b', None),                                   # the same features, in a moved cache
    ('matmul_precision', 'highest', 'medium', r"--matmul_precision 'highest' \(now 'medium'\)"),
])
def test_resume_compares_feature_cache_and_matmul_precision(name, before, after, refused):
    args = train.parse_args(['--dataset_name', 'sst5', f'--{name}', after] if after else ['--dataset_name', 'sst5'])
    checkpoint = {'args': {**vars(args), name: before}}
    defaults = vars(train.parse_args(['--dataset_name', 'sst5']))
    if refused is None:
        runs.check_resume_args(checkpoint, args, 'checkpoint.pt', defaults)
    else:
        with pytest.raises(ValueError, match=rf"--resume: checkpoint.pt was trained with {refused}"):
            runs.check_resume_args(checkpoint, args, 'checkpoint.pt', defaults)


# -----------------------------------------------------------------------------
# no accuracy from damaged features or non-finite scores


def test_eval_only_on_a_cache_with_nan_rows_is_refused(trained, tiny_sst, tiny_bert, tmp_path):
    argv = ['--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst, '--device', 'cpu',
            '--eval_only', '--pretrained_path', trained / 'model', '--feature_cache', tmp_path / 'cache']
    clean = run(argv)
    [hidden] = (tmp_path / 'cache').glob('*/*/hidden.f16')
    index = json.loads((hidden.parent / 'index.json').read_text())
    test_text = data.get_dataset_splits('sst5', data_root=tiny_sst)['test'].texts[3]
    start, length, _ = index['texts'][test_text]
    rows = np.memmap(hidden, dtype=np.float16, mode='r+', shape=(index['n_rows'], index['d_depth'], index['d_emb']))
    rows[start:start + length] = np.nan
    rows.flush()
    del rows
    with pytest.raises(ValueError, match=rf"is damaged: the features of the text '{test_text}' .* do not match their "
                                         rf"checksum.*Rebuild it: rm -r "):
        run(argv)
    assert 0 <= clean <= 1


def test_evaluation_refuses_non_finite_scores(trained, tiny_sst, tiny_bert, monkeypatch):
    real = train.class_scores

    def one_nan(head, inputs, mask):
        scores = real(head, inputs, mask)
        return torch.cat([scores[:1] * float('nan'), scores[1:]])

    monkeypatch.setattr(train, 'class_scores', one_nan)
    with pytest.raises(UsageError, match=r"the test scores of [1-9]\d* of \d+ examples are not finite "
                                                 r"\(NaN/Inf\): refusing to report an accuracy"):
        run(['--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst, '--device', 'cpu',
             '--eval_only', '--pretrained_path', trained / 'model'])


# -----------------------------------------------------------------------------
# failed writes: one clear error, nothing lost


@pytest.mark.parametrize('free', [0, 1 << 40])
def test_torch_unexpected_pos_on_a_full_disk_is_the_disk_full_error(tiny_sst, tiny_bert, tmp_path, monkeypatch, free):
    out = tmp_path / 'run'
    real_save, calls = torch.save, []

    def fails(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:                                                       # epoch 2's checkpoint
            raise RuntimeError('[enforce fail at inline_container.cc:671] . unexpected pos 1472 vs 1370\n'
                               'frame #0: c10::ThrowEnforceNotMet(...)')
        return real_save(obj, f, *a, **k)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(torch, 'save', fails)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=free))
    disk = r' \(disk full: free some space\)' if free == 0 else ''
    with pytest.raises(UsageError, match=rf"could not write checkpoint .*checkpoint.pt{disk}: \[enforce fail at "
                                           rf"inline_container.cc:671\] . unexpected pos 1472 vs 1370. The previous "
                                           rf"checkpoint, if any, is intact: run again with --resume") as e:
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--feature_cache', tmp_path / 'cache'))
    assert 'frame #0' not in str(e.value)
    monkeypatch.undo()
    assert len(runs.load_checkpoint(str(out / 'checkpoint.pt'))['history']) == 1
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--feature_cache', tmp_path / 'cache', '--resume'))


@pytest.mark.parametrize('failure, why', [(errno.ENOSPC, 'disk full: free some space'),
                                          (errno.EROFS, 'read-only file system')])
def test_full_or_read_only_disk_during_the_epoch_model_write(tiny_sst, tiny_bert, tmp_path, monkeypatch, failure,
                                                             why):
    out = tmp_path / 'run'
    real_write = data.write_atomic

    def fails_in_epoch2(path, content):
        if f'{os.sep}epoch2{os.sep}' in path:
            raise OSError(failure, os.strerror(failure))
        return real_write(path, content)

    monkeypatch.setattr(data, 'write_atomic', fails_in_epoch2)
    with pytest.raises(UsageError, match=rf"could not write .*epoch2 \({why}\). The checkpoint of the epoch before, "
                                           rf"if any, is intact: run again with --resume"):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--feature_cache', tmp_path / 'cache'))
    monkeypatch.undo()
    assert len(runs.load_checkpoint(str(out / 'checkpoint.pt'))['history']) == 1
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--feature_cache', tmp_path / 'cache', '--resume'))
    assert (out / 'model' / 'model.safetensors').exists()


@pytest.mark.parametrize('argument, value, expected', [
    ('--mixup_alpha', -1, '--mixup_alpha must be 0 (no mixup) or positive, got -1.0'),
    ('--mixup_alpha', 'nan', '--mixup_alpha must be 0 (no mixup) or positive, got nan'),
    ('--max_length', 2, '--max_length must be at least 3'), ('--max_length', 0, '--max_length must be at least 3'),
    ('--lr', 0, '--lr must be a positive number, got 0.0'), ('--lr', 'inf', '--lr must be a positive number'),
    ('--image_size', 0, '--image_size must be a positive integer'),
])
def test_bad_arguments_are_refused_by_the_parser(argument, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(['--dataset_name', 'sst5', argument, str(value)])
    assert e.value.code == 2 and expected in capsys.readouterr().err


# -----------------------------------------------------------------------------
# --overwrite: all or nothing


def test_overwrite_removes_a_symlinked_epoch_as_a_link(trained, tiny_sst, tiny_bert, tmp_path):
    elsewhere = tmp_path / 'elsewhere'
    shutil.move(trained / 'epoch1', elsewhere)
    os.symlink(elsewhere, trained / 'epoch1')
    kept = sorted(os.listdir(elsewhere))
    run(sst_args(tiny_sst, tiny_bert, trained, '--n_epochs', 1, '--overwrite', '--rng_seed', 3))
    assert sorted(os.listdir(elsewhere)) == kept                                  # what the link pointed at: kept
    assert not os.path.islink(trained / 'epoch1') and (trained / 'epoch1' / 'model.safetensors').exists()
    assert runs.load_checkpoint(str(trained / 'checkpoint.pt'))['args']['rng_seed'] == 3
    assert sorted(os.listdir(trained)) == ['.lock', 'checkpoint.pt', 'epoch1', 'metrics.jsonl', 'model', 'steps.jsonl',
                                          'train.log']


def test_overwrite_removes_nothing_if_it_cannot_remove_everything(trained, tiny_sst, tiny_bert, monkeypatch):
    def kept(p):                                          # train.log: every start on the folder, appended
        return p.is_file() and p.name not in ('.lock', 'train.log')

    before = {p: p.read_bytes() for p in trained.rglob('*') if kept(p)}
    real_rename = os.rename

    def cannot_move_model(src, dst):
        if os.path.basename(src) == 'model':
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return real_rename(src, dst)

    monkeypatch.setattr(os, 'rename', cannot_move_model)
    with pytest.raises(UsageError, match=r"--overwrite: cannot remove .*model \(Device or resource busy\); nothing "
                                           r"of the old run was removed"):
        run(sst_args(tiny_sst, tiny_bert, trained, '--n_epochs', 1, '--overwrite', '--rng_seed', 3))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in trained.rglob('*') if kept(p)} == before
    assert not [n for n in os.listdir(trained) if n.startswith('.overwritten-')]


@pytest.mark.slow
def test_cli_errors_of_damaged_inputs_are_one_line(trained, tiny_sst, tiny_bert, tmp_path):
    damaged = tmp_path / 'damaged'
    shutil.copytree(trained / 'model', damaged)
    os.truncate(damaged / 'model.safetensors', 100)
    base = [sys.executable, 'train.py', '--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst,
            '--device', 'cpu']
    [hidden] = (tmp_path / 'cache').glob('*/*/hidden.f16')
    index = json.loads((hidden.parent / 'index.json').read_text())
    start, _, _ = index['texts'][data.get_dataset_splits('sst5', data_root=tiny_sst)['test'].texts[0]]
    with open(hidden, 'r+b') as f:                                                # flip a bit of a test text's rows
        f.seek(start * index['d_depth'] * index['d_emb'] * 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    cached = ['--eval_only', '--pretrained_path', str(trained / 'model'), '--feature_cache', str(tmp_path / 'cache')]
    for argv, expected in ((['--eval_only', '--pretrained_path', str(damaged)], 'is not a complete safetensors file'),
                           (['--mixup_alpha', '-1'], '--mixup_alpha must be 0 (no mixup) or positive'),
                           (cached + ['--num_workers', '1'], 'do not match their checksum'),   # from a loader worker
                           (cached, 'do not match their checksum')):
        out = subprocess.run(base + argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and expected in out.stderr and 'Traceback' not in out.stderr, out.stderr
        assert len([line for line in out.stderr.splitlines() if 'error' in line]) == 1
