"""
End-to-end credit assignment over compositions of routings (Appendix A of the 2022 paper).

Each routing assigns credit phi [..., n_inp, n_out] to its inputs: before normalisation,
x_out[..., j, :] = sum_i phi[..., i, j] V[..., i, j, :]. For routings applied in sequence,
x -> routing_1 -> routing_2 -> ... , the credit of the first routing's inputs for the last
routing's outputs is the chain of matrix products phi_1 @ phi_2 @ ..., each partial product divided
by (its standard deviation + eps) so that the scale stays comparable across depths:

    credit = phis[0] / (std + eps)
    for phi in phis[1:]:
        credit = credit @ phi
        credit = credit / (std + eps)          # std over each sample's [n_inp, n_out] matrix

Residual compositions, y = x + f(x) with f a routing from n vectors to n vectors: the skip path
passes each input's own vector to the output at the same position, i.e. credit identity I, and f
passes credit phi_f. With both paths on a comparable scale, the block's credit is

    residual_credit(phi_f) = I + phi_f / (std(phi_f) + eps)

which then enters the chain like any other phi: end_to_end_credit([phi_1, residual_credit(phi_2), ...]).

Usage:
    with record_credit(model) as phis:     # forward hooks on every routing inside model
        scores = model(x)
    credit = end_to_end_credit(phis)       # [..., n_inp of the first, n_out of the last]
"""
import contextlib
import inspect
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .routing import DefinableVectorRouting, EfficientVectorRouting, GenerativeMatrixRouting, Routing

__all__ = ['record_credit', 'end_to_end_credit', 'residual_credit']

ROUTINGS = (EfficientVectorRouting, DefinableVectorRouting, GenerativeMatrixRouting)


def _normalize(credit, eps, rows=None):
    """credit [..., n, m] / (its std over each sample's matrix + eps); rows [..., n] bool selects
    the rows that count (padding rows, all zero, would otherwise shrink the std)."""
    if rows is None:
        return credit / (credit.std(dim=(-2, -1), keepdim=True) + eps)
    weight = rows[..., None].to(credit.dtype)                                # [..., n, 1]
    count = (weight.sum(dim=(-2, -1), keepdim=True) * credit.shape[-1]).clamp(min=2)
    mean = (credit * weight).sum(dim=(-2, -1), keepdim=True) / count
    var = ((credit - mean).square() * weight).sum(dim=(-2, -1), keepdim=True) / (count - 1)
    return credit / (var.sqrt() + eps)


def end_to_end_credit(phis: Sequence[torch.Tensor], eps: float = 1e-5,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """phis: list of [..., n_k, n_{k+1}] credit matrices of sequential routings
    -> [..., n_0, n_last], each partial product divided by (its std + eps).
    mask (optional) [..., n_0] bool, True = padding input: left out of the std, so that a sample's
    credit does not depend on how much padding its batch has (padding rows are zero anyway)."""
    if len(phis) == 0:
        raise ValueError("phis must hold at least one credit matrix [..., n_inp, n_out]")
    rows = None if mask is None else ~mask
    credit = _normalize(phis[0], eps, rows)
    for k, phi in enumerate(phis[1:], start=1):
        if phi.shape[-2] != credit.shape[-1]:
            raise ValueError(f"phis[{k}] has shape {tuple(phi.shape)} but must be [..., {credit.shape[-1]}, n_out] "
                             f"to follow phis[{k - 1}] (its n_out is {credit.shape[-1]})")
        credit = _normalize(credit @ phi, eps, rows)
    return credit


def residual_credit(phi: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Credit of a residual block y = x + f(x), f a routing from n to n vectors with credit
    phi [..., n, n]: I + phi / (std(phi) + eps)."""
    if phi.shape[-1] != phi.shape[-2]:
        raise ValueError(f"residual_credit needs a square phi [..., n, n] (y = x + f(x)), got {tuple(phi.shape)}")
    eye = torch.eye(phi.shape[-1], dtype=phi.dtype, device=phi.device)
    return eye + _normalize(phi, eps)


@contextlib.contextmanager
def record_credit(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every routing inside `model` (in call order) appends its phi [..., n_inp, n_out] to the
    yielded list, and returns what it would have returned outside the block: x_out, or the dict with return_dict=True
    (EfficientVectorRouting, DefinableVectorRouting); (a_out, mu_out, sig2_out), or with R as a fourth element when
    called with return_R=True (the 2019 Routing), or the dict (GenerativeMatrixRouting, Routing). To compute phi, the
    routings' return_dict is switched on for the duration and restored afterwards: EfficientVectorRouting with
    memory_efficient=True then also builds its last iteration's intermediates, six [..., n, n_out] tensors (a_inp
    [..., n]) per call, as return_dict=True does, and its outputs are bit-identical to those of a call outside the
    block."""
    routings = [m for m in model.modules() if isinstance(m, ROUTINGS)]
    if not routings:
        raise ValueError(f"record_credit: no routing module found inside {type(model).__name__}")
    phis, handles, saved = [], [], {m: m.return_dict for m in routings}

    def hook(module, args, kwargs, output):
        phis.append(output['phi'])
        if saved[module]:                                        # the routing's own return_dict=True
            return output
        if not isinstance(module, GenerativeMatrixRouting):
            return output['x_out']
        returned = (output['a_out'], output['mu_out'], output['sig2_out'])
        if isinstance(module, Routing) and _called_with(module, args, kwargs).get('return_R', False):
            returned += (output['R'],)
        return returned

    try:
        for m in routings:
            m.return_dict = True
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        yield phis
    finally:
        for h in handles:
            h.remove()
        for m, return_dict in saved.items():
            m.return_dict = return_dict


def _called_with(module, args, kwargs):
    """{name: value} of the arguments a module's forward was called with (the defaults left out)."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments
