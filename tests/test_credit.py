"""End-to-end credit assignment (heinsen_routing.credit)."""
import pytest
import torch
import torch.nn as nn

from heinsen_routing import (EfficientVectorRouting, GenerativeMatrixRouting, Routing, end_to_end_credit,
                             record_credit, residual_credit)


def three_routings():
    torch.manual_seed(0)
    return nn.Sequential(EfficientVectorRouting(-1, 6, 5, 5), EfficientVectorRouting(6, 4, 5, 5),
                         EfficientVectorRouting(4, 3, 5, 1))


def test_record_credit_collects_phi_in_call_order_and_keeps_outputs():
    model = three_routings()
    x = torch.randn(2, 9, 5)
    expected = model(x)
    with record_credit(model) as phis:
        y = model(x)
    torch.testing.assert_close(y, expected)
    assert [tuple(p.shape) for p in phis] == [(2, 9, 6), (2, 6, 4), (2, 4, 3)]
    assert all(not m.return_dict for m in model)                     # restored
    assert model(x).shape == (2, 3, 1)                                # hooks removed


def assert_same_returns(a, b):
    """a and b are the same structure (tensor, tuple, dict) with bit-identical tensors."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] is None) == (b[k] is None), k
            assert a[k] is None or torch.equal(a[k], b[k]), k
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    else:
        assert torch.equal(a, b)


class Capsules2019(nn.Module):
    """A 2019-style model that unpacks four values from Routing(..., return_R=True), keyword or positional."""

    def __init__(self, positional):
        super().__init__()
        self.positional = positional
        self.route = Routing(d_cov=2, d_inp=2, d_out=2, n_inp=7, n_out=3)
        nn.init.normal_(self.route.beta_use)

    def forward(self, a_inp, mu_inp):
        a_out, mu_out, sig2_out, R = (self.route(a_inp, mu_inp, True) if self.positional
                                      else self.route(a_inp, mu_inp, return_R=True))
        return a_out, R


@pytest.mark.parametrize('positional', [False, True])
def test_record_credit_keeps_the_2019_return_R_tuple(positional):
    model = Capsules2019(positional)
    a_inp, mu_inp = torch.randn(4, 7), torch.randn(4, 7, 2, 2)
    expected = model.route(a_inp, mu_inp, return_R=True)
    with record_credit(model) as phis:
        a_out, R = model(a_inp, mu_inp)
        plain = model.route(a_inp, mu_inp)                            # without return_R: three values
    assert_same_returns((a_out, R), (expected[0], expected[3]))
    assert_same_returns(plain, expected[:3])
    assert [tuple(p.shape) for p in phis] == [(4, 7, 3)] * 2
    torch.testing.assert_close(phis[0].sum(dim=-2), a_out)
    assert model.route.return_dict is False


@pytest.mark.parametrize('routing', ['efficient streamed', 'efficient materialised', 'definable', 'generative'])
@pytest.mark.parametrize('return_dict', [False, True])
def test_record_credit_returns_what_each_routing_returns(routing, return_dict):
    """Tensors, tuples or dicts, as each routing returns them outside the block (return_dict restored after it),
    bit-identical; phi recorded as the dict's phi."""
    from tests.helpers.routing import definable_routing
    torch.manual_seed(0)
    if routing.startswith('efficient'):
        module = EfficientVectorRouting(-1, 4, 6, 5, memory_efficient=routing.endswith('streamed'),
                                        return_dict=return_dict)
        args = (torch.randn(2, 9, 6),)
    elif routing == 'definable':
        module = definable_routing(4, 6, 5)
        module.return_dict = return_dict
        args = (torch.randn(2, 9, 6),)
    else:
        module = GenerativeMatrixRouting(-1, 4, 2, 2, 2, return_dict=return_dict)
        nn.init.normal_(module.beta_use)
        args = (torch.randn(2, 9), torch.randn(2, 9, 2, 2))
    expected = module(*args)
    with record_credit(module) as phis:
        got = module(*args)
    assert_same_returns(got, expected)
    assert module.return_dict is return_dict
    module.return_dict = True
    torch.testing.assert_close(phis[0], module(*args)['phi'], rtol=0, atol=0)


