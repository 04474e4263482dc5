"""Issue 11, train.py side: checkpoints load without running code, runs are never overwritten by
accident, --resume refuses other arguments, non-finite heads and empty splits are refused, and bad
output folders, degenerate schedules and failed writes give clear errors before (or instead of) a traceback."""
import errno
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from heinsen_replication import checkpoints, runs
from heinsen_replication.errors import UsageError
from tests.helpers.files import tree
from tests.helpers.training import run, short_sst_args as sst_args

REPO_ROOT = Path(__file__).resolve().parents[1]




class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch pwned',))

# -----------------------------------------------------------------------------
# no code runs from a checkpoint


def test_crafted_checkpoint_cannot_run_code(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'run'
    out.mkdir()
    torch.save({'head': {}, 'optimizer': {}, 'scheduler': {}, 'history': [], 'evil': RunsCode()}, out / 'checkpoint.pt')
    with pytest.raises(UsageError, match='refusing to load .* could run code'):
        run(sst_args(tiny_sst, tiny_bert, out, '--resume'))
    with pytest.raises(UsageError, match='refusing to load'):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'r', '--pretrained_path', out / 'checkpoint.pt'))
    assert not (tmp_path / 'pwned').exists()


def test_real_checkpoint_loads_weights_only(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    checkpoint = torch.load(out / 'checkpoint.pt', weights_only=True)               # plain types only
    assert checkpoint['args']['dataset_name'] == 'sst5' and checkpoint['history'][0]['epoch'] == 1
    from_checkpoint, _ = checkpoints.from_pretrained(out / 'checkpoint.pt')
    saved, _ = checkpoints.from_pretrained(out / 'model')
    assert all(torch.equal(a, b) for a, b in zip(from_checkpoint.state_dict().values(), saved.state_dict().values()))

# -----------------------------------------------------------------------------
# no run is overwritten by accident


def test_rerun_into_a_run_folder_is_refused(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    head = (out / 'model' / 'model.safetensors').read_bytes()
    with pytest.raises(ValueError, match=r"holds a run \(checkpoint.pt, model, metrics.jsonl, epoch1\): pass --resume"):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--rng_seed', 5))
    assert (out / 'model' / 'model.safetensors').read_bytes() == head
    os.remove(out / 'checkpoint.pt')                                                 # a partial run: metrics only
    shutil.rmtree(out / 'model'), shutil.rmtree(out / 'epoch1')
    with pytest.raises(ValueError, match=r'holds a run \(metrics.jsonl\)'):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    with pytest.raises(ValueError, match='no checkpoint.pt to resume from'):        # nothing to resume, would overwrite
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))
    (out / 'epoch7').mkdir()                                                        # of an older, longer run
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--rng_seed', 5, '--overwrite'))
    assert runs.load_checkpoint(str(out / 'checkpoint.pt'))['args']['rng_seed'] == 5
    assert runs.run_files(str(out)) == ['checkpoint.pt', 'model', 'metrics.jsonl', 'epoch1']
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--rng_seed', 5, '--resume'))   # a finished run resumes


def test_finetune_into_the_pretrained_heads_folder_is_refused(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'sst5'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    head = (out / 'model' / 'model.safetensors').read_bytes()
    for pretrained in (out / 'model', f"{out / 'model'}/", out / 'epoch1'):
        argv = sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--pretrained_path', pretrained)
        argv[1] = 'sst2'
        for extra in ([], ['--resume']):
            with pytest.raises(ValueError, match=r"--pretrained_path .* is in --output_dir .* would overwrite it"):
                run(argv + extra)
    assert (out / 'model' / 'model.safetensors').read_bytes() == head
    argv = sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--pretrained_path', out / 'model', '--overwrite')
    argv[1] = 'sst2'
    run(argv)                                                                         # explicit: replaced
    assert load_file(out / 'model' / 'model.safetensors')['route.2.W_S'].shape[-1] == 2


def test_output_dir_checked_before_any_work(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('x')
    monkeypatch.setattr(train.data, 'get_dataset_splits', lambda *a, **k: pytest.fail('data loaded before the check'))
    with pytest.raises(ValueError, match=r"--output_dir .*file' is a file, not a folder"):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'file'))
    with pytest.raises(ValueError, match='is not writable'):                        # below a file: cannot be made
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'file' / 'sub'))


