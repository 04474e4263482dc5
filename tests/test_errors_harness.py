"""What a new user sees first when something is missing: each message says what to do (issue 22's first-contact
list). Everything here runs offline."""
import os

import pytest

from heinsen_replication import backbones, checkpoints, data, models
from heinsen_replication.errors import UsageError
from heinsen_replication.pretrained import looks_local, read_config


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
