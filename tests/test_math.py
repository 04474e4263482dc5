"""The routings' math: the state dicts, forwards and gradients of EfficientVectorRouting, DefinableVectorRouting and
GenerativeMatrixRouting against the equations (docs/equations.md) and the independent transcription in tests/reference.py,
and the masking rules (padding contributes nothing, whatever its value)."""
import pytest
import torch
import torch.nn as nn

from heinsen_routing import DefinableVectorRouting, EfficientVectorRouting, GenerativeMatrixRouting
from tests.helpers.routing import seed  # noqa: F401 (an autouse fixture)
from tests.helpers.routing import assert_close_rel, chunk_elements_for, definable_routing, grads_of
from benchmarks.reference import spec_state_shapes, straightforward_routing


# -------------------------------------------------------------------------------------------------
# EfficientVectorRouting: the state dict of the authors' checkpoints
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n_inp', [-1, 12])
def test_state_dict_keys_and_shapes_equal_spec(n_inp):
    module = EfficientVectorRouting(n_inp, 5, 8, 3)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == spec_state_shapes(n_inp, 5, 8, 3)
    assert torch.equal(module.CONST_ones_over_n_out, torch.full((5,), 1 / 5))


@pytest.mark.parametrize('n_inp', [-1, 12])
def test_published_checkpoint_layout_loads_strict(n_inp):
    checkpoint = {k: torch.randn(shape) for k, shape in spec_state_shapes(n_inp, 5, 8, 3).items()}
    module = EfficientVectorRouting(n_inp, 5, 8, 3)
    module.load_state_dict(checkpoint, strict=True)
    assert torch.equal(module.W_F2, checkpoint['W_F2'])


def test_initialisations_follow_spec():
    d_inp, d_out, n_inp, n_out = 400, 300, 200, 100
    module = EfficientVectorRouting(n_inp, n_out, d_inp, d_out)
    expected_std = {'W_A': 2 / d_inp ** 0.5, 'W_F1': 1.0, 'W_F2': 2 / d_inp ** 0.5, 'W_G1': 1 / d_out ** 0.5,
                    'W_G2': 1.0, 'W_S': 1 / d_inp ** 0.5, 'beta_use': 1.0, 'beta_ign': 1.0}
    for name, std in expected_std.items():
        p = getattr(module, name)
        assert abs(p.std().item() / std - 1) < 0.05, name
        assert abs(p.mean().item()) < 0.05 * std, name
    for name in ('B_A', 'B_F2', 'B_G2', 'B_S'):
        assert torch.count_nonzero(getattr(module, name)) == 0, name


# -------------------------------------------------------------------------------------------------
# EfficientVectorRouting: forward and gradients
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('batch_shape', [(), (3,), (2, 3)])
@pytest.mark.parametrize('n_inp', [-1, 10])
def test_shapes_leading_dims(batch_shape, n_inp):
    module = EfficientVectorRouting(n_inp, 4, 6, 5)
    x = torch.randn(*batch_shape, 10, 6)
    assert module(x).shape == (*batch_shape, 4, 5)
    out = EfficientVectorRouting(n_inp, 4, 6, 5, return_dict=True)(x)
    assert out['phi'].shape == (*batch_shape, 10, 4)
    assert out['a_inp'].shape == (*batch_shape, 10)
    assert out['pred_x_inp'].shape == (*batch_shape, 4, 6)


@pytest.mark.parametrize('n_inp', [-1, 20])
@pytest.mark.parametrize('normalize', [True, False])
@pytest.mark.parametrize('d_out', [1, 7])
def test_agrees_with_straightforward_transcription_of_spec(n_inp, normalize, d_out):
    module = EfficientVectorRouting(n_inp, 6, 9, d_out, n_iters=3, normalize=normalize)
    x = torch.randn(2, 20, 9)
    reference = straightforward_routing(module, x)
    for memory_efficient in (True, False):
        module.memory_efficient = memory_efficient
        assert_close_rel(module(x), reference, rtol=1e-5)


