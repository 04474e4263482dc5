"""
Heinsen's routing algorithms, written next to their equations.

  EfficientVectorRouting   "An Algorithm for Routing Vectors in Sequences" (Heinsen, 2022)
  DefinableVectorRouting   the same algorithm with user-defined A, F, G, S modules (2022)
  GenerativeMatrixRouting  "An Algorithm for Routing Capsules in All Domains" (Heinsen, 2019)

Parameter names, shapes and initialisations equal those of the authors' published checkpoints, so
those load with strict=True, and the forward computation is the papers' (float tolerance). Notation: `...` any leading (batch) dims, i inputs (n of them), j outputs
(n_out), d input features (d_inp), h output features (d_out).

Beyond the authors' code, every module here
  - accepts a boolean `mask` (True = that input is ignored by that output) broadcastable to
    [..., n, n_out], so each sample of a batch can have its own padding ([..., n, 1] masks a
    padding position for every output); an input masked for every output contributes nothing and
    gets zero credit, and the input scaling n^(-1/2) uses each sample's true (unmasked) length,
  - gives every output whose inputs are all masked a defined, finite result: its routed sum is
    zero (so x_out is the zero vector, also after layer normalisation), and a sample whose inputs
    are all masked gets zero outputs,
  - raises ValueError naming the argument with the expected and actual shape or dtype,
  - returns the dict also for n_iters=1 (S and pred entries None).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['EfficientVectorRouting', 'DefinableVectorRouting', 'GenerativeMatrixRouting', 'Routing']


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the modules: one clear ValueError per kind of bad input.
# ---------------------------------------------------------------------------------------------

def _check_sizes(n_inp, n_out):
    if not (n_inp == -1 or (isinstance(n_inp, int) and n_inp > 0)):
        raise ValueError(f"n_inp must be a positive int or -1 (variable length), got {n_inp!r}")
    if not (isinstance(n_out, int) and n_out >= 2):
        raise ValueError(f"n_out must be an int >= 2, got {n_out!r}")


def _check_n_iters(n_iters):
    if not (isinstance(n_iters, int) and n_iters >= 1):
        raise ValueError(f"n_iters must be an int >= 1, got {n_iters!r}")


def _check_sequence(name, x, n_inp, trailing, trailing_names):
    """x must be a floating tensor [..., n, *trailing] with n > 0 and n == n_inp when fixed
    (a None in trailing accepts any size)."""
    expected = f"[..., {'n' if n_inp == -1 else n_inp}, {', '.join(trailing_names)}]"
    if not torch.is_tensor(x) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor {expected}, got {got}")
    sizes = ', '.join('*' if size is None else str(size) for size in trailing)
    if x.dim() < 1 + len(trailing) or any(
            size is not None and x.shape[x.dim() - len(trailing) + k] != size for k, size in enumerate(trailing)):
        raise ValueError(f"{name} must have shape {expected} = [..., n, {sizes}], got {tuple(x.shape)}")
    n = x.shape[-1 - len(trailing)]
    if n == 0:
        raise ValueError(f"{name} is an empty sequence (n = 0, shape {tuple(x.shape)}): "
                         f"routing needs at least one input vector")
    if n_inp != -1 and n != n_inp:
        raise ValueError(f"{name} must have shape {expected} (this module was built with n_inp={n_inp}), "
                         f"got sequence length {n} in shape {tuple(x.shape)}")
    return n


def _check_dtype(name, x, param):
    """Outside autocast the input's dtype must equal the parameters' (no silent casts)."""
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name} has dtype {x.dtype} but the module's parameters are {param.dtype}: "
                         f"cast the input (x.to({param.dtype})) or the module (module.to({x.dtype})), "
                         f"or run inside torch.autocast")


def _check_mask(mask, batch_shape, n, n_out):
    """mask: bool, broadcastable to [*batch_shape, n, n_out]. Returns the expected full shape."""
    full = (*batch_shape, n, n_out)
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor broadcastable to {list(full)} "
                         f"(True = input ignored by that output), got {got}")
    try:
        ok = torch.broadcast_shapes(mask.shape, full) == torch.Size(full)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask must be broadcastable to [..., n, n_out] = {list(full)}, "
                         f"got shape {list(mask.shape)}")


def _input_scale(mask, batch_shape, n, dtype, device):
    """n^(-1/2) with n each sample's true length: inputs masked for every output don't count.
    Returns a float (no mask) or a tensor [..., 1, 1] that broadcasts against [..., n, d]."""
    if mask is None:
        return n ** -0.5
    is_input = ~mask.all(dim=-1)                                           # [..., n] (broadcastable)
    n_true = is_input.expand(*batch_shape, n).sum(dim=-1)                  # [...]
    return n_true.clamp(min=1).to(dtype).rsqrt()[..., None, None]         # [..., 1, 1]


def _masked_softmax(logits, mask):
    """softmax over j (last dim) with masked entries excluded and set to 0. A row whose entries
    are all masked gets all zeros (the authors' code gives NaN there). Finite fill, not -inf, so
    that neither the forward nor autograd's backward ever sees a 0/0."""
    if mask is None:
        return logits.softmax(dim=-1)
    logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1).masked_fill(mask, 0.0)


