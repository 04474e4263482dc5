"""What a new user sees first when something is missing: each message says what to do (issue 22's first-contact
list). Everything here runs offline."""
import errno
import os
import re
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import train
from heinsen_replication import backbones, checkpoints, data, models, runs
from heinsen_replication.classifier import MultiModalClassifier
from heinsen_replication.errors import UsageError
from heinsen_replication.pretrained import looks_local, read_config
from tests.helpers.training import run, short_sst_args as sst_args


def test_a_known_hub_backbone_offline_says_it_could_not_be_fetched_and_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty_cache'))          # nothing cached
    with pytest.raises(ValueError) as e:
        backbones.load_backbone('gpt2-large')
    message = str(e.value)
    assert "backbone 'gpt2-large' is a known hub backbone" in message and 'could not be fetched' in message
    assert 'HF_HUB_OFFLINE' in message and '--backbone /path/to/folder' in message
    assert 'unknown backbone' not in message and 'not one of' not in message


def test_an_unknown_backbone_is_still_called_unknown(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ValueError, match="unknown backbone 'no-such-model'"):
        backbones.load_backbone('no-such-model')


@pytest.mark.parametrize('path', ['pretrained/sst2_minilm_routing_head', './my_run/model', '../elsewhere/model',
                                  'pretrained/sst5_minilm_routing_head.safetensors'])
def test_a_path_that_is_not_there_is_no_such_folder_relative_to_the_current_one(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                               # outside the repository root
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    for load in (checkpoints.from_pretrained, models.RoutingHead.from_pretrained, read_config):
        with pytest.raises(UsageError) as e:
            load(path)
        message = str(e.value)
        assert message.startswith(('no such folder: ', 'no such file: ')), message
        assert os.path.abspath(path) in message and f'relative to the current folder {tmp_path}' in message


def test_an_existing_parent_folder_makes_a_path_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'runs').mkdir()
    with pytest.raises(UsageError, match='no such folder: .*runs.*model'):
        checkpoints.from_pretrained('runs/model')
    assert not looks_local('someone/some-model')                       # a hub id stays a hub id


def test_heinsen2019_without_network_names_all_missing_files_and_says_download(tmp_path):
    dest = tmp_path / 'heinsen2019'
    unreachable = (tmp_path / 'no_such_mirror').as_uri() + '/'
    with pytest.raises(UsageError) as e:
        data.fetch_heinsen2019_weights(str(dest), base_url=unreachable)
    message = str(e.value)
    assert all(name in message for name in data.HEINSEN2019_WEIGHTS), message
    assert 'Download the missing files' in message and 'unpack it' not in message
    with pytest.raises(UsageError) as e:
        data.fetch_heinsen2019_weights(str(dest), download=False)
    assert all(name in str(e.value) for name in data.HEINSEN2019_WEIGHTS) and 'Download' in str(e.value)


def test_sst_download_failure_names_both_data_root_and_DATA_ROOT(tmp_path, monkeypatch):
    monkeypatch.setattr(data.downloads, 'SST_URL', (tmp_path / 'no_such_mirror' / 'sst.zip').as_uri())
    with pytest.raises(UsageError) as e:
        data.get_dataset_splits('sst5', data_root=str(tmp_path), download=True)
    message = str(e.value)
    assert '--data_root' in message and 'DATA_ROOT=' in message and 'train_all_heads.sh' in message


# -------------------------------------------------------------------------------------------------
# One line for each case that was a traceback, a raw OS error or a multi-line message
# -------------------------------------------------------------------------------------------------

def sst_zip(path, members, compress=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, 'w', compression=compress) as z:
        for name, content in members.items():
            z.writestr(name, content)
    return path


def fetch_sst(tmp_path, monkeypatch, archive):
    monkeypatch.setattr(data.downloads, 'SST_URL', archive.as_uri())
    return data.get_dataset_splits('sst5', data_root=str(tmp_path / 'root'), download=True)


SST_MEMBERS = {f'trees/{n}.txt': '(3 (2 a) (3 good))\n' * 200 for n in ('train', 'dev', 'test')}


def test_a_corrupt_sst_zip_is_one_line_naming_the_member(tmp_path, monkeypatch):
    archive = sst_zip(tmp_path / 'sst.zip', SST_MEMBERS)
    content = bytearray(archive.read_bytes())
    at = content.find(b'PK\x03\x04', 10) - 40                            # inside the first member's compressed data
    content[at:at + 8] = b'\xff' * 8
    archive.write_bytes(bytes(content))
    with pytest.raises(UsageError, match=r"archive .*sst.zip is damaged: its member 'trees/train.txt' cannot be read "
                                         r"\(.*\); nothing of it was unpacked"):
        fetch_sst(tmp_path, monkeypatch, archive)
    assert not list((tmp_path / 'root').rglob('*.txt'))