@pytest.mark.parametrize('rows, batch_numel, streamed_per_element', [(9, 6, False), (4, 1, True)])
def test_record_credit_keeps_streamed_outputs_bit_identical(rows, batch_numel, streamed_per_element):
    """return_dict=True (which record_credit switches on) streams the same chunks as return_dict=False, also when
    each batch element alone fills a chunk and the pass streams the elements one after the other, so the output is
    bit-identical and the dict's intermediates are in batch order."""
    from heinsen_routing.streamed import _pass_chunks
    from tests.helpers.routing import chunk_elements_for
    module = EfficientVectorRouting(-1, 4, 6, 5, n_iters=3, chunk_elements=chunk_elements_for(rows, batch_numel, 6, 4))
    x = torch.randn(2, 3, 9, 6)
    mask = torch.rand(2, 1, 9, 4) < 0.2
    assert (len(_pass_chunks(x.shape[:-2], 9, 10, module.chunk_elements)) == 6) == streamed_per_element
    expected = module(x, mask=mask)
    with record_credit(module) as phis:
        got = module(x, mask=mask)
    assert torch.equal(got, expected)
    module.memory_efficient = False
    with record_credit(module) as phis_materialised:
        module(x, mask=mask)
    torch.testing.assert_close(phis[0], phis_materialised[0])


def test_end_to_end_credit_is_normalised_chain_of_products():
    model = three_routings()
    with record_credit(model) as phis:
        model(torch.randn(2, 9, 5))
    credit = end_to_end_credit(phis)
    assert credit.shape == (2, 9, 3)
    manual = phis[0] / (phis[0].std(dim=(-2, -1), keepdim=True) + 1e-5)
    for phi in phis[1:]:
        manual = manual @ phi
        manual = manual / (manual.std(dim=(-2, -1), keepdim=True) + 1e-5)
    torch.testing.assert_close(credit, manual)
    torch.testing.assert_close(credit.std(dim=(-2, -1)), torch.ones(2), rtol=1e-4, atol=1e-4)
    # direction equals the unnormalised product's
    raw = phis[0] @ phis[1] @ phis[2]
    cos = torch.nn.functional.cosine_similarity(credit.flatten(1), raw.flatten(1))
    torch.testing.assert_close(cos, torch.ones(2))


def test_padded_inputs_get_zero_end_to_end_credit():
    model = three_routings()
    x = torch.randn(2, 9, 5)
    mask = torch.zeros(2, 9, 1, dtype=torch.bool)
    mask[1, 6:] = True
    with record_credit(model) as phis:
        model[2](model[1](model[0](x, mask=mask)))
    credit = end_to_end_credit(phis, mask=mask[..., 0])
    assert torch.count_nonzero(credit[1, 6:]) == 0
    assert torch.count_nonzero(credit[1, :6]) > 0
    # with the mask, a padded sample's credit equals its credit routed alone
    with record_credit(model) as alone:
        model(x[1, :6])
    torch.testing.assert_close(credit[1, :6], end_to_end_credit(alone), rtol=1e-4, atol=1e-5)


def test_residual_credit_recipe():
    phi = torch.randn(3, 5, 5)
    r = residual_credit(phi)
    torch.testing.assert_close(r - torch.eye(5), phi / (phi.std(dim=(-2, -1), keepdim=True) + 1e-5))
    with pytest.raises(ValueError, match='square'):
        residual_credit(torch.randn(5, 4))


def test_generative_matrix_routing_credit_sums_to_scores():
    model = GenerativeMatrixRouting(-1, 3, 2, 2, 2)
    nn.init.normal_(model.beta_use)
    nn.init.normal_(model.beta_ign)
    a_inp, mu_inp = torch.randn(4, 7), torch.randn(4, 7, 2, 2)
    with record_credit(model) as phis:
        a_out, _, _ = model(a_inp, mu_inp)
    torch.testing.assert_close(phis[0].sum(dim=-2), a_out)


def test_bad_credit_inputs():
    with pytest.raises(ValueError, match='at least one'):
        end_to_end_credit([])
    with pytest.raises(ValueError, match=r'phis\[1\]'):
        end_to_end_credit([torch.randn(4, 3), torch.randn(4, 2)])
    with pytest.raises(ValueError, match='no routing module'):
        with record_credit(nn.Linear(2, 2)):
            pass
