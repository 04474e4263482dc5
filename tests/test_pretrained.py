"""The committed pretrained heads: their layout, and (when the real SST is present) that
`train.py --eval_only` reproduces the test accuracy stated in their metadata within 0.3 points."""
import os

import pytest
import torch

import models
import train
from tests.conftest import SST_DIR

# file -> (--model, dataset, n_classes): the 2022 routing heads and the 2019 SSTClassifiers on minilm
HEADS = {'pretrained/sst5_minilm_routing_head.safetensors': ('routing_head', 'sst5', 5),
         'pretrained/sst2_minilm_routing_head.safetensors': ('routing_head', 'sst2', 2),
         'pretrained/sst5_minilm_capsules2019.safetensors': ('capsules2019', 'sst5', 5),
         'pretrained/sst2_minilm_capsules2019.safetensors': ('capsules2019', 'sst2', 2)}
ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.mark.parametrize('path', HEADS)
def test_pretrained_head_loads_in_two_lines(path):
    model, dataset, n_classes = HEADS[path]
    state, metadata = train.load_head_state(os.path.join(ROOT, path))
    head = models.RoutingHead(7, 384, n_classes) if model == 'routing_head' else models.SSTClassifier(7, 384, n_classes=n_classes)
    head.load_state_dict(state, strict=True)
    assert metadata['backbone'] == 'minilm' and metadata['dataset_name'] == dataset
    assert metadata.get('model', 'routing_head') == model and 0 < float(metadata['test_accuracy']) < 1


@pytest.mark.skipif(not os.path.isdir(SST_DIR), reason='the real SST is not present')
@pytest.mark.parametrize('path', HEADS)
def test_eval_only_reproduces_stated_accuracy(path, tmp_path, capsys):
    model, dataset, _ = HEADS[path]
    path = os.path.join(ROOT, path)
    stated = float(train.load_head_state(path)[1]['test_accuracy'])
    torch.set_num_threads(os.cpu_count())
    try:
        acc = train.main(['--model', model, '--dataset_name', dataset, '--backbone', 'minilm', '--eval_only', '--pretrained_path', path,
                          '--data_root', os.path.dirname(os.path.abspath(SST_DIR)), '--output_dir', str(tmp_path)])
    finally:
        torch.set_num_threads(1)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'test accuracy: {acc:.4f}'
    assert abs(acc - stated) <= 0.003
