"""The trained vision model offline (studies/digits_vit.py, pretrained/digits_vit/): the digits split it is trained
and tested on, the committed ViT as a frozen backbone of all depths, the committed routing head's test accuracy
reproduced, patch deletion, and the build + report commands end to end (quick)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from heinsen_replication import backbones, data, vision_digits
from heinsen_replication.pretrained import read_config

pytest.importorskip('sklearn')
from studies import digits_vit  # noqa: E402  (needs scikit-learn)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / 'pretrained' / 'digits_vit'


def test_digits_split_is_a_fixed_partition_of_the_digits():
    """train and test together are exactly scikit-learn's 1797 digits, each used once (disjoint), and the split is
    the same on every call."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    every = np.concatenate([digits.images.reshape(len(digits.images), -1), digits.target[:, None]], 1)   # [1797, 65]
    s = data.get_dataset_splits('digits')
    parts = [np.concatenate([s[k].images.reshape(len(s[k]), -1).numpy(), np.array(s[k].labels)[:, None]], 1)
             for k in ('train', 'test')]
    both = np.concatenate(parts)
    assert len(both) == len(every) == 1797
    key = lambda rows: rows[np.lexsort(rows.T[::-1])]
    assert np.array_equal(key(both), key(every.astype(both.dtype)))           # a partition: no image in both splits
    again = data.get_dataset_splits('digits')
    for k in ('train', 'test'):
        assert torch.equal(again[k].images, s[k].images) and again[k].labels == s[k].labels


def test_digits_tensors_are_the_split_scaled_to_unit_range():
    x, y = vision_digits.digits_tensors('test')
    s = data.get_dataset_splits('digits')['test']
    assert x.shape == (450, 1, 8, 8) and x.dtype == torch.float32 and y.tolist() == s.labels
    assert torch.equal(x[3], s[3][0]) and x.min() == 0 and x.max() == 1


def test_committed_vit_loads_as_a_frozen_image_backbone_of_all_depths():
    backbone = backbones.load_backbone(str(MODEL / 'backbone'))
    config = backbone.model.config
    assert isinstance(backbone, backbones.ImageBackbone) and backbone.modality == 'image'
    assert (backbone.d_depth, backbone.d_emb) == (config.num_hidden_layers + 1, config.hidden_size) == (5, 64)
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.train().training
    x, _ = vision_digits.digits_tensors('test')
    hidden, mask = backbone.encode(x[:3])
    assert hidden.shape == (3, 1 + 16, 5, 64) and mask is None                  # class token + 4 x 4 patches, 5 depths
    direct = backbone.model(pixel_values=x[:3], output_hidden_states=True).hidden_states
    assert all(torch.equal(hidden[:, :, d], direct[d]) for d in range(5))


def test_committed_head_reproduces_its_recorded_test_accuracy():
    """The routing head's accuracy on the digits test split, measured now, is the one train.py recorded when it
    trained it; and the ViT's own classifier reproduces the accuracy recorded beside it."""
    backbone, head = vision_digits.load_model(str(MODEL))
    config = read_config(MODEL / 'routing_head')
    assert config['backbone'] == 'pretrained/digits_vit/backbone' and config['training']['dataset_name'] == 'digits'
    x, y = vision_digits.digits_tensors('test')
    n_correct = int((vision_digits.predict(backbone, head, x).argmax(-1) == y).sum())
    assert n_correct == round(config['training']['test_accuracy'] * len(y))
    assert n_correct / len(y) > 0.9
    from safetensors import safe_open
    with safe_open(str(MODEL / 'vit_classifier.safetensors'), 'pt') as f:
        recorded = float(f.metadata()['vit_test_accuracy'])
    vit, classifier = digits_vit.load_vit_classifier(str(MODEL))
    assert digits_vit.vit_accuracy(vit, classifier, x, y) == pytest.approx(recorded, abs=1e-6)


def test_delete_patches_sets_exactly_the_named_patches_to_background():
    images = torch.rand(2, 1, 8, 8) + 0.5                                      # no pixel is 0 yet
    out = vision_digits.delete_patches(images, torch.tensor([[0, 5], [15, 15]]), side=4, size=2)
    zero = out == 0
    assert zero[0, 0, 0:2, 0:2].all() and zero[0, 0, 2:4, 2:4].all() and int(zero[0].sum()) == 8
    assert zero[1, 0, 6:8, 6:8].all() and int(zero[1].sum()) == 4
    assert torch.equal(out[~zero], images[~zero])


