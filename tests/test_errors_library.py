"""Clear errors of the library: bad sizes, shapes, dtypes and constructor arguments give one ValueError that names the
argument with the expected and the actual shape, dtype or value."""
import re

import pytest
import torch
import torch.nn as nn

from heinsen_routing import DefinableVectorRouting, EfficientVectorRouting, GenerativeMatrixRouting
from tests.helpers.routing import seed  # noqa: F401 (an autouse fixture)


# -------------------------------------------------------------------------------------------------
# Bad inputs
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('module', [
    EfficientVectorRouting(-1, 4, 6, 5),
    EfficientVectorRouting(-1, 4, 6, 5, memory_efficient=False)])
def test_empty_sequence_raises_value_error(module):
    with pytest.raises(ValueError, match='empty sequence'):
        module(torch.randn(2, 0, 6))
    with pytest.raises(ValueError, match='empty sequence'):
        GenerativeMatrixRouting(-1, 3, 4, 4, 4)(torch.randn(2, 0), torch.randn(2, 0, 4, 4))


def test_wrong_length_or_size_names_argument_and_shapes():
    fixed = EfficientVectorRouting(10, 4, 6, 5)
    with pytest.raises(ValueError, match=r"x_inp.*n_inp=10.*length 9"):
        fixed(torch.randn(2, 9, 6))
    with pytest.raises(ValueError, match=r"x_inp must have shape \[\.\.\., 10, d_inp\] = \[\.\.\., n, 6\], got \(2, 10, 5\)"):
        fixed(torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match='x_inp'):
        fixed(torch.randn(6))
    with pytest.raises(ValueError, match='floating-point'):
        fixed(torch.ones(2, 10, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must be broadcastable to \[\.\.\., n, n_out\] = \[2, 10, 4\]"):
        fixed(torch.randn(2, 10, 6), mask=torch.zeros(3, 10, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match='mask must be a bool tensor'):
        fixed(torch.randn(2, 10, 6), mask=torch.zeros(10, 4))
    gmr = GenerativeMatrixRouting(-1, 3, 4, 4, 2)
    with pytest.raises(ValueError, match=r"mu_inp"):
        gmr(torch.randn(2, 5), torch.randn(2, 5, 4, 3))
    with pytest.raises(ValueError, match=r"a_inp must have shape \[\.\.\., n\] = \[2, 5\]"):
        gmr(torch.randn(2, 4), torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize('bad', [dict(n_inp=0), dict(n_out=1), dict(n_iters=0)])
def test_bad_constructor_arguments(bad):
    kwargs = dict(n_inp=5, n_out=3, d_inp=4, d_out=4, n_iters=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        EfficientVectorRouting(**kwargs)


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_float16_input_under_autocast_and_clear_error_outside(memory_efficient):
    module = EfficientVectorRouting(-1, 4, 6, 5, memory_efficient=memory_efficient)
    x = torch.randn(2, 7, 6)
    with pytest.raises(ValueError, match=r"x_inp has dtype torch.float16 but the module's parameters are torch.float32"):
        module(x.half())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = module(x.half())
    assert torch.isfinite(y).all()
    assert (y.float() - module(x)).abs().max() < 0.1             # low-precision result, same values
    with torch.autocast('cpu', dtype=torch.bfloat16):
        module(x.half().requires_grad_()).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_float64_input_under_autocast_raises_value_error(memory_efficient):
    module = EfficientVectorRouting(-1, 4, 6, 5, memory_efficient=memory_efficient)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"x_inp has dtype torch.float64 inside torch.autocast\('cpu', "
                                             r"dtype=torch.bfloat16\).*x.float\(\)"):
            module(torch.randn(2, 7, 6, dtype=torch.float64))
        assert module(torch.randn(2, 7, 6)).shape == (2, 4, 5)              # float32 input is fine


# -------------------------------------------------------------------------------------------------
# Bad constructor arguments
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['d_inp', 'd_out', 'chunk_elements'])
@pytest.mark.parametrize('value', [0, -3, 4.0, True, '4', None])
def test_bad_sizes_raise_value_error_naming_argument(name, value):
    if name == 'chunk_elements' and value is None:
        pytest.skip('chunk_elements=None is the per-device default')
    kwargs = dict(n_inp=-1, n_out=3, d_inp=4, d_out=4) | {name: value}
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a positive int, got {value!r}")):
        EfficientVectorRouting(**kwargs)


@pytest.mark.parametrize('value', [0, -2, 3.0, True])
def test_definable_bad_d_inp_raises(value):
    A, F_, G = nn.Linear(4, 1), nn.Linear(4, 6), nn.Linear(2, 4)
    with pytest.raises(ValueError, match=re.escape(f"d_inp must be a positive int, got {value!r}")):
        DefinableVectorRouting(A, F_, G, nn.Identity(), n_inp=-1, n_out=3, d_inp=value)


@pytest.mark.parametrize('bad', [dict(n_inp=True), dict(n_out=True), dict(n_iters=True), dict(n_out=3.0)])
def test_bool_or_float_counts_raise(bad):
    kwargs = dict(n_inp=5, n_out=3, d_inp=4, d_out=4, n_iters=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        EfficientVectorRouting(**kwargs)


def test_shared_checks_for_other_constructors():
    """_check_dims and _check_eps are the helpers every routing's constructor calls."""
    from heinsen_routing.checks import check_dims as _check_dims, check_eps as _check_eps
    _check_dims(d_cov=4, d_inp=1)
    with pytest.raises(ValueError, match=r"d_cov must be a positive int, got 0"):
        _check_dims(d_cov=0, d_inp=1)
    _check_eps(1e-5)
    for eps in (0, -1e-5, float('nan'), float('inf'), True, '1e-5'):
        with pytest.raises(ValueError, match=r"eps must be a positive float"):
            _check_eps(eps)


def test_gmr_rejects_unknown_p_model():
    with pytest.raises(ValueError, match='p_model'):
        GenerativeMatrixRouting(-1, 3, 2, 2, 2, p_model='laplace')


class Outer(nn.Module):
    """S of the docs' example: the dot products of the inputs with the outputs' predictions."""

    def forward(self, x_inp, pred):
        return x_inp @ pred.transpose(-2, -1)


class OneScorePerInput(nn.Module):
    """An S of the wrong shape: one score per input [..., n], not one per input and output [..., n, n_out]."""

    def forward(self, x_inp, pred):
        return x_inp[..., 0]


@pytest.mark.parametrize('which', ['A', 'F', 'G', 'S'])
def test_definable_given_plain_functions_works_or_names_what_is_not_callable(which):
    """Plain functions (no parameters) are accepted wherever a module is; a d_inp not inferable from a function A
    is learned lazily. Something that cannot be called is named."""
    modules = dict(A=nn.Linear(4, 1), F=nn.Linear(4, 6), G=nn.Linear(2, 4), S=Outer())
    functions = dict(A=lambda x: x.sum(-1), F=lambda x: torch.cat([x, x[..., :2]], -1),
                     G=lambda x: torch.cat([x, x], -1), S=lambda x, pred: x @ pred.transpose(-2, -1))
    routing = DefinableVectorRouting(**{**modules, which: functions[which]}, n_inp=-1, n_out=3)
    assert routing(torch.randn(2, 5, 4)).shape == (2, 3, 2)
    with pytest.raises(ValueError, match=rf"^{which} must be a module or a function of tensors, got int$"):
        DefinableVectorRouting(**{**modules, which: 7}, n_inp=-1, n_out=3)


@pytest.mark.parametrize('which, module, said', [
    ('A', nn.Linear(4, 2), r"A\(x_inp\) must have shape \[\.\.\., n\] or \[\.\.\., n, 1\] with \[\.\.\., n\] = "
                           r"\[2, 5\], got \(2, 5, 2\)"),
    ('F', nn.Linear(4, 7), r"F\(x_inp\) must have shape .* n_out = 3, got \(2, 5, 7\)"),
    ('S', OneScorePerInput(), r"S\(x_inp, G\(x_out\)\) must have shape \[\.\.\., n, n_out\] = \[2, 5, 3\], "
                              r"got \(2, 5\)"),
])
def test_definable_given_a_module_of_the_wrong_output_shape_names_it(which, module, said):
    modules = dict(A=nn.Linear(4, 1), F=nn.Linear(4, 6), G=nn.Linear(2, 4), S=Outer())
    modules[which] = module
    with pytest.raises(ValueError, match=said):
        DefinableVectorRouting(**modules, n_inp=-1, n_out=3)(torch.randn(2, 5, 4))
