"""End-to-end credit assignment (heinsen_routing.credit)."""
import pytest
import torch
import torch.nn as nn

from heinsen_routing import (EfficientVectorRouting, GenerativeMatrixRouting, end_to_end_credit, record_credit,
                             residual_credit)


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