def test_shared_mask_agrees_with_straightforward_transcription():
    module = EfficientVectorRouting(15, 6, 9, 4, n_iters=3)
    x = torch.randn(2, 15, 9)
    mask = torch.rand(15, 6) < 0.3
    mask[:, 0] = False  # no input masked for every output: the authors' code is defined there
    assert_close_rel(module(x, mask=mask), straightforward_routing(module, x, mask=mask))


@pytest.mark.parametrize('n_inp', [-1, 6])
@pytest.mark.parametrize('memory_efficient', [True, False])
def test_gradcheck_float64(n_inp, memory_efficient):
    module = EfficientVectorRouting(n_inp, 3, 4, 2, n_iters=2, memory_efficient=memory_efficient).double()
    x = torch.randn(2, 6, 4, dtype=torch.double, requires_grad=True)
    mask = torch.zeros(2, 6, 3, dtype=torch.bool)
    mask[1, 4:] = True  # padding in the second sample
    params = list(module.parameters())
    names = [name for name, _ in module.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,), {'mask': mask})

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params]))


@pytest.mark.parametrize('n_inp', [-1, 8])
@pytest.mark.parametrize('memory_efficient', [True, False])
def test_gradients_reach_every_parameter(n_inp, memory_efficient):
    module = EfficientVectorRouting(n_inp, 4, 6, 5, n_iters=2, memory_efficient=memory_efficient)
    module(torch.randn(3, 8, 6)).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_credit_identity_x_out_equals_sum_phi_V(memory_efficient):
    module = EfficientVectorRouting(-1, 5, 7, 4, normalize=False, memory_efficient=False, return_dict=True)
    x = torch.randn(3, 11, 7, dtype=torch.float64)
    module.double()
    out = module(x)
    assert torch.allclose(out['x_out'], torch.einsum('...ij,...ijh->...jh', out['phi'], out['V']))
    module.memory_efficient = memory_efficient
    out2 = module(x)
    if memory_efficient:
        assert out2['V'] is None
    torch.testing.assert_close(out2['phi'], out['phi'])
    torch.testing.assert_close(out2['x_out'], torch.einsum('...ij,...ijh->...jh', out['phi'], out['V']))


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_one_iteration_returns_dict(memory_efficient):
    module = EfficientVectorRouting(-1, 4, 6, 5, n_iters=1, memory_efficient=memory_efficient, return_dict=True)
    out = module(torch.randn(2, 9, 6))
    assert out['S'] is None and out['pred_x_inp'] is None
    assert out['x_out'].shape == (2, 4, 5) and out['phi'].shape == (2, 9, 4)
    torch.testing.assert_close(out['R'], torch.full((2, 9, 4), 0.25))


# -------------------------------------------------------------------------------------------------
# DefinableVectorRouting
# -------------------------------------------------------------------------------------------------

def test_definable_with_variable_n_inp_works():
    d_inp, n_out, d_out = 6, 4, 3
    A = nn.Linear(d_inp, 1)
    F = nn.Linear(d_inp, n_out * d_out)
    G = nn.Linear(d_out, d_inp)
    S = lambda x, pred: torch.einsum('...id,...jd->...ij', x, pred)
    module = DefinableVectorRouting(A, F, G, S, n_inp=-1, n_out=n_out)
    assert module.d_inp == d_inp
    assert module(torch.randn(2, 9, d_inp)).shape == (2, n_out, d_out)
    assert module(torch.randn(5, d_inp)).shape == (n_out, d_out)
    # d_inp can be given, or is learned lazily when A has no nn.Linear to infer it from
    lazy = DefinableVectorRouting(nn.Sequential(nn.LazyLinear(1)), F, G, S, n_inp=-1, n_out=n_out)
    assert lazy.d_inp is None
    assert lazy(torch.randn(2, 9, d_inp)).shape == (2, n_out, d_out)
    assert lazy.compute_beta_use.weight.shape == (n_out, d_inp)
    given = DefinableVectorRouting(nn.Sequential(nn.LazyLinear(1)), F, G, S, n_inp=-1, n_out=n_out, d_inp=d_inp)
    assert given.compute_beta_ign.weight.shape == (n_out, d_inp)


