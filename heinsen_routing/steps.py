"""
The equations of the routings, one function per step (docs/equations.md numbers them). The readable forwards
in routing.py and the streamed kernel in streamed.py both compute with these functions, so the math is written
once. Notation: `...` any leading (batch) dims, i inputs (n of them), j outputs (n_out), d input features (d_inp),
h output features (d_out).
"""

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Scale = Union[float, torch.Tensor]      # n^(-1/2): a float, or [..., 1, 1] with a mask (each sample's true length)


def input_scale(mask: Optional[torch.Tensor], batch_shape: torch.Size, n: int, dtype: torch.dtype) -> Scale:
    """n^(-1/2) with n each sample's true length: inputs masked for every output don't count.
    Returns a float (no mask) or a tensor [..., 1, 1] that broadcasts against [..., n, d]."""
    if mask is None:
        return n ** -0.5
    is_input = ~mask.all(dim=-1)                                           # [..., n] (broadcastable)
    n_true = is_input.expand(*batch_shape, n).sum(dim=-1)                  # [...]
    return n_true.clamp(min=1).to(dtype).rsqrt()[..., None, None]         # [..., 1, 1]


def squeeze_last(scale: Scale) -> Scale:
    """[..., 1, 1] -> [..., 1] (to scale [..., n] tensors); floats pass through."""
    return scale[..., 0] if torch.is_tensor(scale) else scale


def without_masked_inputs(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., n, d] with the inputs masked for every output replaced by zeros: they contribute
    nothing whatever their values (0 * NaN is NaN, so they must not enter any sum). mask: None or
    bool broadcastable to [..., n, n_out]."""
    return x if mask is None else x.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)


def masked_softmax(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax over j (last dim) with masked entries excluded and set to 0. A row whose entries
    are all masked gets all zeros (the authors' code gives NaN there). Finite fill, not -inf, so
    that neither the forward nor autograd's backward ever sees a 0/0."""
    if mask is None:
        return logits.softmax(dim=-1)
    logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1).masked_fill(mask, 0.0)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """N(.): layer normalisation over the last dim with no learned affine; identity when d == 1."""
    return x if x.shape[-1] == 1 else F.layer_norm(x, x.shape[-1:])


def activations(x_dot_W_A: torch.Tensor, scale: Scale, B_A: torch.Tensor,
                mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4: a_inp = (x . W_A) n^(-1/2) + B_A, f_a = sigma(a_inp), 0 for masked (input, output) pairs.
    x_dot_W_A [..., n] -> a_inp [..., n], f_a [..., n, 1|n_out]"""
    a_inp = x_dot_W_A * squeeze_last(scale) + B_A                          # [..., n]
    f_a = torch.sigmoid(a_inp)[..., None]                                  # [..., n, 1]
    return a_inp, (f_a if mask is None else f_a.masked_fill(mask, 0.0))   # [..., n, 1|n_out]


def initial_R(f_a: torch.Tensor, mask: Optional[torch.Tensor], n_out: int) -> torch.Tensor:
    """E-step of the first iteration: R = 1 / n_out over the unmasked outputs (0 where every output is masked).
    -> [..., n, n_out]"""
    if mask is None:
        return torch.full((), 1 / n_out, dtype=f_a.dtype, device=f_a.device).expand(*f_a.shape[:-1], n_out)
    shape = torch.broadcast_shapes(mask.shape, (*f_a.shape[:-1], n_out))
    kept = (~mask).to(f_a.dtype).expand(shape)                                  # [..., n, n_out]
    return kept / kept.sum(dim=-1, keepdim=True).clamp(min=1)


def agreement(L: torch.Tensor, W_S: torch.Tensor, B_S: torch.Tensor) -> torch.Tensor:
    """E-step: S = logsigma(L W_S + B_S), L[..., i, j] = x_inp[..., i] . pred[..., j]. -> [..., n, n_out]"""
    return F.logsigmoid(torch.addcmul(B_S, L, W_S))


def credit(R: torch.Tensor, f_a: torch.Tensor, beta_use: torch.Tensor,
           beta_ign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D-step and the credit of the M-step ("bang per bit"). f_a [..., n, 1|n_out], R and
    beta_* [..., n, n_out] -> D_use, D_ign, phi, each [..., n, n_out]."""
    D_use = f_a * R
    D_ign = f_a - D_use
    phi = beta_use * D_use - beta_ign * D_ign
    return D_use, D_ign, phi


def credit_per_activation(R: torch.Tensor, beta_sum: torch.Tensor, beta_ign: torch.Tensor) -> torch.Tensor:
    """The credit per unit of activation, q = beta_use R - beta_ign (1 - R) = beta_sum R - beta_ign with
    beta_sum = beta_use + beta_ign, so that phi = f_a q (credit's phi regrouped; the streamed kernel computes phi
    this way, q is what its backward needs for d f_a, and beta_sum for d R). R, beta_* [..., n, n_out] -> [..., n, n_out]"""
    return (beta_sum * R).sub_(beta_ign)


def predict(x_out: torch.Tensor, W_G1: torch.Tensor, W_G2: torch.Tensor, B_G2: torch.Tensor) -> torch.Tensor:
    """E-step prediction: pred[..., j, d] = sum_h N(x_out)[..., j, h] W_G1[h, d] W_G2[j, d] + B_G2[j, d]."""
    return (layer_norm(x_out) @ W_G1) * W_G2 + B_G2                                # [..., n_out, d_inp]


def x_out_from_sums(phi_x: torch.Tensor, phi_1: torch.Tensor, scale: Scale, W_F1: torch.Tensor, W_F2: torch.Tensor,
                    B_F2: torch.Tensor) -> torch.Tensor:
    """M-step of EfficientVectorRouting from the sums phi_x = sum_i phi x, phi_1 = sum_i phi:
    x_out[..., j, h] = sum_d phi_x[..., j, d] n^(-1/2) W_F1[j, d] W_F2[d, h] + phi_1[..., j] B_F2[j, h]
    (= sum_i phi[..., i, j] V[..., i, j, h] without the votes V)."""
    return ((phi_x * scale) * W_F1) @ W_F2 + phi_1[..., None] * B_F2                # [..., n_out, d_out]


def init_betas(module: nn.Module, n_inp: int, n_out: int, d_inp: Optional[int]) -> None:
    """Step 1's parameters: beta_use, beta_ign [n_inp, n_out] standard normal, or (n_inp = -1) two
    nn.Linear(d_inp, n_out) computing them from each input (LazyLinear when d_inp is unknown)."""
    if n_inp > 0:
        module.beta_use = nn.Parameter(torch.randn(n_inp, n_out))                   # [n_inp, n_out]
        module.beta_ign = nn.Parameter(torch.randn(n_inp, n_out))                   # [n_inp, n_out]
    elif d_inp is not None:
        module.compute_beta_use = nn.Linear(d_inp, n_out)
        module.compute_beta_ign = nn.Linear(d_inp, n_out)
    else:
        module.compute_beta_use = nn.LazyLinear(n_out)
        module.compute_beta_ign = nn.LazyLinear(n_out)


def betas(module: nn.Module, x_inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: -> beta_use, beta_ign, each [n_inp, n_out] or (n_inp = -1) [..., n, n_out] computed from x_inp."""
    if module.n_inp > 0:
        return module.beta_use, module.beta_ign
    return module.compute_beta_use(x_inp), module.compute_beta_ign(x_inp)