def test_read_only_output_dir_is_refused(tmp_path):
    """As a user without write permission (root writes everywhere: as root, a forked child drops to 'nobody')."""
    import argparse
    ro = tmp_path / 'ro'
    ro.mkdir()
    os.chmod(ro, 0o555)
    os.chmod(tmp_path, 0o755)
    args = argparse.Namespace(output_dir=str(ro), pretrained_path=None, overwrite=False, resume=False)
    if os.geteuid() != 0:
        with pytest.raises(ValueError, match=r'is not writable \(Permission denied\)'):
            runs.check_output_dir(args)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                                                     # the child: never returns
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                runs.check_output_dir(args)
                message = 'no error'
            except ValueError as e:
                message = str(e)
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        message = f.read()
    assert 'is not writable (Permission denied)' in message, message


# -----------------------------------------------------------------------------
# --resume refuses other training arguments


@pytest.mark.parametrize('change, named', [
    (['--rng_seed', 1], '--rng_seed 0 (now 1)'), (['--lr', 0.01], '--lr 0.001 (now 0.01)'),
    (['--batch_sz', 4], '--batch_sz 8 (now 4)'), (['--mixup_alpha', 0], '--mixup_alpha None (now 0.0)'),
    (['--model', 'capsules2019'], "--model 'routing_head' (now 'capsules2019')"),
    (['--dataset_name', 'sst2'], "--dataset_name 'sst5' (now 'sst2')"),
])
def test_resume_refuses_other_training_arguments(tiny_sst, tiny_bert, tmp_path, change, named):
    out = tmp_path / 'run'
    argv = sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--feature_cache', tmp_path / 'cache')
    run(argv)
    checkpoint_bytes = (out / 'checkpoint.pt').read_bytes()
    argv = argv + ['--resume'] + change
    if change[0] == '--dataset_name':
        argv[1] = change[1]
        argv = argv[:-2]
    with pytest.raises(ValueError, match=f"was trained with {named}".replace('(', r'\(').replace(')', r'\)')):
        run(argv)
    assert (out / 'checkpoint.pt').read_bytes() == checkpoint_bytes


def test_resume_takes_arguments_newer_than_the_checkpoint_at_their_default(tiny_sst, tiny_bert, tmp_path):
    pretrained = tmp_path / 'pretrained'
    run(sst_args(tiny_sst, tiny_bert, pretrained, '--n_epochs', 1, '--feature_cache', tmp_path / 'cache'))
    out = tmp_path / 'run'                                       # a fine-tuning run, where --finetune applies
    argv = sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--feature_cache', tmp_path / 'cache',
                    '--pretrained_path', pretrained / 'model')
    run(argv)
    checkpoint = torch.load(out / 'checkpoint.pt', weights_only=True)
    del checkpoint['args']['finetune']                           # written before --finetune existed
    torch.save(checkpoint, out / 'checkpoint.pt')
    run(argv + ['--n_epochs', 1, '--resume'])                    # the default, last_routing: the same run
    with pytest.raises(ValueError, match=r"was trained with --finetune 'last_routing' \(now 'all'\)"):
        run(argv + ['--resume', '--finetune', 'all'])


def test_resume_with_another_backbone_is_refused(tiny_sst, tiny_bert, tiny_roberta, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    with pytest.raises(ValueError, match=r"was trained with --backbone '.*tiny-bert.*' \(now '.*tiny-roberta.*'\)"):
        run(sst_args(tiny_sst, tiny_roberta, out, '--n_epochs', 1, '--resume'))


def test_resume_state_mismatch_is_a_clear_error(tiny_sst, tiny_bert, tmp_path):
    """A checkpoint whose arguments agree but whose tensors do not fit (edited, or from another version)."""
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    checkpoint = runs.load_checkpoint(str(out / 'checkpoint.pt'))
    checkpoint['head'] = {k: v[..., :1] if v.dim() else v for k, v in checkpoint['head'].items()}
    torch.save(checkpoint, out / 'checkpoint.pt')
    with pytest.raises(UsageError, match=r"--resume: .*checkpoint.pt does not fit this run's routing_head for sst5"):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))