def test_definable_matches_efficient_when_modules_mirror_it():
    """DefinableVectorRouting with A, F, G, S mirroring EfficientVectorRouting (no scaling or
    normalisation) computes the same x_out."""
    eff = EfficientVectorRouting(8, 4, 6, 5, n_iters=3, normalize=False).double()
    x = torch.randn(2, 8, 6, dtype=torch.double)

    class A(nn.Module):
        def forward(self, x):
            return torch.einsum('...id,id->...i', x * 8 ** -0.5, eff.W_A) + eff.B_A

    F_ = lambda x: torch.einsum('...id,jd,dh->...ijh', x * 8 ** -0.5, eff.W_F1, eff.W_F2) + eff.B_F2
    G = lambda x_out: torch.einsum('...jh,hd,jd->...jd', nn.functional.layer_norm(x_out, (5,)), eff.W_G1,
                                   eff.W_G2) + eff.B_G2
    S = lambda x, pred: nn.functional.logsigmoid(torch.einsum('...id,...jd->...ij', x, pred) * eff.W_S + eff.B_S)
    wrap = lambda f: type('M', (nn.Module,), {'forward': lambda self, *a: f(*a)})()
    definable = DefinableVectorRouting(A(), wrap(F_), wrap(G), wrap(S), n_inp=8, n_out=4, n_iters=3).double()
    definable.beta_use.data.copy_(eff.beta_use)
    definable.beta_ign.data.copy_(eff.beta_ign)
    torch.testing.assert_close(definable(x), eff(x))


def test_definable_gradcheck():
    A, F, G = nn.Linear(3, 1), nn.Linear(3, 4 * 2), nn.Linear(2, 3)
    S = type('S', (nn.Module,), {'forward': lambda self, x, p: torch.einsum('...id,...jd->...ij', x, p)})()
    module = DefinableVectorRouting(A, F, G, S, n_inp=-1, n_out=4).double()
    x = torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


