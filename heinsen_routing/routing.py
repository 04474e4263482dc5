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
    padding position for every output); an input masked for every output contributes nothing
    and gets zero credit (in the vector routings whatever its value, NaN and Inf included), and
    the input scaling n^(-1/2) uses each sample's true (unmasked) length,
  - gives every output whose inputs are all masked a defined, finite result: its routed sum is
    zero (so x_out is the zero vector, also after layer normalisation), and a sample whose inputs
    are all masked gets zero outputs,
  - raises ValueError naming the argument with the expected and actual shape or dtype,
  - returns the dict also for n_iters=1 (S and pred entries None).
"""
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['EfficientVectorRouting', 'DefinableVectorRouting', 'GenerativeMatrixRouting', 'Routing']


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the modules: one clear ValueError per kind of bad input.
# ---------------------------------------------------------------------------------------------

def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sizes(n_inp, n_out):
    if not (_is_int(n_inp) and (n_inp == -1 or n_inp > 0)):
        raise ValueError(f"n_inp must be a positive int or -1 (variable length), got {n_inp!r}")
    if not (_is_int(n_out) and n_out >= 2):
        raise ValueError(f"n_out must be an int >= 2, got {n_out!r}")


def _check_n_iters(n_iters):
    if not (_is_int(n_iters) and n_iters >= 1):
        raise ValueError(f"n_iters must be an int >= 1, got {n_iters!r}")


def _check_dims(**named_sizes):
    """Each keyword (a size: d_inp=..., d_out=..., d_cov=...) must be a positive int (bool is not)."""
    for name, size in named_sizes.items():
        if not (_is_int(size) and size > 0):
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def _check_eps(eps):
    """eps (a small constant added for stability) must be a positive finite number."""
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and 0 < eps < math.inf):
        raise ValueError(f"eps must be a positive float, got {eps!r}")


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
    """Outside autocast the input's dtype must equal the parameters' (no silent casts). Autocast
    casts float32 to its lower precision but leaves float64 alone, so float64 input to a module of
    lower precision is an error there too."""
    autocast = torch.is_autocast_enabled(x.device.type)
    if x.dtype != param.dtype and not autocast:
        raise ValueError(f"{name} has dtype {x.dtype} but the module's parameters are {param.dtype}: "
                         f"cast the input (x.to({param.dtype})) or the module (module.to({x.dtype})), "
                         f"or run inside torch.autocast")
    if autocast and x.dtype == torch.float64 and param.dtype != torch.float64:
        low = torch.get_autocast_dtype(x.device.type)
        raise ValueError(f"{name} has dtype torch.float64 inside torch.autocast({x.device.type!r}, dtype={low}), "
                         f"which does not cast float64: expected float32, float16 or bfloat16 input "
                         f"(x.float()) under autocast, or a float64 module (module.double()) outside it")


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


def _without_masked_inputs(x, mask):
    """x [..., n, d] with the inputs masked for every output replaced by zeros: they contribute
    nothing whatever their values (0 * NaN is NaN, so they must not enter any sum). mask: None or
    bool broadcastable to [..., n, n_out]."""
    return x if mask is None else x.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)


def _predict(x_out, W_G1, W_G2, B_G2):
    """E-step prediction: pred[..., j, d] = sum_h N(x_out)[..., j, h] W_G1[h, d] W_G2[j, d] + B_G2[j, d]."""
    return (_layer_norm(x_out) @ W_G1) * W_G2 + B_G2                                # [..., n_out, d_inp]


def _x_out_from_sums(phi_x, phi_1, scale, W_F1, W_F2, B_F2):
    """M-step of EfficientVectorRouting from the sums phi_x = sum_i phi x, phi_1 = sum_i phi:
    x_out[..., j, h] = sum_d phi_x[..., j, d] n^(-1/2) W_F1[j, d] W_F2[d, h] + phi_1[..., j] B_F2[j, h]
    (= sum_i phi[..., i, j] V[..., i, j, h] without the votes V)."""
    return ((phi_x * scale) * W_F1) @ W_F2 + phi_1[..., None] * B_F2                # [..., n_out, d_out]


# ---------------------------------------------------------------------------------------------
# memory_efficient=True: the routing streamed over chunks of inputs.
# ---------------------------------------------------------------------------------------------

# Default of EfficientVectorRouting(chunk_elements=...): a chunk holds the inputs whose rows of
# [d_inp + n_out] elements, over the whole batch, make about this many (8 MiB in float32).
CHUNK_ELEMENTS = 1 << 21


def _chunks(n, batch_numel, row_width, chunk_elements):
    """[(start, end), ...] covering 0..n: rows * batch_numel * row_width ~ chunk_elements, >= 1 row."""
    rows = max(1, chunk_elements // max(1, batch_numel * row_width))
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


# The parameters of EfficientVectorRouting that a _StreamedPass reads, in its argument order.
# beta_use, beta_ign: the [n_inp, n_out] parameters, or (n_inp = -1) compute_beta_*.weight [n_out, d_inp]
# with compute_beta_*.bias in beta_*_bias (None for n_inp > 0).
_STREAMED_PARAMS = ('W_A', 'B_A', 'beta_use', 'beta_use_bias', 'beta_ign', 'beta_ign_bias', 'W_S', 'B_S')


def _x_products(p, per_input, pred=None, G=None, uniform_R=False):
    """The [k, d_inp] blocks W that multiply every input, y = x W^T, stacked for one GEMM per chunk:
    G (backward: dphi = x G^T + g_1), pred (t > 0: L = x pred^T) and, when the parameters are shared
    by all inputs (n_inp = -1), the beta layers' weights (beta = x W^T + bias) and W_A (x W_A^T).
    With uniform_R (t = 0 and R = 1/n_out wherever f_a > 0) phi = f_a (beta_use R - beta_ign (1 - R))
    needs only beta_0 = (beta_use - (n_out - 1) beta_ign) / n_out, one block instead of two.
    -> (names, sizes, W [..., K, d_inp]); x_c @ W^T split by sizes gives the products by name."""
    blocks = {'G': G, 'pred': pred}
    if not per_input and uniform_R:
        blocks.update(beta_0=_beta_0(p['beta_use'], p['beta_ign']), W_A=p['W_A'])
    elif not per_input:
        blocks.update(beta_use=p['beta_use'], beta_ign=p['beta_ign'], W_A=p['W_A'])
    blocks = {name: w for name, w in blocks.items() if w is not None}
    if not blocks:
        return [], [], None
    batch = torch.broadcast_shapes(*(w.shape[:-2] for w in blocks.values()))
    W = torch.cat([w.expand(*batch, *w.shape[-2:]) for w in blocks.values()], dim=-2)   # [..., K, d_inp]
    return list(blocks), [w.shape[-2] for w in blocks.values()], W


def _chunk(x, mask, scale, p, t, n_out, per_input, products, s, e):
    """Steps 1 and 3-5 of the spec (betas, a_inp, f_a, E-step, D-step, credit) for the inputs s:e
    in iteration t, from the input and the parameters. -> dict of [..., c, *] tensors."""
    n = x.shape[-2]
    x_c, mask_c = x[..., s:e, :], _rows(mask, s, e, n)                          # [..., c, d]
    x_c = _without_masked_inputs(x_c, mask_c)
    names, sizes, W = products
    Y = {} if W is None else dict(zip(names, (x_c @ W.transpose(-1, -2)).split(sizes, dim=-1)))  # [..., c, k]
    # 3. a_inp[..., i] = sum_d xs[..., i, d] W_A[i, d] + B_A[i],  xs = x n^(-1/2)
    if per_input:
        x_W_A, B_A = torch.einsum('...id,id->...i', x_c, p['W_A'][s:e]), p['B_A'][s:e]   # [..., c], [c]
    else:
        x_W_A, B_A = Y['W_A'][..., 0], p['B_A']                                      # [..., c], [1]
    a = x_W_A * _squeeze_last(scale) + B_A                                        # [..., c]
    # 4. f_a = sigma(a_inp), 0 for masked (input, output) pairs
    sigma_a = torch.sigmoid(a)                                                    # [..., c]
    f_a = sigma_a[..., None] if mask_c is None else sigma_a[..., None].masked_fill(mask_c, 0.0)  # [..., c, 1|n_out]
    # 1. beta_use, beta_ign: rows of the parameters, or compute_beta_*(x) (or only beta_0, see _x_products)
    beta_use = beta_ign = beta_0 = None
    if per_input:
        beta_use, beta_ign = p['beta_use'][s:e], p['beta_ign'][s:e]               # [c, n_out]
    elif 'beta_0' in Y:
        beta_0 = Y['beta_0'] + _beta_0(p['beta_use_bias'], p['beta_ign_bias'])    # [..., c, n_out]
    else:
        beta_use, beta_ign = Y['beta_use'] + p['beta_use_bias'], Y['beta_ign'] + p['beta_ign_bias']  # [..., c, n_out]
    # 5. E-step: R = 1/n_out (t = 0), or R = softmax_j(S), S = logsigma(Z), Z = L W_S + B_S, L = x pred^T
    L = Z = S = None
    if t == 0:
        R = _initial_R(f_a, mask_c, n_out)                                        # [..., c, n_out]
    else:
        L = Y['pred']                                                              # [..., c, n_out]
        Z = L * _rows(p['W_S'], s, e, n) + _rows(p['B_S'], s, e, n)
        S = F.logsigmoid(Z)
        R = _masked_softmax(S, mask_c)
    #    D-step and credit: D_use = f_a R, D_ign = f_a - D_use, phi = beta_use D_use - beta_ign D_ign
    if beta_0 is None:
        D_use, D_ign, phi = _credit(R, f_a, beta_use, beta_ign)                   # [..., c, n_out]
    else:
        D_use, D_ign, phi = f_a * R, f_a - f_a * R, f_a * beta_0                  # (R = 1/n_out where f_a > 0)
    return dict(x=x_c, mask=mask_c, Y=Y, a=a, sigma_a=sigma_a, f_a=f_a, beta_use=beta_use, beta_ign=beta_ign,
                beta_0=beta_0, L=L, Z=Z, S=S, R=R, D_use=D_use, D_ign=D_ign, phi=phi)


def _beta_0(beta_use, beta_ign):
    """(beta_use - (n_out - 1) beta_ign) / n_out, for weights [n_out, d_inp] or biases [n_out]:
    with R = 1/n_out, beta_use R - beta_ign (1 - R) is linear in x with these weights and bias."""
    n_out = beta_use.shape[0]
    return (beta_use - (n_out - 1) * beta_ign) / n_out


def _gradient_targets(name, n_out):
    """[(parameter, factor)]: where the gradient of a product's weight block goes (beta_0 is a
    combination of the beta layers' weights, see _beta_0)."""
    if name == 'beta_0':
        return [('beta_use', 1 / n_out), ('beta_ign', -(n_out - 1) / n_out)]
    return [(name, 1.0)]