def _layer_norm(x):
    """N(.): layer normalisation over the last dim with no learned affine; identity when d == 1."""
    return x if x.shape[-1] == 1 else F.layer_norm(x, x.shape[-1:])


# ---------------------------------------------------------------------------------------------
# The shared E/D/M computation of the routings.
# ---------------------------------------------------------------------------------------------

def _initial_R(f_a, mask, n_out):
    """E-step of the first iteration: R = 1 / n_out over the unmasked outputs. -> [..., n, n_out]"""
    log_uniform = torch.full((), -math.log(n_out), dtype=f_a.dtype, device=f_a.device)
    return _masked_softmax(log_uniform.expand(*f_a.shape[:-1], n_out), mask)


def _credit(R, f_a, beta_use, beta_ign):
    """D-step and the credit of the M-step ("bang per bit"). f_a [..., n, 1|n_out], R and
    beta_* [..., n, n_out] -> D_use, D_ign, phi, each [..., n, n_out]."""
    D_use = f_a * R
    D_ign = f_a - D_use
    phi = beta_use * D_use - beta_ign * D_ign
    return D_use, D_ign, phi


# Rows of the [..., n, n_out] intermediates processed at once by the memory-efficient iteration:
# as many inputs as give about this many elements (4 MiB in float32, cache-sized), at least 256.
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(n, elements_per_row):
    rows = max(256, CHUNK_ELEMENTS // max(1, elements_per_row))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def _has_rows(t, n):
    """Tensors here broadcast against [..., n, n_out]; those with dim -2 of size n have one row per input."""
    return t is not None and t.dim() >= 2 and t.shape[-2] == n


def _rows(t, start, end, n):
    """t[..., start:end, :] when t has one row per input, else t itself (it broadcasts over inputs)."""
    return t[..., start:end, :] if _has_rows(t, n) else t


def _add_grad(total, grad_rows, t, start, end, n):
    """Adds the gradient of rows start:end into the gradient `total` of t (summing broadcast dims)."""
    if _has_rows(t, n):
        total[..., start:end, :] += grad_rows.sum_to_size(t[..., start:end, :].shape)
    else:
        total += grad_rows.sum_to_size(t.shape)


class _MemoryEfficientIteration(torch.autograd.Function):
    """One iteration's E-, D- and M-step of EfficientVectorRouting, returning the two sums that the
    M-step needs, without materialising the votes and without keeping the [..., n, n_out]
    intermediates for backward:

        phi_x[..., j, d] = sum_i phi[..., i, j] x[..., i, d]          phi_1[..., j] = sum_i phi[..., i, j]

    Inputs are processed in chunks of rows (CHUNK_ELEMENTS), so no full-size [..., n, n_out]
    temporary is alive at once except L = x @ pred^T (t > 0), the one tensor kept for backward. R, D
    and phi are recomputed from it, chunk by chunk, and the gradients are written out by hand:

        dphi  = x @ g_x^T + g_1              dbeta_use = dphi f_a R       dbeta_ign = dphi f_a (R - 1)
        df_a  = sum_j dphi ((beta_use + beta_ign) R - beta_ign)
        dR    = dphi f_a (beta_use + beta_ign)
        dS    = R (dR - sum_j dR R)                      (softmax over j)
        dZ    = dS sigmoid(-Z),  Z = L W_S + B_S         (S = logsigma(Z))
        dL    = dZ W_S,  dW_S = dZ L,  dB_S = dZ
        dx    = phi @ g_x + dL @ pred,  dpred = dL^T @ x
    """

    @staticmethod
    def forward(ctx, x, pred, f_a, beta_use, beta_ign, W_S, B_S, mask, n_out, diagnostics):
        # x [..., n, d]; pred [..., n_out, d] or None (t = 0); f_a [..., n, 1|n_out];
        # beta_*, W_S, B_S, mask: broadcastable to [..., n, n_out]
        n = x.shape[-2]
        phi_x, phi_1, L, parts = 0, 0, None, []
        for s, e in _row_chunks(n, x[..., 0, 0].numel() * n_out):
            x_c, f_a_c, bu_c, bi_c, mask_c = (_rows(t, s, e, n) for t in (x, f_a, beta_use, beta_ign, mask))
            if pred is None:
                S_c, R_c = None, _initial_R(f_a_c, mask_c, n_out)               # [..., c, n_out]
            else:
                L_c = x_c @ pred.transpose(-1, -2)                              # [..., c, n_out]
                if L is None:
                    L = L_c.new_empty(*L_c.shape[:-2], n, n_out)
                L[..., s:e, :] = L_c
                S_c = F.logsigmoid(L_c * _rows(W_S, s, e, n) + _rows(B_S, s, e, n))
                R_c = _masked_softmax(S_c, mask_c)
            D_use_c, D_ign_c, phi_c = _credit(R_c, f_a_c, bu_c, bi_c)
            phi_x = phi_x + phi_c.transpose(-1, -2) @ x_c                       # [..., n_out, d]
            phi_1 = phi_1 + phi_c.sum(dim=-2)                                   # [..., n_out]
            if diagnostics is not None:
                parts.append((S_c, R_c, D_use_c, D_ign_c, phi_c))
        if diagnostics is not None:
            for key, chunks in zip(('S', 'R', 'D_use', 'D_ign', 'phi'), zip(*parts)):
                diagnostics[key] = None if chunks[0] is None else torch.cat(chunks, dim=-2)
        ctx.save_for_backward(x, pred, f_a, beta_use, beta_ign, W_S, B_S, mask, L)
        ctx.n_out = n_out
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        return phi_x, phi_1

    @staticmethod
    def backward(ctx, g_x, g_1):
        # g_x [..., n_out, d], g_1 [..., n_out]
        x, pred, f_a, beta_use, beta_ign, W_S, B_S, mask, L = ctx.saved_tensors
        inputs = {'x': x, 'pred': pred, 'f_a': f_a, 'beta_use': beta_use, 'beta_ign': beta_ign,
                  'W_S': W_S, 'B_S': B_S}
        grads = {k: torch.zeros_like(t) if needed else None
                 for (k, t), needed in zip(inputs.items(), ctx.needs_input_grad)}
        n = x.shape[-2]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for s, e in _row_chunks(n, x[..., 0, 0].numel() * ctx.n_out):
                x_c, f_a_c, bu_c, bi_c, W_S_c, mask_c = (
                    _rows(t, s, e, n) for t in (x, f_a, beta_use, beta_ign, W_S, mask))
                if L is None:
                    R_c = _initial_R(f_a_c, mask_c, ctx.n_out)
                else:
                    L_c = L[..., s:e, :]
                    Z_c = L_c * W_S_c + _rows(B_S, s, e, n)                         # [..., c, n_out]
                    R_c = _masked_softmax(F.logsigmoid(Z_c), mask_c)
                phi_c = _credit(R_c, f_a_c, bu_c, bi_c)[2]                          # [..., c, n_out]
                # M-step: phi_x = phi^T x, phi_1 = sum_i phi
                dphi = x_c @ g_x.transpose(-1, -2) + g_1[..., None, :]              # [..., c, n_out]
                if grads['x'] is not None:
                    grads['x'][..., s:e, :] += phi_c @ g_x
                # D-step and credit: phi = f_a ((beta_use + beta_ign) R - beta_ign)
                f_a_dphi = f_a_c * dphi
                if grads['beta_use'] is not None:
                    _add_grad(grads['beta_use'], f_a_dphi * R_c, beta_use, s, e, n)
                if grads['beta_ign'] is not None:
                    _add_grad(grads['beta_ign'], f_a_dphi * (R_c - 1), beta_ign, s, e, n)
                if grads['f_a'] is not None:
                    _add_grad(grads['f_a'], dphi * ((bu_c + bi_c) * R_c - bi_c), f_a, s, e, n)
                if L is None:
                    continue
                # E-step: R = softmax_j(S), S = logsigma(Z), Z = L W_S + B_S, L = x pred^T
                dR = f_a_dphi * (bu_c + bi_c)
                dS = R_c * (dR - (dR * R_c).sum(dim=-1, keepdim=True))
                dZ = dS * torch.sigmoid(-Z_c)
                if grads['W_S'] is not None:
                    _add_grad(grads['W_S'], dZ * L_c, W_S, s, e, n)
                if grads['B_S'] is not None:
                    _add_grad(grads['B_S'], dZ, B_S, s, e, n)
                dL = dZ * W_S_c                                                     # [..., c, n_out]
                if grads['pred'] is not None:
                    grads['pred'] += dL.transpose(-1, -2) @ x_c                     # [..., n_out, d]
                if grads['x'] is not None:
                    grads['x'][..., s:e, :] += dL @ pred
        return (*grads.values(), None, None, None)


# ---------------------------------------------------------------------------------------------
# EfficientVectorRouting (2022)
# ---------------------------------------------------------------------------------------------

class EfficientVectorRouting(nn.Module):
    """Routes a sequence of n_inp vectors of size d_inp to n_out vectors of size d_out.

    Args:
        n_inp: number of input vectors, or -1 for variable-length sequences.
        n_out: number of output vectors (>= 2).
        d_inp, d_out: sizes of input and output vectors.
        n_iters: routing iterations (>= 1).
        normalize: layer-normalise the output vectors (no learned affine).
        memory_efficient: never materialise the votes V [..., n, n_out, d_out] and keep only one
            [..., n, n_out] tensor per iteration for backward (a custom autograd function
            recomputes the rest). False materialises V and uses plain autograd; both agree.
        return_dict: return a dict of the intermediates instead of x_out.

    Forward:
        x_inp [..., n, d_inp], mask (optional) bool broadcastable to [..., n, n_out]
        -> x_out [..., n_out, d_out], or the dict
           {a_inp, V, pred_x_inp, S, R, D_use, D_ign, phi, x_out} (V None when memory-efficient,
           pred_x_inp and S None when n_iters == 1; with memory_efficient the [..., n, n_out]
           entries are detached, for inspection; use memory_efficient=False to backprop through them).
    """

    def __init__(self, n_inp, n_out, d_inp, d_out, n_iters=2, normalize=True, memory_efficient=True,
                 return_dict=False):
        super().__init__()
        _check_sizes(n_inp, n_out)
        _check_n_iters(n_iters)
        self.n_inp, self.n_out, self.d_inp, self.d_out = n_inp, n_out, d_inp, d_out
        self.n_iters, self.normalize = n_iters, normalize
        self.memory_efficient, self.return_dict = memory_efficient, return_dict
        m = max(1, n_inp)
        self.W_A = nn.Parameter(torch.randn(m, d_inp) * 2 / d_inp ** 0.5)             # [m, d_inp]
        self.B_A = nn.Parameter(torch.zeros(m))                                      # [m]
        self.W_F1 = nn.Parameter(torch.randn(n_out, d_inp))                          # [n_out, d_inp]
        self.W_F2 = nn.Parameter(torch.randn(d_inp, d_out) * 2 / d_inp ** 0.5)        # [d_inp, d_out]
        self.B_F2 = nn.Parameter(torch.zeros(n_out, d_out))                          # [n_out, d_out]
        self.W_G1 = nn.Parameter(torch.randn(d_out, d_inp) / d_out ** 0.5)            # [d_out, d_inp]
        self.W_G2 = nn.Parameter(torch.randn(n_out, d_inp))                          # [n_out, d_inp]
        self.B_G2 = nn.Parameter(torch.zeros(n_out, d_inp))                          # [n_out, d_inp]
        self.W_S = nn.Parameter(torch.randn(m, n_out) / d_inp ** 0.5)                 # [m, n_out]
        self.B_S = nn.Parameter(torch.zeros(m, n_out))                               # [m, n_out]
        _init_betas(self, n_inp, n_out, d_inp)
        self.register_buffer('CONST_ones_over_n_out', torch.ones(n_out) / n_out)     # [n_out]

    def extra_repr(self):
        return (f"n_inp={self.n_inp}, n_out={self.n_out}, d_inp={self.d_inp}, d_out={self.d_out}, "
                f"n_iters={self.n_iters}, normalize={self.normalize}, "
                f"memory_efficient={self.memory_efficient}, return_dict={self.return_dict}")

    def forward(self, x_inp, mask=None):
        n = _check_sequence('x_inp', x_inp, self.n_inp, (self.d_inp,), ('d_inp',))
        _check_dtype('x_inp', x_inp, self.W_A)
        batch_shape = x_inp.shape[:-2]
        if mask is not None:
            _check_mask(mask, batch_shape, n, self.n_out)

        # 1. beta_use, beta_ign: [n_inp, n_out] parameters, or [..., n, n_out] from x_inp
        beta_use, beta_ign = _betas(self, x_inp)
        # 2. xs = x_inp n^(-1/2), with n each sample's true length; never materialised, the scale
        #    is applied to the [..., n] and [..., n_out, d] sums below instead.
        scale = _input_scale(mask, batch_shape, n, self.W_A.dtype, x_inp.device)   # float or [..., 1, 1]
        # 3. a_inp[..., i] = sum_d xs[..., i, d] W_A[i, d] + B_A[i]
        if self.n_inp == -1:
            x_dot_W_A = x_inp @ self.W_A[0]                                         # [..., n]
        else:
            x_dot_W_A = torch.einsum('...id,id->...i', x_inp, self.W_A)             # [..., n]
        a_inp = x_dot_W_A * _squeeze_last(scale) + self.B_A                         # [..., n]
        # 4. f_a = sigma(a_inp), 0 for masked (input, output) pairs
        f_a = torch.sigmoid(a_inp)[..., None]                                       # [..., n, 1]
        if mask is not None:
            f_a = f_a.masked_fill(mask, 0.0)                                        # [..., n, n_out]

        V = None
        if not self.memory_efficient:
            # votes V[..., i, j, h] = sum_d xs[..., i, d] W_F1[j, d] W_F2[d, h] + B_F2[j, h]
            xs = x_inp * scale                                                      # [..., n, d_inp]
            V = torch.einsum('...id,jd,dh->...ijh', xs, self.W_F1, self.W_F2) + self.B_F2  # [..., n, n_out, d_out]

        pred = S = None
        for t in range(self.n_iters):
            if t > 0:
                # E-step: pred[..., j, d] = sum_h N(x_out)[..., j, h] W_G1[h, d] W_G2[j, d] + B_G2[j, d]
                pred = (_layer_norm(x_out) @ self.W_G1) * self.W_G2 + self.B_G2     # [..., n_out, d_inp]
            if self.memory_efficient:
                diagnostics = {} if (self.return_dict and t == self.n_iters - 1) else None
                phi_x, phi_1 = _MemoryEfficientIteration.apply(
                    x_inp, pred, f_a, beta_use, beta_ign, self.W_S, self.B_S, mask, self.n_out, diagnostics)
                # M-step: x_out[..., j, h] = sum_d (sum_i phi x)[..., j, d] n^(-1/2) W_F1[j, d] W_F2[d, h]
                #                            + (sum_i phi)[..., j] B_F2[j, h]
                x_out = ((phi_x * scale) * self.W_F1) @ self.W_F2 + phi_1[..., None] * self.B_F2
            else:
                # E-step: S[..., i, j] = logsigma((sum_d x_inp[..., i, d] pred[..., j, d]) W_S[i, j] + B_S[i, j])
                S = None if pred is None else F.logsigmoid(
                    torch.einsum('...id,...jd->...ij', x_inp, pred) * self.W_S + self.B_S)
                R = _initial_R(f_a, mask, self.n_out) if S is None else _masked_softmax(S, mask)
                D_use, D_ign, phi = _credit(R, f_a, beta_use, beta_ign)             # [..., n, n_out]
                # M-step: x_out[..., j, h] = sum_i phi[..., i, j] V[..., i, j, h]
                x_out = torch.einsum('...ij,...ijh->...jh', phi, V)                  # [..., n_out, d_out]

        if self.normalize:
            x_out = _layer_norm(x_out)                                              # [..., n_out, d_out]
        if not self.return_dict:
            return x_out
        if self.memory_efficient:
            S, R, D_use, D_ign, phi = (diagnostics[k] for k in ('S', 'R', 'D_use', 'D_ign', 'phi'))
        return {'a_inp': a_inp, 'V': V, 'pred_x_inp': pred, 'S': S, 'R': R, 'D_use': D_use,
                'D_ign': D_ign, 'phi': phi, 'x_out': x_out}


def _squeeze_last(scale):
    """[..., 1, 1] -> [..., 1] (to scale [..., n] tensors); floats pass through."""
    return scale[..., 0] if torch.is_tensor(scale) else scale


def _init_betas(module, n_inp, n_out, d_inp):
    """beta_use, beta_ign: [n_inp, n_out] standard normal parameters, or (n_inp = -1) two
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


def _betas(module, x_inp):
    """-> beta_use, beta_ign, each [n_inp, n_out] or [..., n, n_out]."""
    if module.n_inp > 0:
        return module.beta_use, module.beta_ign
    return module.compute_beta_use(x_inp), module.compute_beta_ign(x_inp)


# ---------------------------------------------------------------------------------------------
# DefinableVectorRouting (2022)
# ---------------------------------------------------------------------------------------------

class DefinableVectorRouting(nn.Module):
    """The 2022 algorithm with user-defined modules:

        a_inp = A(x_inp) -> [..., n]           V = F(x_inp) -> [..., n, n_out, d_out]
        pred = G(x_out)                         S = S(x_inp, pred) -> [..., n, n_out]

    No input scaling and no final normalisation; x_out = sum_i phi V.

    Args: A, F, G, S (modules), n_inp (or -1), n_out, n_iters, return_dict, and d_inp: the size of
    the input vectors, needed only for n_inp = -1 (the beta layers read x_inp). When it is not
    given it is inferred from A's first nn.Linear, else the beta layers are nn.LazyLinear and learn
    it on the first forward (or when a state dict is loaded).
    Forward: x_inp [..., n, d_inp], mask (optional) -> x_out [..., n_out, d_out] or the dict.
    """

    def __init__(self, A, F, G, S, n_inp, n_out, n_iters=2, return_dict=False, d_inp=None):
        super().__init__()
        _check_sizes(n_inp, n_out)
        _check_n_iters(n_iters)
        self.A, self.F, self.G, self.S = A, F, G, S
        self.n_inp, self.n_out, self.n_iters, self.return_dict = n_inp, n_out, n_iters, return_dict
        if n_inp == -1 and d_inp is None:
            first_linear = next((m for m in A.modules() if isinstance(m, nn.Linear)
                                 and not isinstance(m, nn.modules.lazy.LazyModuleMixin)), None)
            d_inp = None if first_linear is None else first_linear.in_features
        self.d_inp = d_inp
        _init_betas(self, n_inp, n_out, d_inp)
        self.register_buffer('CONST_ones_over_n_out', torch.ones(n_out) / n_out)   # [n_out]

    def forward(self, x_inp, mask=None):
        n = _check_sequence('x_inp', x_inp, self.n_inp, (self.d_inp,), ('d_inp',))
        batch_shape = x_inp.shape[:-2]
        if mask is not None:
            _check_mask(mask, batch_shape, n, self.n_out)

        beta_use, beta_ign = _betas(self, x_inp)                                    # [..., n, n_out]
        a_inp = self.A(x_inp).view(*batch_shape, n)                                 # [..., n]
        V = self.F(x_inp).view(*batch_shape, n, self.n_out, -1)                     # [..., n, n_out, d_out]
        f_a = torch.sigmoid(a_inp)[..., None]                                       # [..., n, 1]
        if mask is not None:
            f_a = f_a.masked_fill(mask, 0.0)                                        # [..., n, n_out]

        pred = S = None
        for t in range(self.n_iters):
            if t > 0:
                pred = self.G(x_out)                                                # [..., n_out, d_pred]
                S = self.S(x_inp, pred)                                             # [..., n, n_out]
            R = _initial_R(f_a, mask, self.n_out) if S is None else _masked_softmax(S, mask)
            D_use, D_ign, phi = _credit(R, f_a, beta_use, beta_ign)                 # [..., n, n_out]
            x_out = torch.einsum('...ij,...ijh->...jh', phi, V)                    # [..., n_out, d_out]

        if not self.return_dict:
            return x_out
        return {'a_inp': a_inp, 'V': V, 'pred_x_inp': pred, 'S': S, 'R': R, 'D_use': D_use,
                'D_ign': D_ign, 'phi': phi, 'x_out': x_out}


# ---------------------------------------------------------------------------------------------
# GenerativeMatrixRouting (2019), and Routing: the same module under the 2019 library's name and signature
# ---------------------------------------------------------------------------------------------

class GenerativeMatrixRouting(nn.Module):
    """Routes n_inp capsules (score a, pose matrix mu of shape d_cov x d_inp) to n_out capsules
    (score, pose d_cov x d_out, variance d_cov x d_out), fitting a generative model of the votes.

    Args:
        n_inp: number of input capsules, or -1 for variable length.
        n_out: number of output capsules (>= 2), or -1 for a number given to forward (variable
            n_out): one set of per-output parameters is shared by every output, and output j's
            bias is B[i, 0] + B_brk[0] t_j with t = linspace(-1, 1, n_out), which breaks the symmetry.
        d_cov, d_inp, d_out: the poses are d_cov x d_inp matrices in, d_cov x d_out out.
        n_iters (>= 1); single_beta: beta_use and beta_ign are the same parameter;
        p_model: 'gaussian' or 'skm' (soft k-means); eps: small constant of the M-step (> 0);
        return_dict: return a dict of every intermediate instead of the tuple.

    Forward: a_inp [..., n], mu_inp [..., n, d_cov, d_inp], mask (optional, bool broadcastable
    to [..., n, n_out], True = that input is ignored by that output), n_out (variable n_out only;
    default n) -> (a_out [..., n_out], mu_out [..., n_out, d_cov, d_out], sig2_out [same]), or a
    dict with those and the intermediates, including phi = beta_use D_use - beta_ign D_ign
    [..., n, n_out] (a_out = sum_i phi: the credit). An output with all inputs masked gets a_out 0,
    mu_out 0 and sig2_out eps; inputs masked for every output never reach the outputs, whatever
    their values (NaN included).
    """

    def __init__(self, n_inp, n_out, d_cov, d_inp, d_out, n_iters=3, single_beta=False,
                 p_model='gaussian', eps=1e-5, return_dict=False):
        super().__init__()
        _check_sizes(n_inp, 2 if n_out == -1 else n_out)
        _check_n_iters(n_iters)
        if p_model not in ('gaussian', 'skm'):
            raise ValueError(f"p_model must be 'gaussian' or 'skm', got {p_model!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.n_inp, self.n_out, self.d_cov, self.d_inp, self.d_out = n_inp, n_out, d_cov, d_inp, d_out
        self.n_iters, self.single_beta, self.p_model, self.eps = n_iters, single_beta, p_model, eps
        self.return_dict = return_dict
        m, k = max(1, n_inp), max(1, n_out)                   # k = 1: one set shared by every output
        self.W = nn.Parameter(torch.randn(m, k, d_inp, d_out) / d_inp)               # [m, k, d_inp, d_out]
        self.B = nn.Parameter(torch.zeros(m, k, d_cov, d_out))                       # [m, k, d_cov, d_out]
        if n_out == -1:
            self.B_brk = nn.Parameter(torch.zeros(1, d_cov, d_out))                  # [1, d_cov, d_out]
        self.beta_use = nn.Parameter(torch.zeros(m, k))                              # [m, k]
        self.beta_ign = self.beta_use if single_beta else nn.Parameter(torch.zeros(m, k))
        self.register_buffer('CONST_one', torch.tensor(1.0))                         # []

    def extra_repr(self):
        return (f"n_inp={self.n_inp}, n_out={self.n_out}, d_cov={self.d_cov}, d_inp={self.d_inp}, "
                f"d_out={self.d_out}, n_iters={self.n_iters}, single_beta={self.single_beta}, "
                f"p_model={self.p_model!r}, eps={self.eps}, return_dict={self.return_dict}")

    def forward(self, a_inp, mu_inp, mask=None, n_out=None):
        out = self._route(a_inp, mu_inp, mask, n_out)
        return out if self.return_dict else (out['a_out'], out['mu_out'], out['sig2_out'])

    def _biases(self, n_out):
        """B [m, n_out, d_cov, d_out]: the parameter, or (variable n_out) B[i, 0] + B_brk[0] t_j."""
        if self.n_out != -1:
            return self.B
        t = torch.linspace(-1, 1, n_out, dtype=self.B.dtype, device=self.B.device)  # [n_out]
        return self.B + self.B_brk * t[:, None, None]                                # [m, n_out, d_cov, d_out]

    def _route(self, a_inp, mu_inp, mask, n_out):
        """The EM loop (routing.md): -> dict of every intermediate."""
        n = _check_sequence('mu_inp', mu_inp, self.n_inp, (self.d_cov, self.d_inp), ('d_cov', 'd_inp'))
        _check_dtype('mu_inp', mu_inp, self.W)
        batch_shape = mu_inp.shape[:-3]
        if not torch.is_tensor(a_inp) or tuple(a_inp.shape) != (*batch_shape, n):
            got = tuple(a_inp.shape) if torch.is_tensor(a_inp) else type(a_inp).__name__
            raise ValueError(f"a_inp must have shape [..., n] = {[*batch_shape, n]} to match "
                             f"mu_inp {tuple(mu_inp.shape)}, got {got}")
        if a_inp.dtype != mu_inp.dtype:
            raise ValueError(f"a_inp has dtype {a_inp.dtype} but mu_inp has {mu_inp.dtype}: give both the same "
                             f"floating-point dtype")
        if self.n_out == -1:
            n_out = n if n_out is None else n_out
            if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
                raise ValueError(f"n_out must be a positive int (the number of output capsules), got {n_out!r}")
        elif n_out is not None:
            raise ValueError(f"n_out={n_out!r} given to forward, but this module was built with n_out={self.n_out}: "
                             f"only a module built with n_out=-1 (variable n_out) takes n_out in forward")
        else:
            n_out = self.n_out
        if mask is not None:
            _check_mask(mask, batch_shape, n, n_out)
            is_ignored = mask.all(dim=-1)                                          # [..., n] (broadcastable)
            a_inp = a_inp.masked_fill(is_ignored, 0.0)                              # masked inputs' values never
            mu_inp = mu_inp.masked_fill(is_ignored[..., None, None], 0.0)           # reach a sum, NaN included

        # 1. votes V[..., i, j, c, h] = sum_d mu_inp[..., i, c, d] W[i, j, d, h] + B[i, j, c, h]
        #    (with n_inp = -1 one W for every input, never expanded; with variable n_out, W's single
        #    output slot broadcasts over the n_out outputs)
        B = self._biases(n_out)                                                     # [m, n_out, d_cov, d_out]
        if self.n_inp == -1:
            V = torch.einsum('...icd,jdh->...ijch', mu_inp, self.W[0]) + B[0]      # [..., n, n_out, d_cov, d_out]
        else:
            V = torch.einsum('...icd,ijdh->...ijch', mu_inp, self.W) + B           # [..., n, n_out, d_cov, d_out]
        # 2. f_a = sigma(a_inp), 0 for masked pairs
        f_a = torch.sigmoid(a_inp)[..., None]                                       # [..., n, 1]
        if mask is not None:
            f_a = f_a.masked_fill(mask, 0.0)                                        # [..., n, n_out]

        log_p = a_out = mu_out = sig2_out = None
        for t in range(self.n_iters):
            # E-step
            if t == 0:
                R = _initial_R(f_a, mask, n_out)                                    # [..., n, n_out]
            else:
                sq_dist = (V - mu_out[..., None, :, :, :]) ** 2                    # [..., n, n_out, d_cov, d_out]
                if self.p_model == 'gaussian':
                    log_p = (-(sq_dist / (2 * sig2_out[..., None, :, :, :])).sum(dim=(-2, -1))
                             - 0.5 * torch.log(sig2_out).sum(dim=(-2, -1))[..., None, :])   # [..., n, n_out]
                else:
                    log_p = torch.log_softmax(-sq_dist.sum(dim=(-2, -1)), dim=-1)          # [..., n, n_out]
                R = _masked_softmax(F.logsigmoid(a_out)[..., None, :] + log_p, mask)       # [..., n, n_out]
            # D-step, and the M-step's scores: a_out = sum_i (beta_use D_use - beta_ign D_ign)
            D_use, D_ign, phi = _credit(R, f_a, self.beta_use, self.beta_ign)       # [..., n, n_out]
            a_out = phi.sum(dim=-2)                                                 # [..., n_out]
            w = D_use / (D_use.sum(dim=-2, keepdim=True) + self.eps)                # [..., n, n_out]
            mu_out = torch.einsum('...ij,...ijch->...jch', w, V)                    # [..., n_out, d_cov, d_out]
            sig2_out = torch.einsum('...ij,...ijch->...jch', w, (V - mu_out[..., None, :, :, :]) ** 2) + self.eps

        return {'a_inp': a_inp, 'mu_inp': mu_inp, 'V': V, 'log_p': log_p, 'R': R, 'D_use': D_use,
                'D_ign': D_ign, 'phi': phi, 'a_out': a_out, 'mu_out': mu_out, 'sig2_out': sig2_out}


class Routing(GenerativeMatrixRouting):
    """GenerativeMatrixRouting under the 2019 library's name and signature, so that its users' code and
    published state dicts work unchanged (the capsule shape first; n_inp, n_out optional, -1 = variable):

        detect_objs = Routing(d_cov=4, d_inp=4, d_out=4, n_inp=100, n_out=10)
        a_out, mu_out, sig2_out = detect_objs(a_inp, mu_inp)            # [100], [100, 4, 4] -> [10], [10, 4, 4] x 2
        predict = Routing(d_cov=1, d_inp=256, d_out=64, n_inp=10)       # variable n_out
        a_out, mu_out, sig2_out, R = predict(a_inp, mu_inp, return_R=True, n_out=n)

    forward(a_inp [..., n], mu_inp [..., n, d_cov, d_inp], return_R=False, n_out=None, mask=None)
    -> (a_out [..., n_out], mu_out [..., n_out, d_cov, d_out], sig2_out [same]) and, with return_R,
    R [..., n, n_out] (the last E-step's routing probabilities) as a fourth element. n_out is given
    to forward only when the module was built with n_out=-1 (default: n_out = n). return_dict=True
    (ours, as GenerativeMatrixRouting's) returns the dict of intermediates instead.
    State dict: W, B, (B_brk when n_out is variable), beta_use, beta_ign, CONST_one.
    """

    def __init__(self, d_cov, d_inp, d_out, n_inp=-1, n_out=-1, n_iters=3, single_beta=False,
                 p_model='gaussian', eps=1e-5, return_dict=False):
        super().__init__(n_inp, n_out, d_cov, d_inp, d_out, n_iters=n_iters, single_beta=single_beta,
                         p_model=p_model, eps=eps, return_dict=return_dict)

    def forward(self, a_inp, mu_inp, return_R=False, n_out=None, mask=None):
        out = self._route(a_inp, mu_inp, mask, n_out)
        if self.return_dict:
            return out
        result = (out['a_out'], out['mu_out'], out['sig2_out'])
        return (*result, out['R']) if return_R else result
