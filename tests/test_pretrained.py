"""The committed pretrained models (pretrained/<name>/: config.json + model.safetensors): each loads with one call,
and (when the real SST is present) `train.py --eval_only` reproduces the test accuracy its config states within
0.3 points."""
import os

import pytest
import torch

import train
from heinsen_replication import checkpoints, models
from tests.helpers.files import SST_DIR

ROOT = os.path.join(os.path.dirname(__file__), '..')
# folder -> (class, --model it was trained as, dataset): the 2022 routing heads (the paper's and the light
# configuration, docs/choosing_a_head.md) and the 2019 SSTClassifiers on minilm
PRETRAINED = {'pretrained/sst5_minilm_routing_head': (models.RoutingHead, 'routing_head', 'sst5'),
              'pretrained/sst2_minilm_routing_head': (models.RoutingHead, 'routing_head', 'sst2'),
              'pretrained/sst5_minilm_routing_head_light': (models.RoutingHead, 'routing_head', 'sst5'),
              'pretrained/sst2_minilm_routing_head_light': (models.RoutingHead, 'routing_head', 'sst2'),
              'pretrained/sst5_minilm_capsules2019': (models.SSTClassifier, 'capsules2019', 'sst5'),
              'pretrained/sst2_minilm_capsules2019': (models.SSTClassifier, 'capsules2019', 'sst2')}


# the small ViT trained on the digits with its routing head (backbone/, routing_head/): tests/test_vision_digits.py
OTHER_PRETRAINED = ('pretrained/digits_vit',)


def test_pretrained_holds_exactly_these_models():
    assert sorted(f'pretrained/{n}' for n in os.listdir(os.path.join(ROOT, 'pretrained'))) == \
        sorted([*PRETRAINED, *OTHER_PRETRAINED])


@pytest.mark.parametrize('path', PRETRAINED)
def test_pretrained_model_loads_with_one_call(path):
    cls, model, dataset = PRETRAINED[path]
    loaded, config = checkpoints.from_pretrained(os.path.join(ROOT, path))
    assert type(loaded) is cls and config['backbone'] == 'minilm' and (config['d_depth'], config['d_emb']) == (7, 384)
    assert config['training']['dataset_name'] == dataset and config['training']['model'] == model
    assert config['n_classes'] == (5 if dataset == 'sst5' else 2)
    if path.endswith('_light'):                         # RoutingHead.named('light'): the routing-head study's choice
        assert {k: config[k] for k in ('n_hid', 'n_routings', 'd_hid')} == models.RoutingHead.CONFIGURATIONS['light']
    same = cls.from_pretrained(os.path.join(ROOT, path))                        # the class's own loader, the same
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), loaded.state_dict().values()))


def test_loading_a_local_folder_prints_nothing(capfd):
    """huggingface_hub's mixin prints "Loading weights from local directory" on every local load; ours does not, so
    that the README's snippet prints only its own line (and nothing process-wide is changed to get there)."""
    import sys
    stdout = sys.stdout
    checkpoints.from_pretrained(os.path.join(ROOT, 'pretrained/sst2_minilm_routing_head'))
    models.RoutingHead.from_pretrained(os.path.join(ROOT, 'pretrained/sst5_minilm_routing_head'))
    assert capfd.readouterr() == ('', '') and sys.stdout is stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SST_DIR), reason='the real SST is not present')
@pytest.mark.parametrize('path', PRETRAINED)
def test_eval_only_reproduces_stated_accuracy(path, tmp_path, capsys):
    _, _, dataset = PRETRAINED[path]
    path = os.path.join(ROOT, path)
    stated = checkpoints.from_pretrained(path)[1]['training']['test_accuracy']
    torch.set_num_threads(os.cpu_count())
    try:
        acc = train.main(['--dataset_name', dataset, '--backbone', 'minilm', '--eval_only', '--pretrained_path', path,
                          '--data_root', os.path.dirname(os.path.abspath(SST_DIR)), '--output_dir', str(tmp_path)])
    finally:
        torch.set_num_threads(1)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'test accuracy: {acc:.4f}'
    assert abs(acc - stated) <= 0.003