def _uniform_initial_R(mask):
    """Whether the first iteration's R is 1/n_out for every input that counts: no mask, or one that
    masks whole inputs only (their f_a is 0, so their R does not matter)."""
    return mask is None or bool((mask.any(dim=-1) == mask.all(dim=-1)).all())


class _StreamedPass(torch.autograd.Function):
    """One iteration of steps 1 and 3-5 of EfficientVectorRouting (memory_efficient=True): a pass over
    chunks of inputs whose memory above its input, parameters and their gradients does not grow with
    n. From x, the iteration's pred (None at t = 0) and the parameters it recomputes chunk by chunk
    everything of size [..., n, *] (_chunk: the betas, a_inp, f_a, the logits L = x pred^T, R, D,
    phi) and returns only the two sums the M-step needs,

        phi_x[..., j, d] = sum_i phi[..., i, j] x[..., i, d]          phi_1[..., j] = sum_i phi[..., i, j]

    The small steps between passes (x_out from the sums, the next pred from x_out: [..., n_out, *]
    tensors) run on plain autograd outside, so autograd keeps their activations and backward never
    recomputes them. Saved for backward: x, the mask, pred and the parameters. Backward gets
    (G, g_1) = the gradient of (phi_x, phi_1) and makes one pass over chunks that recomputes the
    chunk and writes, in place into one buffer per input or parameter, the gradients (the input's
    buffer is shared by the passes of one forward, `x_grad`: autograd runs their backwards from the
    last iteration to the first, each adds into it, and only the first iteration's returns it, so
    no second input-sized gradient is ever allocated)

        dphi  = x G^T + g_1                                           (M-step sums)
        dx   += phi G
        df_a  = dphi ((beta_use + beta_ign) R - beta_ign)             (phi = f_a ((beta_use + beta_ign) R - beta_ign))
        dbeta_use = dphi f_a R            dbeta_ign = dphi f_a (R - 1)
        da    = sum_j df_a (unmasked) sigma(a) (1 - sigma(a))         (f_a = sigma(a), masked pairs 0)
        dR    = dphi f_a (beta_use + beta_ign)
        dS    = R (dR - sum_j dR R)                                   (R = softmax_j S)
        dZ    = dS sigma(-Z)                                          (S = logsigma Z)
        dW_S  = dZ L,   dB_S = dZ,   dL = dZ W_S                      (Z = L W_S + B_S)
        dpred = dL^T x, dx += dL pred                                 (L = x pred^T)
        and for each block W of a product y = x W^T (the beta layers and W_A when n_inp = -1):
        dW += dy^T x, dx += dy W, with dy = dbeta_* (and their biases sum it), da n^(-1/2) for W_A;
        with per-input parameters (n_inp > 0) their rows s:e get dbeta_*, dW_A = da n^(-1/2) x, dB_A = da.

    All products of x with [k, d_inp] blocks share one GEMM per chunk (_x_products), and so do the
    gradients that flow back through them. dpred is returned as the gradient of the input pred:
    autograd carries it through the small steps to (G, g_1) of the pass before.
    """

    @staticmethod
    def forward(ctx, cfg, mask, scale, diagnostics, x_grad, x, pred, *params):
        # cfg: (t, n_iters, n_out, per_input, chunk_elements, uniform_R); mask: None or bool broadcastable to
        # [..., n, n_out]; scale: n^(-1/2), float or [..., 1, 1]; diagnostics: None or a dict to fill
        # with this pass's intermediates; x_grad: a dict shared by the passes of one forward (holds the
        # input's gradient buffer in backward); x [..., n, d_inp]; pred [..., n_out, d_inp] or None
        # (t = 0); params: _STREAMED_PARAMS
        p = dict(zip(_STREAMED_PARAMS, params))
        t, n_iters, n_out, per_input, chunk_elements, uniform_R = cfg
        batch, (n, d) = x.shape[:-2], x.shape[-2:]
        products = _x_products(p, per_input, pred=pred, uniform_R=uniform_R and t == 0)
        phi_x = x.new_zeros(*batch, n_out, d, dtype=p['W_A'].dtype)                  # [..., n_out, d]
        phi_1 = x.new_zeros(*batch, n_out, dtype=p['W_A'].dtype)                     # [..., n_out]
        parts = []
        for s, e in _chunks(n, batch.numel(), d + n_out, chunk_elements):
            c = _chunk(x, mask, scale, p, t, n_out, per_input, products, s, e)
            phi_x += c['phi'].transpose(-1, -2) @ c['x']
            phi_1 += c['phi'].sum(dim=-2)
            if diagnostics is not None:
                parts.append([c[k] for k in ('a', 'S', 'R', 'D_use', 'D_ign', 'phi')])
        if diagnostics is not None:
            for k, chunk_list in zip(('a_inp', 'S', 'R', 'D_use', 'D_ign', 'phi'), zip(*parts)):
                dim = -1 if k == 'a_inp' else -2
                diagnostics[k] = None if chunk_list[0] is None else torch.cat(chunk_list, dim=dim)
        ctx.cfg, ctx.x_grad = cfg, x_grad
        ctx.scale = None if torch.is_tensor(scale) else scale
        ctx.save_for_backward(x, mask, scale if torch.is_tensor(scale) else None, pred, *params)
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        return phi_x, phi_1

    @staticmethod
    def backward(ctx, G, g_1):
        double_backward = torch.is_grad_enabled()                # create_graph=True
        x, mask, scale, pred, *params = ctx.saved_tensors
        scale = ctx.scale if scale is None else scale
        p = dict(zip(_STREAMED_PARAMS, params))
        t, n_iters, n_out, per_input, chunk_elements, uniform_R = ctx.cfg
        batch, (n, d) = x.shape[:-2], x.shape[-2:]
        # One gradient buffer per input and parameter, written in place chunk by chunk.
        needed = dict(zip(('x', 'pred', *_STREAMED_PARAMS), ctx.needs_input_grad[5:]))
        grads = {k: torch.zeros_like(v) for k, v in p.items() if needed[k]}
        if needed['x']:                                          # the last iteration's backward runs first
            if t == n_iters - 1:
                ctx.x_grad['x'] = torch.zeros_like(x)
            grads['x'] = ctx.x_grad['x']
        dpred = None if pred is None else torch.zeros_like(pred)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            products = _x_products(p, per_input, pred=pred, G=G, uniform_R=uniform_R and t == 0)
            _StreamedPass._backward_pass(x, mask, scale, p, t, n_out, per_input,
                                         _chunks(n, batch.numel(), d + n_out, chunk_elements),
                                         products, g_1, grads, dpred)
        grad_x = None
        if needed['x'] and t == 0:                               # the last backward of this forward's passes
            grad_x = ctx.x_grad.pop('x')
        grads = [grad_x, dpred if needed['pred'] else None, *(grads.get(k) for k in _STREAMED_PARAMS)]
        if double_backward:
            anchor = next(v for v in (x, pred, *p.values()) if v is not None and v.requires_grad)
            grads = _NoDoubleBackward.apply(anchor, *grads)
        return (None, None, None, None, None, *grads)

    @staticmethod
    def _backward_pass(x, mask, scale, p, t, n_out, per_input, chunks, products, g_1, grads, dpred):
        """One pass over the chunks of iteration t: adds its gradients into grads (and dpred)."""
        n = x.shape[-2]
        names, sizes, W = products                                                # names[0] == 'G'
        scale_a = _squeeze_last(scale)                                            # float or [..., 1]
        for s, e in chunks:
            c = _chunk(x, mask, scale, p, t, n_out, per_input, products, s, e)
            f_a, R, beta_use, beta_ign = c['f_a'], c['R'], c['beta_use'], c['beta_ign']
            # M-step sums: phi_x = phi^T x, phi_1 = sum_i phi
            dphi = c['Y']['G'] + g_1[..., None, :]                              # [..., c, n_out]
            f_a_dphi = f_a * dphi
            if c['beta_0'] is None:
                # credit: phi = f_a ((beta_use + beta_ign) R - beta_ign)
                d_beta = {'beta_use': f_a_dphi * R, 'beta_ign': f_a_dphi * (R - 1)}
                d_f_a = dphi * ((beta_use + beta_ign) * R - beta_ign)              # [..., c, n_out]
            else:
                # credit at t = 0 with R = 1/n_out: phi = f_a beta_0
                d_beta = {'beta_0': f_a_dphi}
                d_f_a = dphi * c['beta_0']
            if c['mask'] is not None:
                d_f_a = d_f_a.masked_fill(c['mask'], 0.0)
            d_a = d_f_a.sum(dim=-1) * c['sigma_a'] * (1 - c['sigma_a'])            # [..., c]
            d_x_W_A = d_a * scale_a                                                # [..., c]
            dy = {'G': c['phi'], 'W_A': d_x_W_A[..., None], **d_beta}
            if t > 0:
                # E-step: R = softmax_j(S), S = logsigma(Z), Z = L W_S + B_S, L = x pred^T
                dR = f_a_dphi * (beta_use + beta_ign)
                dS = R * (dR - (dR * R).sum(dim=-1, keepdim=True))
                dZ = dS * torch.sigmoid(-c['Z'])
                if 'W_S' in grads:
                    _add_grad(grads['W_S'], dZ * c['L'], p['W_S'], s, e, n)
                if 'B_S' in grads:
                    _add_grad(grads['B_S'], dZ, p['B_S'], s, e, n)
                dy['pred'] = dZ * _rows(p['W_S'], s, e, n)                          # [..., c, n_out]
            # the products y = x W^T of the chunk's GEMM: dx += dy W, dW += dy^T x
            dY = torch.cat([dy[k].expand(*dphi.shape[:-1], size) for k, size in zip(names, sizes)], dim=-1)
            if 'x' in grads:
                grads['x'][..., s:e, :] += dY @ W                                  # [..., c, d]
            if len(names) > 1:
                dW = dY[..., sizes[0]:].transpose(-1, -2) @ c['x']                 # [..., K - n_out, d]
                for k, dW_k in zip(names[1:], dW.split(sizes[1:], dim=-2)):
                    if k == 'pred':
                        dpred += dW_k                                              # [..., n_out, d]
                        continue
                    for target, factor in _gradient_targets(k, n_out):
                        if target in grads:
                            grads[target] += factor * dW_k.sum_to_size(grads[target].shape)
            # per-input parameters (n_inp > 0): their rows s:e; shared ones (n_inp = -1): their biases
            if per_input:
                if 'x' in grads:
                    grads['x'][..., s:e, :] += d_x_W_A[..., None] * p['W_A'][s:e]
                for k, d_k in (*d_beta.items(), ('W_A', torch.einsum('...i,...id->id', d_x_W_A, c['x'])), ('B_A', d_a)):
                    if k in grads:
                        grads[k][s:e] += d_k.sum_to_size(grads[k][s:e].shape)
            else:
                if 'B_A' in grads:
                    grads['B_A'] += d_a.sum_to_size(grads['B_A'].shape)
                for k, d_k in d_beta.items():
                    for target, factor in _gradient_targets(k, n_out):
                        if target + '_bias' in grads:
                            grads[target + '_bias'] += factor * d_k.sum_to_size(grads[target + '_bias'].shape)


