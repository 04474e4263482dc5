"""Fidelity to the authors' 2022 files: their head state dicts (`.state_dict`) and training checkpoints
(`<dataset>_head_for_<backbone>_epoch<k>.checkpoint`) load by their names, with weights_only=True, and score as the
authors' head (their forward written here from the equations); train.py fine-tunes SST-2 from their SST-5 checkpoint
as they did; the credit notebook takes their head by name."""

import pytest
import torch

from heinsen_replication import checkpoints, models
from heinsen_replication.classifier import MultiModalClassifier
from heinsen_replication.errors import UsageError
from tests.helpers.training import one_epoch_args as _sst, run as _run


def _authors_head_state(d_depth, d_emb, n_classes, n_hid=64, seed=0):
    """A state dict with the published head's keys and shapes (the spec's table), random values."""
    from benchmarks.reference import spec_state_shapes
    g = torch.Generator().manual_seed(seed)
    shapes = {'W': (d_depth, d_emb), 'B': (d_depth, d_emb)}
    for k, (n_inp, n_out, d_out) in enumerate([(-1, n_hid, d_emb), (n_hid, n_hid, d_emb), (n_hid, n_classes, 1)]):
        shapes.update({f'route.{k}.{name}': s for name, s in spec_state_shapes(n_inp, n_out, d_emb, d_out).items()})
    state = {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}
    for k in state:
        if k.endswith('CONST_ones_over_n_out'):
            state[k] = torch.ones_like(state[k]) / len(state[k])
        if k in ('W',):
            state[k] = 1 + state[k] * 0.1
    return state


def _authors_scores(state, hidden):
    """The authors' head on unpadded hidden [batch, n_pos, d_depth, d_emb], composed from the spec with the
    independent reference routing (tests.reference), reading the parameters from `state`."""
    from benchmarks.reference import straightforward_routing
    from heinsen_routing import EfficientVectorRouting
    d_emb = hidden.shape[-1]
    x = torch.nn.functional.layer_norm(hidden, (d_emb,)) * state['W'] + state['B']
    x = x.flatten(-3, -2)                                                    # [batch, n_pos * d_depth, d_emb]
    n_hid, n_classes = state['route.0.W_F1'].shape[0], state['route.2.W_F1'].shape[0]
    for k, (n_inp, n_out, d_out) in enumerate([(-1, n_hid, d_emb), (n_hid, n_hid, d_emb), (n_hid, n_classes, 1)]):
        route = EfficientVectorRouting(n_inp=n_inp, n_out=n_out, d_inp=d_emb, d_out=d_out).double()
        route.load_state_dict({n[len(f'route.{k}.'):]: v for n, v in state.items() if n.startswith(f'route.{k}.')})
        x = straightforward_routing(route, x)
    return x.squeeze(-1)


@pytest.mark.parametrize('name, backbone', [
    ('pretrained_sst5_head_for_roberta-large.state_dict', 'roberta-large'),
    ('sst5_head_for_roberta-large_epoch10.checkpoint', 'roberta-large'),
    ('pretrained_cifar100_head_for_beit-large-patch16-224.state_dict', 'microsoft/beit-large-patch16-224'),
    ('cifar10_head_for_beit-large-patch16-224_epoch9.checkpoint', 'microsoft/beit-large-patch16-224'),
])
def test_authors_2022_files_load_by_name_and_score_as_their_head(name, backbone, tmp_path):
    torch.manual_seed(0)
    state = _authors_head_state(d_depth=4, d_emb=12, n_classes=5, n_hid=6)
    path = tmp_path / name
    if name.endswith('.checkpoint'):                                         # a training checkpoint: 'weights'
        opt = torch.optim.RAdam([torch.nn.Parameter(torch.zeros(2))])
        torch.save({'weights': state, 'optimizer': opt.state_dict(), 'epoch': 10}, path)
    else:
        torch.save(state, path)
    head, config = checkpoints.from_pretrained(path)
    assert isinstance(head, models.RoutingHead) and (head.d_depth, head.d_emb, head.n_hid, head.n_classes) == (4, 12, 6, 5)
    assert config['backbone'] == backbone and config['training']['source'] == 'authors_2022'
    assert config['training']['dataset_name'] == name.split('_head_for_')[0].replace('pretrained_', '')
    hidden = torch.randn(3, 7, 4, 12, dtype=torch.double)                   # unpadded: no mask
    torch.testing.assert_close(head.double()(hidden), _authors_scores({k: v.double() for k, v in state.items()}, hidden))
    assert checkpoints.from_pretrained(path, backbone='minilm')[1]['backbone'] == 'minilm'   # given: a local copy


