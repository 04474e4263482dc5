"""Damaged model folders are refused with one clear error naming the file, before anything is allocated:
config.json that is not an object, sizes that are not integers or absurdly large, a model.safetensors that is
truncated or does not hold the model its config describes."""
import json
import os
import shutil
import time

import pytest
import torch

from heinsen_replication import checkpoints, models
from heinsen_replication.classifier import MultiModalClassifier
from heinsen_replication.pretrained import MAX_SIZE


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp('heads') / 'head'
    models.RoutingHead(3, 8, 2, n_hid=4).save_pretrained(str(folder), backbone='minilm')
    return folder


def damaged_copy(saved, tmp_path, config=None, truncate_to=None):
    folder = tmp_path / 'damaged'
    shutil.copytree(saved, folder)
    if config is not None:
        (folder / 'config.json').write_text(json.dumps(config))
    if truncate_to is not None:
        os.truncate(folder / 'model.safetensors', truncate_to)
    return str(folder)


LOADERS = [checkpoints.from_pretrained, models.RoutingHead.from_pretrained, MultiModalClassifier.from_pretrained]


@pytest.mark.parametrize('load', LOADERS, ids=['checkpoints.from_pretrained', 'RoutingHead', 'MultiModalClassifier'])
def test_config_that_is_a_list_is_refused(saved, tmp_path, load):
    folder = damaged_copy(saved, tmp_path, config=[3, 8, 2])
    with pytest.raises(ValueError, match=rf"'{folder}/config.json' holds a JSON list, not an object"):
        load(folder)


@pytest.mark.parametrize('name, value', [('d_emb', '8'), ('n_hid', 4.0), ('n_classes', True), ('d_depth', 0),
                                         ('n_classes', -2), ('d_emb', 10 ** 9), ('n_hid', None)])
def test_config_sizes_of_the_wrong_type_or_out_of_bounds_are_refused(saved, tmp_path, name, value):
    config = json.loads((saved / 'config.json').read_text())
    folder = damaged_copy(saved, tmp_path, config={**config, name: value})
    with pytest.raises(ValueError, match=rf"{folder}/config.json: {name} must be an integer in 1\.\.{MAX_SIZE}, "
                                         rf"got {value!r}"):
        checkpoints.from_pretrained(folder)


def test_large_config_sizes_allocate_nothing_before_the_weights_are_checked(saved, tmp_path):
    """Sizes within bounds whose model would need 2^60 parameters: refused at once (the model is built on the
    meta device and compared with the weights file's header), not by running out of memory."""
    config = json.loads((saved / 'config.json').read_text())
    folder = damaged_copy(saved, tmp_path, config={**config, 'd_emb': MAX_SIZE, 'n_hid': MAX_SIZE})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"'{folder}/model.safetensors' does not hold the RoutingHead that "
                                         rf"{folder}/config.json describes: "
                                         rf"shapes B \(3, 8\) \(expected \(3, 1048576\)\)"):
        checkpoints.from_pretrained(folder)
    assert time.perf_counter() - start < 10


def test_config_and_weights_that_disagree_are_refused(saved, tmp_path):
    config = json.loads((saved / 'config.json').read_text())
    folder = damaged_copy(saved, tmp_path, config={**config, 'n_hid': 5})
    with pytest.raises(ValueError, match=r"does not hold the RoutingHead .*route.0.B_F2 \(4, 8\) "
                                         r"\(expected \(5, 8\)\)"):
        checkpoints.from_pretrained(folder)


@pytest.mark.parametrize('cut', [5, 100, -10])
def test_truncated_weights_file_is_refused(saved, tmp_path, cut):
    size = os.path.getsize(saved / 'model.safetensors')
    folder = damaged_copy(saved, tmp_path, truncate_to=cut % size)
    for load in LOADERS:
        with pytest.raises(ValueError, match=rf"'{folder}/model.safetensors' is not a complete safetensors file "
                                             rf"\(.*\): the model folder is damaged"):
            load(folder)


def test_intact_folder_still_loads(saved):
    model, config = checkpoints.from_pretrained(str(saved))
    reference = models.RoutingHead.from_pretrained(str(saved))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
