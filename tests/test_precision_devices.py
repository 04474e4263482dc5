"""Issue 19: the paper's runs as GPU users run them: backbone precision, device checks, the authors' 2022 files."""
import pytest
import torch

import models


def _count_autocast_forwards(backbone, batch):
    """-> (forwards of the backbone's model, how many of them ran under autocast), and the encoded hidden."""
    seen = []
    device_type = backbone.device.type
    hook = backbone.model.register_forward_hook(lambda m, args, out: seen.append(torch.is_autocast_enabled(device_type)))
    try:
        hidden, _ = backbone.encode(batch)
    finally:
        hook.remove()
    return len(seen), sum(seen), hidden


@pytest.mark.parametrize('fixture', ['tiny_roberta', 'tiny_beit'])
def test_backbone_runs_under_autocast_when_asked_and_hands_on_float32(fixture, request):
    torch.manual_seed(0)
    batch = ["a lovely film", "a dull one"] if fixture == 'tiny_roberta' else torch.randn(2, 3, 32, 32)
    plain = models.load_backbone(request.getfixturevalue(fixture))
    assert plain.autocast_dtype is None
    n, n_autocast, hidden32 = _count_autocast_forwards(plain, batch)
    assert (n, n_autocast) == (1, 0) and hidden32.dtype == torch.float32
    mixed = models.load_backbone(request.getfixturevalue(fixture), autocast_dtype=torch.bfloat16)
    n, n_autocast, hidden16 = _count_autocast_forwards(mixed, batch)
    assert (n, n_autocast) == (1, 1)
    assert hidden16.dtype == torch.float32 and hidden16.shape == hidden32.shape   # the head's precision
    assert not torch.equal(hidden16, hidden32)                                      # really computed in bfloat16
    torch.testing.assert_close(hidden16, hidden32, atol=0.1, rtol=0.05)


def test_autocast_dtype_is_checked():
    with pytest.raises(ValueError, match='autocast_dtype must be None, torch.float16 or torch.bfloat16'):
        models.load_backbone('minilm', autocast_dtype=torch.float64)


def test_stack_depths_writes_float32_once():
    states = [torch.randn(2, 5, 4, dtype=torch.bfloat16), torch.randn(2, 5, 4)]   # mixed, as under autocast
    out = models.stack_depths(states)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 2, 4)
    torch.testing.assert_close(out, torch.stack([s.float() for s in states], dim=-2))