def test_an_sst_zip_without_its_members_is_refused_before_anything_is_unpacked(tmp_path, monkeypatch):
    archive = sst_zip(tmp_path / 'sst.zip', {'trees/train.txt': 'x', 'big.bin': b'\0' * (1 << 20)})
    monkeypatch.setattr(data.downloads.tempfile, 'mkdtemp', lambda **k: pytest.fail('unpacking began'))
    with pytest.raises(UsageError, match=r"sst.zip does not hold trees/dev.txt, trees/test.txt: not the expected "
                                           r"archive; nothing of it was unpacked"):
        fetch_sst(tmp_path, monkeypatch, archive)


def test_only_the_expected_members_of_the_sst_zip_are_unpacked(tmp_path, monkeypatch):
    archive = sst_zip(tmp_path / 'sst.zip', {**SST_MEMBERS, 'big.bin': b'\0' * (1 << 20)})
    opened, real_open = [], zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, 'open', lambda self, ref, *a, **k: opened.append(
        getattr(ref, 'filename', ref)) or real_open(self, ref, *a, **k))
    with pytest.raises(UsageError, match='does not have its pinned sha256'):    # not the official trees
        fetch_sst(tmp_path, monkeypatch, archive)
    assert sorted(opened) == sorted(SST_MEMBERS)


def test_disk_full_while_unpacking_names_the_member_and_the_archive(tmp_path, monkeypatch):
    archive = sst_zip(tmp_path / 'sst.zip', SST_MEMBERS)

    real_copy = data.downloads.shutil.copyfileobj

    def full_while_unpacking(src, dst, length=0):
        if isinstance(src, zipfile.ZipExtFile):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_copy(src, dst, length)

    monkeypatch.setattr(data.downloads.shutil, 'copyfileobj', full_while_unpacking)
    with pytest.raises(UsageError) as e:
        fetch_sst(tmp_path, monkeypatch, archive)
    assert "could not unpack 'trees/train.txt' of" in str(e.value) and 'No space left' in str(e.value) \
        and 'sst.zip' in str(e.value) and 'Free some space' in str(e.value)


@pytest.mark.parametrize('part, value, said', [
    ('history', 'epoch 1', "its 'history' is str, not a list"),
    ('history', [{'epoch': '1'}], "its 'history' holds other things than epoch records"),
    ('scheduler', [], "its 'scheduler' is list, not a dict"),
    ('scheduler', {'total_steps': '4'}, 'its scheduler records no int total_steps'),
    ('metadata', 'sst5', "its 'metadata' is str, not a dict"),
])
def test_a_crafted_checkpoint_of_the_wrong_types_is_one_line(tiny_sst, tiny_bert, tmp_path, part, value, said):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    checkpoint = runs.load_checkpoint(str(out / 'checkpoint.pt'))
    checkpoint[part] = value
    torch.save(checkpoint, out / 'checkpoint.pt')
    with pytest.raises(UsageError, match=rf"--resume: .*checkpoint.pt is not a checkpoint written by train.py "
                                         rf"\({re.escape(said)}"):
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))


def test_an_output_dir_whose_lock_is_a_folder_is_one_line(tiny_sst, tiny_bert, tmp_path):
    (tmp_path / 'run' / '.lock').mkdir(parents=True)
    with pytest.raises(UsageError, match=r"its lock file .*\.lock is not a file .* remove it"):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'run'))


def test_an_output_dir_that_is_a_dangling_link_is_one_line(tiny_sst, tiny_bert, tmp_path):
    os.symlink(tmp_path / 'gone', tmp_path / 'run')
    with pytest.raises(UsageError, match=r"--output_dir .*run' is a link to .*gone, which does not exist"):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'run'))


@pytest.mark.parametrize('where', ['under a file', 'its lock a folder'])
def test_a_feature_cache_that_cannot_be_made_names_the_cache(tiny_sst, tiny_bert, tmp_path, where):
    cache = tmp_path / 'cache'
    if where == 'under a file':
        cache.write_text('x')
    else:
        store = data.FeatureStore(str(cache), backbones.load_backbone(tiny_bert))
        os.remove(os.path.join(store.folder, '.lock'))
        os.mkdir(os.path.join(store.folder, '.lock'))
    with pytest.raises(UsageError, match=r"feature cache .*: cannot write it \(a (file|folder) stands where a "
                                      r"(folder|file) is needed.*pass another --feature_cache"):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'run', '--n_epochs', 1, '--feature_cache', cache))