_DOUBLE_BACKWARD_MESSAGE = (
    "EfficientVectorRouting(memory_efficient=True) computes its gradients by hand and cannot be "
    "differentiated twice (double backward: gradient penalties, Hessian-vector products, "
    "create_graph=True). Use memory_efficient=False, which runs on plain autograd.")


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the streamed routing's gradients through when they are computed with create_graph=True,
    so that differentiating them raises a clear error instead of silently treating them as constants."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        # anchor: an input of the routing that requires grad, so the outputs are part of the graph
        return tuple(None if g is None else g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_DOUBLE_BACKWARD_MESSAGE)


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
        memory_efficient: stream the routing over chunks of inputs: never materialise the votes V
            [..., n, n_out, d_out] nor any other [..., n, *] intermediate for longer than a chunk
            (one autograd function per iteration recomputes them in backward and writes each
            gradient into one buffer), so the memory above the input, the parameters and their gradients does not
            grow with n. Its gradients cannot be differentiated again (double backward raises).
            False materialises V and uses plain autograd; both agree.
        return_dict: return a dict of the intermediates instead of x_out.
        chunk_elements: with memory_efficient, the inputs in a chunk are as many as make about this
            many elements of [d_inp + n_out] per input over the batch (default CHUNK_ELEMENTS =
            2^21, 8 MiB in float32): smaller saves memory, larger saves per-chunk overhead.

    Forward:
        x_inp [..., n, d_inp], mask (optional) bool broadcastable to [..., n, n_out]
        -> x_out [..., n_out, d_out], or the dict
           {a_inp, V, pred_x_inp, S, R, D_use, D_ign, phi, x_out} (V None when memory-efficient,
           pred_x_inp and S None when n_iters == 1; with memory_efficient all entries but x_out
           are detached, for inspection; use memory_efficient=False to backprop through them).
    """

    def __init__(self, n_inp, n_out, d_inp, d_out, n_iters=2, normalize=True, memory_efficient=True,
                 return_dict=False, chunk_elements=CHUNK_ELEMENTS):
        super().__init__()
        _check_sizes(n_inp, n_out)
        _check_dims(d_inp=d_inp, d_out=d_out, chunk_elements=chunk_elements)
        _check_n_iters(n_iters)
        self.n_inp, self.n_out, self.d_inp, self.d_out = n_inp, n_out, d_inp, d_out
        self.n_iters, self.normalize = n_iters, normalize
        self.memory_efficient, self.return_dict, self.chunk_elements = memory_efficient, return_dict, chunk_elements
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
                f"memory_efficient={self.memory_efficient}, return_dict={self.return_dict}, "
                f"chunk_elements={self.chunk_elements}")

    def forward(self, x_inp, mask=None):
        n = _check_sequence('x_inp', x_inp, self.n_inp, (self.d_inp,), ('d_inp',))
        _check_dtype('x_inp', x_inp, self.W_A)
        batch_shape = x_inp.shape[:-2]
        if mask is not None:
            _check_mask(mask, batch_shape, n, self.n_out)
        # 2. xs = x_inp n^(-1/2), with n each sample's true length; never materialised, the scale
        #    is applied to the [..., n] and [..., n_out, d] sums instead.
        scale = _input_scale(mask, batch_shape, n, self.W_A.dtype, x_inp.device)   # float or [..., 1, 1]

        if self.memory_efficient:
            # Steps 1 and 3-5 of each iteration streamed over chunks of inputs (_StreamedPass), which
            # returns the M-step's sums; x_out and the next pred ([..., n_out, *]) on plain autograd.
            diagnostics = {} if self.return_dict else None
            uniform_R, params, pred, x_grad = _uniform_initial_R(mask), _streamed_params(self), None, {}
            for t in range(self.n_iters):
                if t > 0:
                    pred = _predict(x_out, self.W_G1, self.W_G2, self.B_G2)           # [..., n_out, d_inp]
                cfg = (t, self.n_iters, self.n_out, self.n_inp > 0, self.chunk_elements, uniform_R)
                last = diagnostics if t == self.n_iters - 1 else None
                phi_x, phi_1 = _StreamedPass.apply(cfg, mask, scale, last, x_grad, x_inp, pred, *params)
                x_out = _x_out_from_sums(phi_x, phi_1, scale, self.W_F1, self.W_F2, self.B_F2)  # [..., n_out, d_out]
            if self.normalize:
                x_out = _layer_norm(x_out)
            if not self.return_dict:
                return x_out
            return {**diagnostics, 'pred_x_inp': None if pred is None else pred.detach(), 'V': None, 'x_out': x_out}

        x_inp = _without_masked_inputs(x_inp, mask)                                 # [..., n, d_inp]
        # 1. beta_use, beta_ign: [n_inp, n_out] parameters, or [..., n, n_out] from x_inp
        beta_use, beta_ign = _betas(self, x_inp)
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
        # votes V[..., i, j, h] = sum_d xs[..., i, d] W_F1[j, d] W_F2[d, h] + B_F2[j, h]
        xs = x_inp * scale                                                          # [..., n, d_inp]
        V = torch.einsum('...id,jd,dh->...ijh', xs, self.W_F1, self.W_F2) + self.B_F2  # [..., n, n_out, d_out]

        pred = S = None
        for t in range(self.n_iters):
            if t > 0:
                # E-step: pred[..., j, d] = sum_h N(x_out)[..., j, h] W_G1[h, d] W_G2[j, d] + B_G2[j, d]
                pred = _predict(x_out, self.W_G1, self.W_G2, self.B_G2)              # [..., n_out, d_inp]
                # S[..., i, j] = logsigma((sum_d x_inp[..., i, d] pred[..., j, d]) W_S[i, j] + B_S[i, j])
                S = F.logsigmoid(torch.einsum('...id,...jd->...ij', x_inp, pred) * self.W_S + self.B_S)
            R = _initial_R(f_a, mask, self.n_out) if S is None else _masked_softmax(S, mask)
            D_use, D_ign, phi = _credit(R, f_a, beta_use, beta_ign)                 # [..., n, n_out]
            # M-step: x_out[..., j, h] = sum_i phi[..., i, j] V[..., i, j, h]
            x_out = torch.einsum('...ij,...ijh->...jh', phi, V)                      # [..., n_out, d_out]

        if self.normalize:
            x_out = _layer_norm(x_out)                                              # [..., n_out, d_out]
        if not self.return_dict:
            return x_out
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


def _streamed_params(module):
    """An EfficientVectorRouting's tensors in the order of _STREAMED_PARAMS."""
    if module.n_inp > 0:
        betas = {'beta_use': module.beta_use, 'beta_use_bias': None, 'beta_ign': module.beta_ign, 'beta_ign_bias': None}
    else:
        betas = {'beta_use': module.compute_beta_use.weight, 'beta_use_bias': module.compute_beta_use.bias,
                 'beta_ign': module.compute_beta_ign.weight, 'beta_ign_bias': module.compute_beta_ign.bias}
    return [betas[name] if name in betas else getattr(module, name) for name in _STREAMED_PARAMS]


