"""What a run really used, and every failed write resumable: --resume and --pretrained_path refuse a backbone whose
weights or tokenizer changed under the same name (a fingerprint recorded in checkpoints and model configs), a head
whose shapes contradict the backbone is refused, a write that fails in any library is one line and --resume
finishes the run, and --resume never writes through a link into another run."""
import json
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from heinsen_replication import models, pretrained, runs
from heinsen_replication.errors import UsageError
from tests.helpers.training import run, short_sst_args as sst_args


def copy_backbone(tiny_bert, tmp_path):
    folder = tmp_path / 'backbone'
    shutil.copytree(tiny_bert, folder)
    return folder


def scale_one_layer(folder):
    weights = load_file(folder / 'model.safetensors')
    name = next(k for k in sorted(weights) if 'layer.1' in k and k.endswith('weight'))
    weights[name] = weights[name] * 1.5
    save_file(weights, folder / 'model.safetensors', metadata={'format': 'pt'})


def lower_case_off(folder):
    config = json.loads((folder / 'tokenizer_config.json').read_text())
    config['do_lower_case'] = not config.get('do_lower_case', True)
    (folder / 'tokenizer_config.json').write_text(json.dumps(config))


# -----------------------------------------------------------------------------
# provenance: the backbone's fingerprint


@pytest.mark.parametrize('change, named', [(scale_one_layer, 'weights'), (lower_case_off, 'tokenizer settings')])
def test_resume_after_the_backbones_weights_or_tokenizer_changed_is_refused(tiny_sst, tiny_bert, tmp_path, change,
                                                                             named):
    backbone, out = copy_backbone(tiny_bert, tmp_path), tmp_path / 'run'
    run(sst_args(tiny_sst, backbone, out, '--n_epochs', 1))
    recorded = runs.load_checkpoint(str(out / 'checkpoint.pt'))['backbone_fingerprint']
    assert set(recorded) == set(runs.PROVENANCE)
    assert json.loads((out / 'model' / 'config.json').read_text())['backbone_fingerprint'] == recorded
    run(sst_args(tiny_sst, backbone, out, '--n_epochs', 1, '--resume'))                  # unchanged: resumes
    change(backbone)
    checkpoint = (out / 'checkpoint.pt').read_bytes()
    with pytest.raises(UsageError) as e:
        run(sst_args(tiny_sst, backbone, out, '--n_epochs', 1, '--resume'))
    message = str(e.value)
    assert message.startswith('--resume: ') and named in message.split(' whose ')[1]
    assert 'differ from those of --backbone' in message and '\n' not in message
    assert (out / 'checkpoint.pt').read_bytes() == checkpoint
    for extra in (['--eval_only'], ['--n_epochs', 1]):                                   # the same for its head
        with pytest.raises(UsageError, match=rf"--pretrained_path .*model was trained on a backbone .* whose "
                                             rf".*{named}"):
            run(sst_args(tiny_sst, backbone, tmp_path / 'next', '--pretrained_path', out / 'model', *extra))


def test_a_head_without_a_fingerprint_still_loads_and_says_so(tiny_sst, tiny_bert, tmp_path, capsys):
    """Heads written before fingerprints were recorded (pretrained/*, the authors' files) keep loading."""
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    config = json.loads((out / 'model' / 'config.json').read_text())
    del config['backbone_fingerprint']
    (out / 'model' / 'config.json').write_text(json.dumps(config))
    capsys.readouterr()
    run(sst_args(tiny_sst, tiny_bert, tmp_path / 'eval', '--pretrained_path', out / 'model', '--eval_only'))
    assert 'records no fingerprint of its backbone' in capsys.readouterr().err


def test_a_head_for_another_backbone_is_refused_unless_a_subset_is_asked_for(tiny_sst, tiny_bert, tmp_path, capsys):
    """The authors' file name of a roberta-large head (25 depths x 1024) with another backbone: refused, not
    fine-tuned with random frozen routings."""
    path = tmp_path / 'pretrained_sst5_head_for_roberta-large.state_dict'
    torch.save(models.RoutingHead(5, 48, 5, n_hid=4).state_dict(), path)            # tiny_bert gives 3 x 32
    for extra in ([], ['--eval_only']):
        with pytest.raises(UsageError, match=r"routes hidden states of 5 depths x 48, but --backbone .* gives 3 x 32"
                                             if not extra else r"does not fit a routing_head .* hidden states of 5 "
                                                               r"depths x 48"):
            run(sst_args(tiny_sst, tiny_bert, tmp_path / 'run', '--n_epochs', 1, '--pretrained_path', path, *extra))
    run(sst_args(tiny_sst, tiny_bert, tmp_path / 'run', '--n_epochs', 1, '--pretrained_path', path,
                 '--pretrained_subset'))
    assert '--pretrained_subset: the head was trained on 5 depths x 48' in capsys.readouterr().out