def test_rank_patches_puts_the_patches_not_allowed_last():
    score = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    assert vision_digits.rank_patches(score, torch.ones(1, 4, dtype=torch.bool)).tolist() == [[1, 3, 0, 2]]
    allowed = torch.tensor([[True, False, True, True]])
    assert vision_digits.rank_patches(score, allowed)[0, :3].tolist() == [3, 0, 2]
    images = torch.zeros(1, 1, 8, 8)
    images[0, 0, 7, 0] = 0.5                                                   # ink in patch 12 only (row 3, col 0)
    assert vision_digits.patch_ink(images, 4, 2).nonzero().tolist() == [[0, 12]]


def test_deletion_test_on_the_committed_model():
    """Every ranking deletes what it says: deleting all 16 patches leaves the same blank image whatever the ranking,
    so every row's drop is the same; among='ink' never deletes a blank patch
    while an inked one is left, so an image with ink everywhere gives both settings the same credit row."""
    backbone, head = vision_digits.load_model(str(MODEL))
    x, _ = vision_digits.digits_tensors('test')
    x = x[:12]
    every = vision_digits.deletion_test(backbone, head, x, ks=(16,), n_random=2)
    drops = [row['drop'][0] for row in every['rows'].values()]
    assert set(every['rows']) == {'credit (sum over depths)', 'most ink (no model)', 'random',
                                  *(f'credit of depth {d} alone' for d in range(5))}
    assert max(drops) - min(drops) < 1e-6 and every['n_images'] == 12 and 0 < every['p_pred'] <= 1
    full = x.clamp(min=0.05)                                                    # ink in every patch
    all_, ink = (vision_digits.deletion_test(backbone, head, full, ks=(1, 3), n_random=1, among=among, per_depth=False)
                 for among in ('all', 'ink'))
    assert all_['rows']['credit (sum over depths)'] == ink['rows']['credit (sum over depths)']
    with pytest.raises(ValueError, match="among must be 'all' or 'ink'"):
        vision_digits.deletion_test(backbone, head, x, among='blank')


@pytest.mark.slow
def test_build_and_report_run_end_to_end_and_never_overwrite_a_model(tmp_path):
    """python -m studies.digits_vit build --quick, then report: the files, the docs page; a second build into the
    same folder is refused without --overwrite."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    run = lambda *argv: subprocess.run([sys.executable, '-m', 'studies.digits_vit', *argv], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=600)
    out = tmp_path / 'dv'
    done = run('build', '--out', str(out), '--quick')
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {'backbone', 'vit_classifier.safetensors', 'routing_head'}
    assert json.loads((out / 'routing_head' / 'config.json').read_text())['training']['n_epochs'] == 1
    weights = (out / 'routing_head' / 'model.safetensors').read_bytes()
    again = run('build', '--out', str(out), '--quick')
    assert again.returncode == 2 and 'already exist' in again.stderr and '--overwrite' in again.stderr
    assert (out / 'routing_head' / 'model.safetensors').read_bytes() == weights
    docs = tmp_path / 'docs' / 'vision_digits.md'
    done = run('report', '--out', str(out), '--docs', str(docs), '--max_deletion', '20', '--n_random', '2')
    assert done.returncode == 0, done.stderr[-2000:]
    text = docs.read_text()
    assert f'python -m studies.digits_vit report --out {out} --docs {docs} --max_deletion 20 --n_random 2' in text
    assert 'For each of the 20 test digits' in text and '2 draws per image' in text
    assert '| random |' in text and (docs.parent / 'vision_digits.png').stat().st_size > 10_000


@pytest.mark.slow
def test_vision_notebook_is_a_demo_only_without_the_digits_model(tmp_path, monkeypatch):
    """Without the trained digits model (here: $DIGITS_VIT_MODEL names a missing folder) and without the paper's
    head, the vision notebook falls back to the random BEiT and says DEMO ONLY; the digits cells are skipped."""
    nbclient, nbformat = pytest.importorskip('nbclient'), pytest.importorskip('nbformat')
    for key, value in (('DIGITS_VIT_MODEL', tmp_path / 'missing'), ('NOTEBOOK_FIGURES_DIR', tmp_path),
                       ('HF_HUB_OFFLINE', '1')):
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(str(ROOT / 'notebooks' / 'credit_vision.ipynb'), as_version=4)
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                            resources={'metadata': {'path': str(ROOT / 'notebooks')}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
    printed = ''.join(o.get('text', '') for o in outputs)
    shown = ''.join(o.get('data', {}).get('text/html', '') for o in outputs)
    assert 'DEMO ONLY' in printed and f"no trained digits model at {tmp_path / 'missing'}" in shown
    assert printed.count('skipped: the trained digits model is not in use') == 2