# -----------------------------------------------------------------------------
# silently wrong numbers


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_head_is_refused(tiny_sst, tiny_bert, tmp_path, bad):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    state = load_file(out / 'model' / 'model.safetensors')
    name = sorted(state)[0]
    state[name].view(-1)[0] = bad
    save_file(state, tmp_path / 'bad.safetensors')                                  # an older single-file head
    shutil.copytree(out / 'model', tmp_path / 'bad')                                # a model folder
    save_file(state, tmp_path / 'bad' / 'model.safetensors')
    for path in ('bad.safetensors', 'bad'):
        for extra in (['--eval_only'], ['--n_epochs', 1]):
            with pytest.raises(ValueError, match=rf"{path}'.*tensor '{name}' .* holds 1 NaN/Inf values"):
                run(sst_args(tiny_sst, tiny_bert, tmp_path / 'eval', '--pretrained_path', tmp_path / path, *extra))


def test_all_neutral_test_split_is_refused(tiny_sst, tiny_bert, tmp_path):
    sst = Path(tiny_sst) / 'sst'
    (sst / 'test.txt').write_text(tree(2, ['it', 'is', 'a', 'film']) + '\n')
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    argv = sst_args(tiny_sst, tiny_bert, tmp_path / 'eval', '--eval_only', '--pretrained_path', out / 'model')
    argv[1] = 'sst2'
    with pytest.raises(ValueError, match=r'test\.txt: the sst2 test split is empty'):
        run(argv)


def test_validate_refuses_an_empty_loader():
    class Acc:
        is_local_main_process = True
    run = types.SimpleNamespace(head=torch.nn.Identity(), accelerator=Acc(), eval_loaders={'test': []}, backbone=None,
                                cached=True, args=types.SimpleNamespace(dataset_name='sst5', quiet=False))
    with pytest.raises(ValueError, match='the test split has no examples'):
        train.validate(run, 'test')

# -----------------------------------------------------------------------------
# clear errors


def test_capsules2019_with_a_single_warmup_step_is_a_clear_error(tiny_sst, tiny_bert, tmp_path):
    argv = ['--model', 'capsules2019', '--dataset_name', 'sst5', '--backbone', tiny_bert, '--data_root', tiny_sst,
            '--device', 'cpu', '--feature_cache', tmp_path / 'cache', '--output_dir', tmp_path / 'run',
            '--n_epochs', 2, '--n_iters_per_train_epoch', 5]                   # 10 steps: a 10% warm-up of 1 step
    with pytest.raises(ValueError, match=r"10 optimizer steps in all .* warm-up of a single step"):
        run(argv)
    for name in ('--n_epochs', '--n_iters_per_train_epoch', '--batch_sz'):
        with pytest.raises(SystemExit):
            run(sst_args(tiny_sst, tiny_bert, tmp_path / 'r', name, 0))


def test_disk_full_during_checkpoint_write(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    real_save = torch.save
    calls = []

    def fills_the_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:                                                   # epoch 2's checkpoint
            with open(f, 'wb') as fh:
                fh.write(b'partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, 'save', fills_the_disk)
    with pytest.raises(UsageError, match=r'could not write checkpoint .*checkpoint.pt \(disk full: free some space\)'
                                           r'.*previous checkpoint, if any, is intact: run again with --resume'):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--feature_cache', tmp_path / 'cache'))
    monkeypatch.setattr(torch, 'save', real_save)
    assert sorted(set(os.listdir(out)) - {'steps.jsonl', 'train.log'}) == ['.lock', 'checkpoint.pt', 'epoch1', 'epoch2', 'metrics.jsonl']  # nothing else
    assert len(runs.load_checkpoint(str(out / 'checkpoint.pt'))['history']) == 1
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--feature_cache', tmp_path / 'cache', '--resume'))
    assert os.path.exists(out / 'model' / 'model.safetensors')


@pytest.mark.slow                                  # train.py in subprocesses
def test_cli_prints_errors_without_traceback(tiny_sst, tmp_path):
    (tmp_path / 'file').write_text('x')
    out = subprocess.run([sys.executable, 'train.py', '--dataset_name', 'sst5', '--data_root', tiny_sst,
                          '--output_dir', str(tmp_path / 'file'), '--device', 'cpu'],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and 'error: --output_dir' in out.stderr and 'Traceback' not in out.stderr
