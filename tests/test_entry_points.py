"""train.py and the package as a user meets them: a mistake of the user's is one line `error: ...` and exit status 2,
anything else (our bug, CUDA out of memory) keeps its traceback; from a folder outside the repository the README's
code loads a pretrained head and `python <repo>/train.py` takes its paths relative to where it was started; a run
started by a function call (train.main) leaves the process's global settings as it found them."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train
from tests.helpers.files import write_sst
from tests.helpers.training import run, short_sst_args

ROOT = Path(__file__).resolve().parent.parent


def test_a_usage_error_is_one_line_and_exit_status_2(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(SystemExit) as e:
        train.cli(['--dataset_name', 'sst5', '--output_dir', str(tmp_path / 'file'), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: --output_dir') and err.count('\n') == 1, err


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    def fails(args):
        raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 GiB (forced by the test)')

    monkeypatch.setattr(train, 'build_run', fails)
    with pytest.raises(RuntimeError, match='CUDA out of memory'):           # not turned into one line and exit 2
        train.cli(['--dataset_name', 'sst5', '--output_dir', str(tmp_path / 'run'), '--device', 'cpu'])


def test_a_run_called_as_a_function_leaves_the_settings_as_it_found_them(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    seen, real = [], train.train_one_epoch
    monkeypatch.setattr(train, 'train_one_epoch', lambda run_, epoch: seen.append(
        (torch.get_float32_matmul_precision(), torch.get_num_threads())) or real(run_, epoch))
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run(short_sst_args(tiny_sst, tiny_bert, tmp_path / 'run', '--n_epochs', 1, '--matmul_precision', 'medium',
                       '--threads', threads + 1))
    assert seen == [('medium', threads + 1)]                                  # the run's, while it runs
    assert (torch.get_float32_matmul_precision(), torch.get_num_threads()) == ('highest', threads)   # then ours
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow                                  # train.py in subprocesses
def test_the_command_line_prints_a_traceback_for_internal_errors_only(tmp_path):
    script = tmp_path / 'fails.py'
    script.write_text(textwrap.dedent('''
        import sys
        import train

        def fails(args):
            raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 GiB (forced by the test)')

        train.build_run = fails
        train.cli(sys.argv[1:])
    '''))
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    argv = ['--dataset_name', 'sst5', '--output_dir', str(tmp_path / 'run'), '--device', 'cpu']
    out = subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and 'Traceback' in out.stderr and 'RuntimeError: CUDA out of memory' in out.stderr
    (tmp_path / 'file').write_text('x')
    out = subprocess.run([sys.executable, str(ROOT / 'train.py'), *argv[:2], '--output_dir', 'file', '--device', 'cpu'],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.splitlines() == [out.stderr.strip()] and 'Traceback' not in out.stderr
    assert out.stderr.startswith(f"error: --output_dir 'file' (relative to the current folder {tmp_path}) is a file")


@pytest.mark.slow                                  # subprocesses that load all-MiniLM-L6-v2
def test_from_a_folder_outside_the_repository(tmp_path):
    site = tmp_path / 'site'                       # what the README's install puts on the path: the packages only
    site.mkdir()
    for package in ('heinsen_routing', 'heinsen_replication'):
        (site / package).symlink_to(ROOT / package)
    env = {**os.environ, 'PYTHONPATH': str(site), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    work = tmp_path / 'work'
    (work / 'heads').mkdir(parents=True)
    (work / 'heads' / 'sst2').symlink_to(ROOT / 'pretrained' / 'sst2_minilm_routing_head')
    readme = (ROOT / 'README.md').read_text()
    snippet = re.search(r"Load our pretrained SST-2 head.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    assert 'heinsen_replication' in snippet and 'import models' not in snippet
    snippet = snippet.replace('pretrained/sst2_minilm_routing_head', 'heads/sst2')   # the folder, where it is
    out = subprocess.run([sys.executable, '-c', snippet], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.splitlines()[-1].split()[:2] == ['RoutingHead', 'minilm'], out.stderr

    write_sst(work / 'data' / 'sst')
    argv = [sys.executable, str(ROOT / 'train.py'), '--dataset_name', 'sst2', '--eval_only', '--data_root', 'data',
            '--device', 'cpu', '--threads', '1', '--pretrained_path']
    out = subprocess.run([*argv, 'heads/sst2'], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and 'test accuracy: ' in out.stdout, out.stderr
    for missing in ('heads/sst5', 'heads/sst5_head.safetensors'):
        out = subprocess.run([*argv, missing], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
        assert f"{missing!r}: no such folder or file (relative to the current folder {work})" in out.stderr