# -------------------------------------------------------------------------------------------------
# Masks: padding contributes nothing, and all-masked outputs are zero and finite
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('memory_efficient', [True, False])
@pytest.mark.parametrize('n_inp', [-1, 7])
def test_input_masked_for_every_output_contributes_nothing(memory_efficient, n_inp):
    module = EfficientVectorRouting(n_inp, 4, 6, 5, memory_efficient=memory_efficient, return_dict=True)
    x = torch.randn(2, 7, 6)
    mask = torch.zeros(7, 4, dtype=torch.bool)
    mask[3] = True                                           # input 3 masked for every output
    out = module(x, mask=mask)
    assert torch.isfinite(out['x_out']).all()
    assert torch.count_nonzero(out['phi'][:, 3]) == 0        # zero credit
    assert torch.count_nonzero(out['R'][:, 3]) == 0
    # its value does not matter
    x2 = x.clone()
    x2[:, 3] = 1e3 * torch.randn(2, 6)
    torch.testing.assert_close(module(x2, mask=mask)['x_out'], out['x_out'])


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_output_with_all_inputs_masked_is_zero_and_finite(memory_efficient):
    module = EfficientVectorRouting(-1, 4, 6, 5, memory_efficient=memory_efficient)
    x = torch.randn(2, 7, 6, requires_grad=True)
    mask = torch.zeros(7, 4, dtype=torch.bool)
    mask[:, 2] = True                                        # output 2 sees no input
    y = module(x, mask=mask)
    assert torch.isfinite(y).all()
    assert torch.count_nonzero(y[:, 2]) == 0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # a sample whose inputs are all masked: all outputs zero, finite gradients
    everything = torch.ones(2, 7, 1, dtype=torch.bool)
    y = module(x, mask=everything)
    assert torch.count_nonzero(y) == 0
    x.grad = None
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_per_sample_padding_equals_routing_alone():
    """A sample padded to length L inside a batch gives the output it gives routed alone."""
    n_max = 9
    lengths = [n_max, 4, 1]
    for memory_efficient in (True, False):
        module = EfficientVectorRouting(-1, 5, 6, 4, n_iters=3, memory_efficient=memory_efficient).double()
        x = torch.randn(len(lengths), n_max, 6, dtype=torch.double)
        mask = torch.arange(n_max)[None, :, None] >= torch.tensor(lengths)[:, None, None]  # [batch, n, 1]
        x_padded = x.masked_fill(mask, 123.0)                      # padding content must not matter
        batched = module(x_padded, mask=mask)
        for b, length in enumerate(lengths):
            alone = module(x[b, :length])
            torch.testing.assert_close(batched[b], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('routing', ['streamed', 'materialised', 'definable'])
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('mask_shape', ['padding', 'per_output'])
def test_nan_or_inf_in_masked_inputs_reaches_neither_output_nor_gradients(routing, bad, mask_shape):
    if routing == 'definable':
        module = definable_routing(4, 6, 5).double()
    else:
        module = EfficientVectorRouting(-1, 4, 6, 5, n_iters=3, memory_efficient=routing == 'streamed',
                                        chunk_elements=chunk_elements_for(3, 2, 6, 4)).double()
    x = torch.randn(2, 9, 6, dtype=torch.double)
    lengths = torch.tensor([9, 5])
    mask = torch.arange(9)[None, :, None] >= lengths[:, None, None]        # [2, 9, 1]: sample 1 padded 5 -> 9
    if mask_shape == 'per_output':
        mask = mask | (torch.rand(2, 9, 4) < 0.2)                          # [2, 9, 4], padding rows all True
    results = []
    for padding in (bad, 0.0):
        x_p = x.masked_fill(mask.all(dim=-1, keepdim=True), padding).requires_grad_()
        y = module(x_p, mask=mask)
        results.append((y, grads_of(y, [x_p, *module.parameters()])))
    (y_bad, g_bad), (y_zero, g_zero) = results
    assert torch.isfinite(y_bad).all()
    torch.testing.assert_close(y_bad, y_zero, rtol=0, atol=0)
    for a, b in zip(g_bad, g_zero):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.count_nonzero(g_bad[0][1, 5:]) == 0                      # masked inputs get no gradient


# -------------------------------------------------------------------------------------------------
# GenerativeMatrixRouting (2019)
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n_inp', [-1, 6])
@pytest.mark.parametrize('single_beta', [False, True])
def test_gmr_state_dict_equals_spec(n_inp, single_beta):
    module = GenerativeMatrixRouting(n_inp, 3, 4, 5, 2, single_beta=single_beta)
    m = max(1, n_inp)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == {'W': (m, 3, 5, 2), 'B': (m, 3, 4, 2), 'beta_use': (m, 3), 'beta_ign': (m, 3), 'CONST_one': ()}
    assert (module.beta_ign is module.beta_use) == single_beta
    module.load_state_dict({k: torch.randn(s) for k, s in got.items()}, strict=True)


@pytest.mark.parametrize('batch_shape', [(), (3,), (2, 3)])
@pytest.mark.parametrize('p_model', ['gaussian', 'skm'])
def test_gmr_shapes(batch_shape, p_model):
    module = GenerativeMatrixRouting(-1, 3, 4, 5, 2, p_model=p_model)
    a_out, mu_out, sig2_out = module(torch.randn(*batch_shape, 7), torch.randn(*batch_shape, 7, 4, 5))
    assert a_out.shape == (*batch_shape, 3)
    assert mu_out.shape == sig2_out.shape == (*batch_shape, 3, 4, 2)
    assert (sig2_out > 0).all()


def test_gmr_first_iteration_equations():
    """n_iters=1: R = 1/n_out, so the M-step has a closed form to check against."""
    module = GenerativeMatrixRouting(5, 3, 2, 4, 3, n_iters=1, return_dict=True).double()
    nn.init.normal_(module.beta_use)
    nn.init.normal_(module.beta_ign)
    nn.init.normal_(module.B)
    a_inp, mu_inp = torch.randn(2, 5, dtype=torch.double), torch.randn(2, 5, 2, 4, dtype=torch.double)
    out = module(a_inp, mu_inp)
    V = torch.einsum('bicd,ijdh->bijch', mu_inp, module.W) + module.B
    f_a = torch.sigmoid(a_inp)[..., None]
    D_use, D_ign = f_a / 3, f_a * 2 / 3
    torch.testing.assert_close(out['V'], V)
    torch.testing.assert_close(out['a_out'], (module.beta_use * D_use - module.beta_ign * D_ign).sum(-2))
    w = D_use / (D_use.sum(-2, keepdim=True) + module.eps)
    mu = torch.einsum('bij,bijch->bjch', w, V)
    torch.testing.assert_close(out['mu_out'], mu)
    torch.testing.assert_close(out['sig2_out'], torch.einsum('bij,bijch->bjch', w, (V - mu[:, None]) ** 2) + module.eps)
    assert out['log_p'] is None


def test_gmr_second_iteration_gaussian_e_step():
    module = GenerativeMatrixRouting(-1, 3, 2, 2, 2, n_iters=2, return_dict=True).double()
    a_inp, mu_inp = torch.randn(6, dtype=torch.double), torch.randn(6, 2, 2, dtype=torch.double)
    first = GenerativeMatrixRouting(-1, 3, 2, 2, 2, n_iters=1).double()
    first.load_state_dict(module.state_dict())
    a1, mu1, sig1 = first(a_inp, mu_inp)
    out = module(a_inp, mu_inp)
    V = out['V']
    log_p = -((V - mu1) ** 2 / (2 * sig1)).sum((-2, -1)) - torch.log(sig1.sqrt()).sum((-2, -1))
    torch.testing.assert_close(out['log_p'], log_p)
    torch.testing.assert_close(out['R'], torch.softmax(torch.nn.functional.logsigmoid(a1) + log_p, dim=-1))


@pytest.mark.parametrize('p_model', ['gaussian', 'skm'])
def test_gmr_gradcheck_and_gradients_reach_parameters(p_model):
    module = GenerativeMatrixRouting(4, 3, 2, 2, 2, n_iters=3, p_model=p_model).double()
    nn.init.normal_(module.beta_use)
    nn.init.normal_(module.beta_ign)
    a_inp = torch.randn(2, 4, dtype=torch.double, requires_grad=True)
    mu_inp = torch.randn(2, 4, 2, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, mu: module(a, mu), (a_inp, mu_inp))
    sum(t.sum() for t in module(a_inp, mu_inp)).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_gmr_one_iteration_dict_and_masks_finite():
    module = GenerativeMatrixRouting(-1, 3, 2, 2, 2, n_iters=1, return_dict=True)
    assert module(torch.randn(5), torch.randn(5, 2, 2))['log_p'] is None
    module = GenerativeMatrixRouting(-1, 3, 2, 2, 2, n_iters=3)
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:, 1] = True                                        # output 1 sees nothing
    mask[2] = True                                           # input 2 seen by nothing
    a_out, mu_out, sig2_out = module(torch.randn(4, 5), torch.randn(4, 5, 2, 2), mask=mask)
    assert all(torch.isfinite(t).all() for t in (a_out, mu_out, sig2_out))
    assert torch.count_nonzero(a_out[:, 1]) == 0 and torch.count_nonzero(mu_out[:, 1]) == 0