def test_authors_files_load_with_a_backbone_into_a_classifier_and_refuse_code(tmp_path, tiny_beit):
    state = _authors_head_state(d_depth=3, d_emb=32, n_classes=4, n_hid=6)
    path = tmp_path / 'cifar10_head_for_some-model_epoch2.checkpoint'
    torch.save({'weights': state}, path)
    with pytest.raises(ValueError, match="names no backbone: pass backbone="):
        MultiModalClassifier.from_pretrained(path)
    clf = MultiModalClassifier.from_pretrained(path, backbone=tiny_beit)
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    torch.save({'optimizer': {}}, path)
    with pytest.raises(UsageError, match="holds no 'weights'"):
        checkpoints.from_pretrained(path)
    torch.save({'weights': state, 'scheduler': {'anneal_func': _authors_head_state}}, path)   # a pickled function
    with pytest.raises(UsageError, match=r"(?s)refusing to load .*extract its head once"):
        checkpoints.from_pretrained(path)


def test_sst2_finetunes_from_the_authors_sst5_checkpoint(tiny_sst, tiny_roberta, tmp_path, capsys):
    from safetensors.torch import load_file
    state = _authors_head_state(d_depth=3, d_emb=32, n_classes=5, n_hid=64)   # tiny_roberta: 3 depths x 32
    path = tmp_path / 'sst5_head_for_roberta-large_epoch10.checkpoint'
    torch.save({'weights': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 10}, path)
    out = tmp_path / 'sst2'
    _run(_sst(tiny_sst, tiny_roberta, out, '--pretrained_path', path, '--n_iters_per_train_epoch', 3,
              dataset='sst2'))
    log = capsys.readouterr().out
    assert "is named for backbone 'roberta-large'" in log and 'training only the last routing (route.2)' in log
    after = load_file(out / 'model' / 'model.safetensors')
    for k, v in state.items():                                               # all but the last routing: loaded, frozen
        if not k.startswith('route.2.'):
            torch.testing.assert_close(after[k], v, msg=k)
    assert after['route.2.W_S'].shape == (64, 2) and after['route.2.W_F2'].shape == state['route.2.W_F2'].shape
    assert not torch.equal(after['route.2.W_F2'], state['route.2.W_F2'])  # the last routing trained
    with pytest.raises(ValueError, match="backbone 'roberta-large' is a known hub backbone"):   # no --backbone: the file's
        _run(['--dataset_name', 'sst2', '--data_root', tiny_sst, '--output_dir', tmp_path / 'o', '--device', 'cpu',
              '--pretrained_path', path])


@pytest.mark.slow
def test_credit_notebook_takes_an_authors_state_dict_by_name(tmp_path, monkeypatch):
    """credit_language.ipynb with HEAD_PATH = a head saved in the authors' .state_dict format and naming: the
    committed minilm SST-2 head as pretrained_sst2_head_for_minilm.state_dict (its backbone inferred from the name)."""
    import pathlib
    import nbclient
    import nbformat
    root = pathlib.Path(__file__).resolve().parent.parent
    head, _ = checkpoints.from_pretrained(root / 'pretrained' / 'sst2_minilm_routing_head')
    path = tmp_path / 'pretrained_sst2_head_for_minilm.state_dict'
    torch.save(head.state_dict(), path)
    monkeypatch.setenv('HEAD_PATH', str(path))
    monkeypatch.setenv('CREDIT_FIGURES_DIR', str(tmp_path))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    nb = nbformat.read(str(root / 'notebooks' / 'credit_language.ipynb'), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                                     resources={'metadata': {'path': str(root / 'notebooks')}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"a cell failed:\n{e}", pytrace=False)
    text = '\n'.join(str(o.get('data', {}).get('text/markdown', '')) for c in nb.cells if c.cell_type == 'code'
                     for o in c.get('outputs', []))
    assert 'pretrained_sst2_head_for_minilm.state_dict' in text and 'authors_2022' in text
