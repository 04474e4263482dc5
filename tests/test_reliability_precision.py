"""The routings give finite results under float16 autocast, and the same dtype in both memory modes: their sums
over inputs, softmaxes and layer norms run in float32 (float16 overflowed to all-NaN outputs at input magnitudes
of about 100, or 1e4 for GenerativeMatrixRouting); every routing handles a batch of size 0."""
import pytest
import torch
import torch.nn as nn

from heinsen_routing import DefinableVectorRouting, EfficientVectorRouting, GenerativeMatrixRouting, Routing


def test_float16_overflows_at_these_magnitudes():
    """Why: the M-step's sum over 50 inputs of (credit x input) at magnitude 100 is beyond float16's 65504."""
    torch.manual_seed(0)
    m = EfficientVectorRouting(n_inp=-1, n_out=16, d_inp=1024, d_out=64)
    x = torch.randn(2, 50, 1024) * 100
    phi = m.compute_beta_use(x)                                                   # [2, 50, 16], about 50
    assert torch.isinf((phi.half().transpose(-1, -2) @ x.half())).any()


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_efficient_vector_routing_is_finite_under_float16_autocast(memory_efficient):
    torch.manual_seed(0)
    m = EfficientVectorRouting(n_inp=-1, n_out=16, d_inp=1024, d_out=64, memory_efficient=memory_efficient)
    x = (torch.randn(2, 50, 1024) * 100).requires_grad_()
    expected = m(x)
    with torch.autocast('cpu', dtype=torch.float16):
        y = m(x)
        y_half_input = m(x.detach().half())
    assert y.dtype == torch.float32 and y_half_input.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(y_half_input).all()
    torch.testing.assert_close(y, expected)                                       # computed in float32
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize('low', [torch.float16, torch.bfloat16])
def test_both_memory_modes_return_the_same_dtype_under_autocast(low):
    torch.manual_seed(0)
    efficient = EfficientVectorRouting(n_inp=-1, n_out=4, d_inp=8, d_out=3, return_dict=True)
    plain = EfficientVectorRouting(n_inp=-1, n_out=4, d_inp=8, d_out=3, memory_efficient=False, return_dict=True)
    plain.load_state_dict(efficient.state_dict())
    x = torch.randn(2, 5, 8)
    with torch.autocast('cpu', dtype=low):
        a, b = efficient(x), plain(x)
    assert a['x_out'].dtype == b['x_out'].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in (*a.values(), *b.values()) if torch.is_tensor(v))
    tolerance = {} if low == torch.float16 else {'atol': 0.1, 'rtol': 0.1}       # bf16: autocast's matmuls
    torch.testing.assert_close(a['x_out'], b['x_out'], **tolerance)


@pytest.mark.parametrize('cls', [GenerativeMatrixRouting, Routing])
def test_generative_matrix_routing_is_finite_under_float16_autocast(cls):
    torch.manual_seed(0)
    m = GenerativeMatrixRouting(n_inp=-1, n_out=8, d_cov=4, d_inp=4, d_out=4) if cls is GenerativeMatrixRouting \
        else Routing(d_cov=4, d_inp=4, d_out=4, n_out=8)
    a, mu = torch.randn(2, 30), torch.randn(2, 30, 4, 4) * 1e4
    expected = m(a, mu)
    for low in (torch.float16, torch.bfloat16):
        with torch.autocast('cpu', dtype=low):
            out = m(a.half() if low == torch.float16 else a, mu)                  # mixed input dtypes are cast
        assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out), low
    with torch.autocast('cpu', dtype=torch.float16):
        out = m(a, mu)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)


def test_float64_input_under_autocast_is_still_a_clear_error():
    m = EfficientVectorRouting(n_inp=-1, n_out=4, d_inp=8, d_out=3)
    with torch.autocast('cpu', dtype=torch.float16), pytest.raises(ValueError, match='does not cast float64'):
        m(torch.randn(2, 5, 8, dtype=torch.float64))


class Dot(nn.Module):
    def forward(self, x, pred):
        return x @ pred.transpose(-1, -2)                                         # [..., n, n_out]


def definable(n_out=4, d=8, h=6):
    return DefinableVectorRouting(A=nn.Linear(d, 1), F=nn.Linear(d, n_out * h), G=nn.Linear(h, d), S=Dot(),
                                  n_inp=-1, n_out=n_out)


@pytest.mark.parametrize('shape', [(0, 5, 8), (0, 3, 5, 8), (3, 0, 5, 8)])
def test_every_routing_takes_a_batch_of_size_zero(shape):
    batch = shape[:-2]
    assert definable()(torch.randn(*shape)).shape == (*batch, 4, 6)
    for memory_efficient in (True, False):
        m = EfficientVectorRouting(-1, 4, 8, 6, memory_efficient=memory_efficient)
        assert m(torch.randn(*shape)).shape == (*batch, 4, 6)
    a_out, mu_out, sig2_out = GenerativeMatrixRouting(-1, 4, 4, 4, 4)(torch.randn(*shape[:-1]),
                                                                      torch.randn(*shape[:-1], 4, 4))
    assert a_out.shape == (*batch, 4) and mu_out.shape == sig2_out.shape == (*batch, 4, 4, 4)


def test_definable_routing_names_a_wrong_shape_from_F():
    m = DefinableVectorRouting(A=nn.Linear(8, 1), F=nn.Linear(8, 10), G=nn.Linear(6, 8), S=Dot(), n_inp=-1, n_out=4)
    with pytest.raises(ValueError, match=r"F\(x_inp\) must have shape \[..., n, n_out \* d_out\] .* got \(2, 5, 10\)"):
        m(torch.randn(2, 5, 8))
    same = definable()
    x = torch.randn(2, 5, 8)
    flat = same(x)
    same.F = nn.Sequential(same.F, nn.Unflatten(-1, (4, 6)))                      # [..., n, n_out, d_out] works too
    torch.testing.assert_close(same(x), flat)