# -----------------------------------------------------------------------------
# every failed write is one line, and resumable


def test_disk_full_during_a_model_write_is_one_line_and_resume_finishes(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    """safetensors raises its own error type (not OSError) on a full disk: the first epoch's model cannot be written,
    no checkpoint exists yet, and --resume starts over once space is freed."""
    out, real_save = tmp_path / 'run', pretrained.save_model

    def full(model, path, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(pretrained, 'save_model', full)
    with pytest.raises(UsageError) as e:
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2))
    message = str(e.value)
    assert f"could not write {out / 'epoch1'} (disk full: free some space)" in message, message
    assert 'run again with --resume' in message and 'free at least 1 MiB in' in message and '\n' not in message
    assert os.path.isdir(out / 'epoch1') and not (out / 'checkpoint.pt').exists()      # an incomplete epoch folder
    monkeypatch.setattr(pretrained, 'save_model', real_save)                            # space freed
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--resume'))
    assert len(runs.load_checkpoint(str(out / 'checkpoint.pt'))['history']) == 2
    assert (out / 'model' / 'model.safetensors').exists()


def test_a_kill_between_the_epoch_folder_and_the_first_checkpoint_does_not_block_resume(tiny_sst, tiny_bert, tmp_path,
                                                                                       monkeypatch):
    out = tmp_path / 'run'

    def killed(state, path):
        raise KeyboardInterrupt                                        # as a kill: nothing after epoch1/ is written

    monkeypatch.setattr(runs, 'save_checkpoint', killed)
    with pytest.raises(KeyboardInterrupt):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    monkeypatch.undo()
    assert sorted(set(os.listdir(out)) - {'steps.jsonl', 'train.log'}) == ['.lock', 'epoch1']
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))
    assert runs.run_files(str(out)) == ['checkpoint.pt', 'model', 'metrics.jsonl', 'epoch1']


def test_a_failed_final_model_write_is_one_line_and_resume_writes_it(tiny_sst, tiny_bert, tmp_path, monkeypatch):
    out, real_save = tmp_path / 'run', pretrained.save_model
    monkeypatch.setattr(pretrained, 'save_model', lambda model, path, *a, **k: (
        real_save(model, path, *a, **k) if f'{os.sep}epoch' in path else (_ for _ in ()).throw(
            SafetensorError('Error while serializing: I/O error: Disk quota exceeded (os error 122)'))))
    with pytest.raises(UsageError, match=r"could not write .*model \(disk quota exceeded: free some space\).* "
                                           r"run again with --resume to write the model"):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    monkeypatch.undo()
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))
    assert (out / 'model' / 'model.safetensors').exists()


# -----------------------------------------------------------------------------
# --resume never writes through a link into another run


@pytest.mark.parametrize('linked', ['model', pytest.param('epoch2', marks=pytest.mark.slow)])   # 3 runs each
def test_resume_never_writes_through_a_link_into_another_run(tiny_sst, tiny_bert, tmp_path, monkeypatch, linked):
    other, out = tmp_path / 'other', tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, other, '--n_epochs', 2, '--rng_seed', 7))
    before = {p: p.read_bytes() for p in other.rglob('*') if p.is_file()}
    real_save, calls = torch.save, []

    def stops_in_epoch2(obj, f, *a, **k):                  # the run stops after epoch 2's model, before its checkpoint
        calls.append(f)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, 'save', stops_in_epoch2)
    with pytest.raises(KeyboardInterrupt):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2))
    monkeypatch.undo()
    shutil.rmtree(out / 'epoch2')
    os.symlink(other / ('epoch1' if linked == 'epoch2' else 'model'), out / linked)
    with pytest.raises(UsageError, match=rf"{out / linked} is a link to .*other.*, outside the run's folder .*: this "
                                         rf"run never writes through it .* remove the link \(rm {out / linked}\)"):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--resume'))
    assert {p: p.read_bytes() for p in other.rglob('*') if p.is_file()} == before
    os.remove(out / linked)
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 2, '--resume'))
    assert {p: p.read_bytes() for p in other.rglob('*') if p.is_file()} == before
    assert not (out / linked).is_symlink() and (out / 'model' / 'model.safetensors').exists()


def test_a_link_made_during_the_run_is_not_written_through(tmp_path):
    """The check at the write itself (runs.save_model), for a link that appears after the run's checks."""
    out, other = tmp_path / 'run', tmp_path / 'other'
    out.mkdir(), other.mkdir()
    os.symlink(other, out / 'epoch3')
    with pytest.raises(UsageError, match='is a link to .*other'):
        runs.save_model(models.RoutingHead(3, 8, 2, n_hid=4), str(out / 'epoch3'), None, {}, then='')
    assert os.listdir(other) == []