def test_a_name_too_long_names_the_file_not_a_temporary_one(tmp_path):
    path = tmp_path / ('x' * 300)
    with pytest.raises(UsageError, match=rf"cannot write {tmp_path}/x+: its name is 300 bytes long") as e:
        data.write_atomic(str(path), b'1')
    assert '.tmp-' not in str(e.value)
    data.write_atomic(str(tmp_path / ('y' * 250)), b'1')                 # long, allowed: its temporary name is short


@pytest.mark.parametrize('seed', [-1, 2 ** 32])
def test_a_seed_out_of_range_names_the_option(seed, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset_name', 'sst5', '--rng_seed', str(seed)])
    assert f'--rng_seed must be an integer in 0..2**32 - 1, got {seed}' in capsys.readouterr().err


def test_a_head_that_does_not_fit_is_one_line(tiny_sst, tiny_bert, tmp_path):
    path = tmp_path / 'head.safetensors'                                           # a head without its B
    save_file({k: v for k, v in models.RoutingHead(3, 32, 5, n_hid=4).state_dict().items() if k != 'B'}, path)
    with pytest.raises(UsageError) as e:
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'eval', '--pretrained_path', path, '--eval_only'))
    assert "does not hold the RoutingHead its tensors' shapes describe: missing B" in str(e.value)
    assert '\n' not in str(e.value)
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    checkpoint = runs.load_checkpoint(str(out / 'checkpoint.pt'))
    checkpoint['head'] = {k: v[..., :1] if v.dim() else v for k, v in checkpoint['head'].items()}
    torch.save(checkpoint, out / 'checkpoint.pt')
    with pytest.raises(UsageError) as e:
        run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--resume'))
    assert 'does not fit this run' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('args, said', [((7, 384.0, 5), 'd_emb must be a positive int, got 384.0'),
                                        ((0, 384, 5), 'd_depth must be a positive int, got 0'),
                                        ((7, 384, 5, -2), 'n_hid must be a positive int, got -2')])
def test_routing_head_refuses_sizes_that_are_not_positive_ints(args, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        models.RoutingHead(*args)


def test_a_mask_that_is_not_a_tensor_is_one_line():
    head = models.RoutingHead(3, 8, 2, n_hid=4)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[\.\.\., n_pos\] = \[2, 5\] \(True = padding\), "
                                         r"got list"):
        head(torch.randn(2, 5, 3, 8), mask=[[False] * 5] * 2)


@pytest.mark.parametrize('load', [checkpoints.from_pretrained, models.RoutingHead.from_pretrained,
                                  MultiModalClassifier.from_pretrained, read_config])
def test_from_pretrained_of_none_is_refused_at_once(load):
    with pytest.raises(UsageError, match=r"from_pretrained needs a model folder, a head file or a hub id .* got None"):
        load(None)


def test_from_pretrained_of_a_folders_config_json_says_pass_the_folder(tmp_path):
    models.RoutingHead(3, 8, 2, n_hid=4).save_pretrained(str(tmp_path / 'head'))
    for load in (checkpoints.from_pretrained, models.RoutingHead.from_pretrained):
        with pytest.raises(UsageError, match=rf"is a model folder's config.json: pass the folder, '{tmp_path}/head'"):
            load(str(tmp_path / 'head' / 'config.json'))


def test_a_missing_authors_file_is_no_such_file_not_corrupt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"no such file: .*pretrained_sst5_head_for_roberta-large.state_dict"):
        checkpoints.from_pretrained('pretrained_sst5_head_for_roberta-large.state_dict')


def test_overwrite_keeps_a_users_folder_named_like_epoch007(tiny_sst, tiny_bert, tmp_path):
    out = tmp_path / 'run'
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1))
    (out / 'epoch007').mkdir()
    (out / 'epoch007' / 'notes.txt').write_text('mine')
    run(sst_args(tiny_sst, tiny_bert, out, '--n_epochs', 1, '--overwrite'))
    assert (out / 'epoch007' / 'notes.txt').read_text() == 'mine'


def test_a_revision_for_a_local_backbone_is_refused(tiny_sst, tiny_bert, tmp_path):
    with pytest.raises(UsageError, match=r"--revision v1 pins a hub revision, but --backbone .* is a local folder, "
                                         r"which has none: leave --revision out"):
        run(sst_args(tiny_sst, tiny_bert, tmp_path / 'run', '--revision', 'v1'))