# ---------------------------------------------------------------------------------------------
# DefinableVectorRouting (2022)
# ---------------------------------------------------------------------------------------------

class DefinableVectorRouting(nn.Module):
    """The 2022 algorithm with user-defined modules:

        a_inp = A(x_inp) -> [..., n]           V = F(x_inp) -> [..., n, n_out, d_out]
        pred = G(x_out)                         S = S(x_inp, pred) -> [..., n, n_out]

    No input scaling and no final normalisation; x_out = sum_i phi V. An input masked for every
    output is replaced by zeros before A, F, S and the beta layers see it.

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
        if d_inp is not None:
            _check_dims(d_inp=d_inp)
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

        x_inp = _without_masked_inputs(x_inp, mask)                                 # [..., n, d_inp]
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
        _check_dims(d_cov=d_cov, d_inp=d_inp, d_out=d_out)
        _check_n_iters(n_iters)
        _check_eps(eps)
        if p_model not in ('gaussian', 'skm'):
            raise ValueError(f"p_model must be 'gaussian' or 'skm', got {p_model!r}")
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
            # inputs masked for every output: their values (NaN included) never reach a sum
            a_inp = _without_masked_inputs(a_inp[..., None], mask)[..., 0]          # [..., n]
            mu_inp = _without_masked_inputs(mu_inp.flatten(-2), mask).reshape_as(mu_inp)  # [..., n, d_cov, d_inp]

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
