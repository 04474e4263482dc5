"""
Tests for studies/glom.py (GLOM and the two comparison models) and studies/glom_digits.py: shapes,
errors, gradients (every parameter; the first steps of GLOM through the residual path), a short
training on a learnable synthetic task, matched parameter counts, and the comparison script end to
end on a tiny budget (digits, and MNIST from IDX files written here). The IDX reader itself is
tested in tests/test_data.py.
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heinsen_replication import data
from studies.glom import CNNDigitClassifier, GLOM, GLOMConfig, RoutingDigitClassifier, neighbour_similarity, neighbours

REPO_ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # tiny tensors: more threads only add overhead on a shared CPU


def small_glom(**kwargs):
    return GLOM(GLOMConfig(**{'n_steps': 3, 'd_hidden': 8, **kwargs}))


def scores_of(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


# -------------------------------------------------------------------------------------------------
# shapes and errors
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('hw', [(8, 8), (11, 5), (28, 28)])
def test_glom_shapes(hw):
    torch.manual_seed(0)
    model = small_glom()
    scores, state = model(torch.rand(2, 1, *hw))
    assert scores.shape == (2, 10)
    assert state.shape == (2, 4, 10, *hw)                     # [B, L, D, H, W]
    # the top level votes: the scores are its mean over locations
    torch.testing.assert_close(scores, state[:, -1].mean(dim=(-2, -1)))
    scores, state, states = model(torch.rand(3, 1, *hw), return_states=True)
    assert len(states) == 3 and states[0].shape == (3, 3, 10, *hw)
    assert torch.isfinite(state).all()


def test_glom_other_sizes_of_the_column():
    torch.manual_seed(0)
    for n_levels in (2, 3, 5):
        cfg = GLOMConfig(n_levels=n_levels, d=4, n_classes=4, n_steps=2, d_hidden=8)
        scores, state = GLOM(cfg)(torch.rand(2, 1, 6, 7))
        assert scores.shape == (2, 4) and state.shape == (2, n_levels, 4, 6, 7)


@pytest.mark.parametrize('model_cls', [RoutingDigitClassifier, CNNDigitClassifier])
@pytest.mark.parametrize('hw', [(8, 8), (28, 28), (5, 9)])
def test_comparison_models_shapes(model_cls, hw):
    assert model_cls(n_classes=7)(torch.rand(3, 1, *hw)).shape == (3, 7)


@pytest.mark.parametrize('model', [small_glom(), RoutingDigitClassifier(), CNNDigitClassifier()],
                         ids=['glom', 'routing', 'cnn'])
@pytest.mark.parametrize('bad', [torch.rand(8, 8), torch.rand(2, 8, 8), torch.rand(2, 3, 8, 8),
                                 torch.rand(2, 1, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long),
                                 torch.rand(0, 1, 8, 8), np.zeros((2, 1, 8, 8), np.float32)])
def test_bad_images_raise_value_error(model, bad):
    with pytest.raises(ValueError, match=r"images must .*\[B, 1, H, W\]"):
        model(bad)


def test_bad_config_raises_value_error():
    for kwargs in ({'d': 16}, {'n_levels': 1}, {'n_steps': 0}, {'loss': 'hinge'}, {'noise': -1.0}):
        with pytest.raises(ValueError, match='GLOMConfig'):
            GLOMConfig(**kwargs)


def test_neighbours_and_neighbour_similarity():
    x = torch.randn(3, 4, 5, 7)
    windows, valid = neighbours(x)
    torch.testing.assert_close(windows, F.unfold(x, 3, padding=1).view(3, 4, 9, 5, 7))
    assert valid.shape == (1, 1, 9, 5, 7) and valid[0, 0, 4].all() and valid.sum() == 5 * 7 * 9 - 2 * (5 + 7) * 3 + 4
    # the same vector everywhere: every location agrees with all its neighbours
    same = torch.randn(2, 3, 6, 1, 1).expand(2, 3, 6, 5, 7)
    torch.testing.assert_close(neighbour_similarity(same), torch.ones(2, 3, 5, 7))
    # a checkerboard of v and -v: every location disagrees with its 4 side neighbours and agrees
    # with its diagonal ones
    v = torch.randn(6)
    signs = (-1.0) ** (torch.arange(4)[:, None] + torch.arange(4)[None, :])             # [4, 4]
    board = (v[:, None, None] * signs)[None, None]                                       # [1, 1, 6, 4, 4]
    sim = neighbour_similarity(board)[0, 0]
    assert sim[1, 1].item() == pytest.approx(0.0, abs=1e-5)                              # 4 sides, 4 diagonals
    assert sim[0, 0].item() == pytest.approx(-1 / 3, abs=1e-5)                           # 2 sides, 1 diagonal


# -------------------------------------------------------------------------------------------------
# gradients
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('make', [lambda: small_glom(), lambda: small_glom(loss='mse'),
                                  lambda: RoutingDigitClassifier(), lambda: CNNDigitClassifier()],
                         ids=['glom', 'glom-mse', 'routing', 'cnn'])
def test_every_parameter_gets_a_gradient(make):
    torch.manual_seed(0)
    model = make().train()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    scores = scores_of(model, x)
    loss = model.loss(scores, y) if hasattr(model, 'loss') else F.cross_entropy(scores, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_gradients_reach_the_first_steps_through_the_residual_path():
    torch.manual_seed(0)
    n_steps = 24
    model = small_glom(n_steps=n_steps).eval()
    scores, state, states = model(torch.rand(4, 1, 8, 8), return_states=True)
    for s in states:
        s.retain_grad()
    F.cross_entropy(scores, torch.tensor([0, 1, 2, 3])).backward()
    norms = torch.stack([s.grad.norm() for s in states])                                  # [n_steps]
    assert (norms > 0).all()
    # the identity path carries the last step's gradient back undiminished (no exponential decay)
    assert norms[0] > 0.3 * norms[-1], norms


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------

def synthetic_task(n, generator):
    """4 classes: a bright 3x3 blob in one of the 4 quadrants of a noisy 8x8 image; label = quadrant."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = 0.2 * torch.rand(n, 1, 8, 8, generator=generator)
    offsets = torch.randint(0, 2, (n, 2), generator=generator)
    for i in range(n):
        r = 4 * (labels[i] // 2) + offsets[i, 0]
        c = 4 * (labels[i] % 2) + offsets[i, 1]
        images[i, 0, r:r + 3, c:c + 3] += 0.8
    return images, labels


def test_short_training_on_a_synthetic_task_lowers_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = synthetic_task(256, g)
    x_eval, y_eval = synthetic_task(128, g)
    model = GLOM(GLOMConfig(n_levels=3, d=4, n_classes=4, n_steps=4, d_hidden=16))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            scores, _ = model(x_eval)
        return model.loss(scores, y_eval).item(), (scores.argmax(-1) == y_eval).float().mean().item()

    loss_before, _ = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = model.loss(model(x[idx])[0], y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_after, accuracy_after = eval_loss()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert accuracy_after > 0.6, accuracy_after                                         # chance: 0.25


# -------------------------------------------------------------------------------------------------
# the comparison
# -------------------------------------------------------------------------------------------------

def run_comparison(*argv):
    """python -m studies.glom_digits (the comparison script, as users run it) -> {model name: parameters}."""
    done = subprocess.run([sys.executable, '-m', 'studies.glom_digits', '--quick', '--threads', '1', *map(str, argv)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def parameters_in(doc):
    return {name: int(count.replace(',', '')) for name, count in re.findall(r'^\| ([^|]+?) \| ([\d,]+) \|', doc, re.M)}


@pytest.mark.slow
def test_comparison_script_runs_end_to_end_on_digits_with_matched_parameter_counts(tmp_path):
    run_comparison('--seeds', 0, 1, '--out_dir', tmp_path)
    doc = (tmp_path / 'glom_digits.md').read_text()
    assert '| model | parameters | test accuracy (mean ± std) |' in doc
    rows = re.findall(r'^\| ([^|]+?) \| [\d,]+ \| ([\d.]+) ± ([\d.]+) % \|', doc, re.M)
    assert [name for name, *_ in rows] == ['GLOM', 'conv stem + EfficientVectorRouting', 'CNN']
    counts = parameters_in(doc)
    assert max(counts.values()) <= 1.2 * min(counts.values()), counts
    # the MNIST-sized default GLOM (paper-sized column) has as many: the nets are shared by all locations
    assert sum(p.numel() for p in GLOM().parameters()) == counts['GLOM']
    assert (tmp_path / 'glom_islands.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_comparison_script_on_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'mnist'
    root.mkdir()
    for split, n, gz in (('train', 40, True), ('test', 20, False)):
        images_name, labels_name = data.MNIST_FILES[split]
        suffix = '.gz' if gz else ''
        data.write_idx(str(root / (images_name + suffix)), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gzip=gz)
        data.write_idx(str(root / (labels_name + suffix)), rng.integers(0, 10, n, dtype=np.uint8), gzip=gz)
    run_comparison('--dataset', 'mnist', '--data_root', tmp_path, '--seeds', 0, '--models', 'glom', 'cnn',
                   '--out_dir', tmp_path / 'out')
    assert list(parameters_in((tmp_path / 'out' / 'glom_mnist.md').read_text())) == ['GLOM', 'CNN']
    assert (tmp_path / 'out' / 'glom_islands.png').exists()
