"""The committed pretrained heads: their layout, and (when the real SST is present) that
`train.py --eval_only` reproduces the test accuracy stated in their metadata within 0.3 points."""
import os

import pytest
import torch

import models
import train
from tests.conftest import SST_DIR

HEADS = {'sst5': ('pretrained/sst5_minilm_routing_head.safetensors', 5),
         'sst2': ('pretrained/sst2_minilm_routing_head.safetensors', 2)}
ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.mark.parametrize('dataset', HEADS)
def test_pretrained_head_loads_in_two_lines(dataset):
    path, n_classes = HEADS[dataset]
    state, metadata = train.load_head_state(os.path.join(ROOT, path))
    head = models.RoutingHead(7, 384, n_classes)
    head.load_state_dict(state, strict=True)
    assert metadata['backbone'] == 'minilm' and metadata['dataset_name'] == dataset
    assert 0 < float(metadata['test_accuracy']) < 1


@pytest.mark.skipif(not os.path.isdir(SST_DIR), reason='the real SST is not present')
@pytest.mark.parametrize('dataset', HEADS)
def test_eval_only_reproduces_stated_accuracy(dataset, tmp_path, capsys):
    path = os.path.join(ROOT, HEADS[dataset][0])
    stated = float(train.load_head_state(path)[1]['test_accuracy'])
    torch.set_num_threads(os.cpu_count())
    try:
        acc = train.main(['--dataset_name', dataset, '--backbone', 'minilm', '--eval_only', '--pretrained_path', path,
                          '--data_root', os.path.dirname(os.path.abspath(SST_DIR)), '--output_dir', str(tmp_path)])
    finally:
        torch.set_num_threads(1)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'test accuracy: {acc:.4f}'
    assert abs(acc - stated) <= 0.003
