"""
The streamed kernel of EfficientVectorRouting(memory_efficient=True): the same equations as the readable forward
(routing.py, with the functions of steps.py), computed over chunks of inputs so that no [..., n, n_out, *] or
[..., n, n_out] intermediate (the votes V, the logits, R, D, phi) lives longer than one chunk, in forward or
backward, but one beta block with a variable length (n_inp = -1), which the first pass keeps for the others
(_Pass.kept). One entry point, `streamed_routing`; one autograd function per routing iteration, `_StreamedPass`,
whose backward is derived by hand (docs/equations.md has the forward equations; the backward's are in
_StreamedPass's docstring).

Memory that grows with the number of inputs n, beyond the input, the parameters and their gradients (one buffer
each per forward, shared by its passes), per input of each batch element, in the parameters' dtype:
  - x . W_A, the same at every iteration: 1 element, kept from the forward to the backward (_x_W_A);
  - its gradient, summed over the passes: 1 element, during the backward;
  - n_inp = -1: the kept beta block, n_out elements, from the forward to the backward;
  - with a mask: a few [..., n] bool temporaries.
So 2 + n_out elements per input with a variable length (float32, n_out = 100: 408 bytes per input), 2 with a fixed
one. Everything else lives for one chunk at a time: a chunk's working set is a few times chunk_elements elements
(docs/library.md gives the measured figures).
The kernel reads nothing but its arguments: no file, no machine state, and it changes no process-global setting
(threads, precision); the chunks, and so the order of every sum, depend only on the shapes, the dtype, the device
type and chunk_elements.
"""
import itertools
from contextlib import nullcontext
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch

from .checks import autocast_enabled
from .steps import activations, agreement, credit_per_activation, initial_R, predict, squeeze_last, \
    without_masked_inputs, x_out_from_sums

if TYPE_CHECKING:
    from .routing import EfficientVectorRouting


def streamed_routing(module: 'EfficientVectorRouting', x_inp: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: Union[float, torch.Tensor], diagnostics: bool = False) -> tuple[torch.Tensor, dict]:
    """EfficientVectorRouting's iterations streamed over chunks of inputs (module: an EfficientVectorRouting; x_inp
    [..., n, d_inp]; mask None or bool broadcastable to [..., n, n_out]; scale n^(-1/2), a float or [..., 1, 1]; the
    arguments already checked by its forward): each iteration's pass (_StreamedPass) returns only the M-step's sums phi_x = sum_i phi x [..., n_out, d_inp] and phi_1 = sum_i phi [..., n_out];
    x_out and the next pred ([..., n_out, *]) are computed from them on plain autograd.
    -> x_out [..., n_out, d_out] (before normalisation), and (diagnostics=True) a dict of the last iteration's
    intermediates {a_inp, S, R, D_use, D_ign, phi, pred_x_inp}, detached, else {}."""
    m = module
    last = {} if diagnostics else None
    uniform_R, masks_inputs = _mask_kinds(mask)
    params, pred = _streamed_params(m), None
    # shared by the passes of this forward: x . W_A (the same at every iteration, so computed once) and, in backward,
    # the gradient buffers
    shared = {'x_W_A': _x_W_A(x_inp, m.W_A, m.n_inp > 0, mask if masks_inputs else None)}
    # n_inp = -1: the first pass keeps one of its beta blocks for the later passes and the backwards (_Pass.kept)
    kept_beta = None
    if m.n_inp < 0 and (m.n_iters > 1 or torch.is_grad_enabled()):
        kept_beta = x_inp.new_empty(*x_inp.shape[:-1], m.n_out, dtype=m.W_A.dtype)   # [..., n, n_out]
    chunk_elements = m.chunk_elements or chunk_elements_for(x_inp.device.type, m.W_A.dtype)
    for t in range(m.n_iters):
        if t > 0:
            pred = predict(x_out, m.W_G1, m.W_G2, m.B_G2)                               # [..., n_out, d_inp]
        cfg = (t, m.n_iters, m.n_out, m.n_inp > 0, chunk_elements, uniform_R, masks_inputs)
        phi_x, phi_1 = _StreamedPass.apply(cfg, mask, scale, last if t == m.n_iters - 1 else None, shared,
                                           kept_beta, x_inp, pred, *params)
        x_out = x_out_from_sums(phi_x, phi_1, scale, m.W_F1, m.W_F2, m.B_F2)           # [..., n_out, d_out]
    if diagnostics:
        last['pred_x_inp'] = None if pred is None else pred.detach()
    return x_out, (last or {})



# The chunk size: EfficientVectorRouting(chunk_elements=...) counts a chunk's inputs as elements of [d_inp + n_out]
# per input over the whole batch (or over one batch element, when each alone fills a chunk: _pass_chunks).
# chunk_elements=None (the default) is a fixed number of bytes per device type, whatever the memory free, so that the
# same call chunks (and sums) the same way every time:
#   CUDA  CUDA_CHUNK_BYTES (1.5 GiB: 3 x 2^27 float32 elements): a few large kernels per pass instead of many small
#         launches; the 2022 paper's head inputs (BEiT-large: batch 50 x 197 positions x 25 depths of 1024; IMDB:
#         batch 5 x 2,048 positions x 25 depths; routed to 64) are one chunk each;
#   else  CPU_CHUNK_BYTES (24 MiB: 3 x 2^21 float32 elements).
# A chunk's working set is a few times chunk_elements elements (docs/library.md gives the measured figures).
CPU_CHUNK_BYTES = 24 << 20
CUDA_CHUNK_BYTES = 3 << 29


def chunk_elements_for(device_type: str | torch.device, dtype: torch.dtype) -> int:
    """The default chunk_elements for tensors of `dtype` on a device of `device_type` ('cuda', 'cpu', ... or a
    torch.device): CUDA_CHUNK_BYTES on CUDA, CPU_CHUNK_BYTES elsewhere, in elements of dtype. It depends on nothing
    else: not on the memory free, nor on the machine's load."""
    element_size = torch.empty((), dtype=dtype).element_size()
    budget = CUDA_CHUNK_BYTES if torch.device(device_type).type == 'cuda' else CPU_CHUNK_BYTES
    return budget // element_size


def _chunks(n, batch_numel, row_width, chunk_elements):
    """[(start, end), ...] covering 0..n: rows * batch_numel * row_width ~ chunk_elements, >= 1 row."""
    rows = max(1, chunk_elements // max(1, batch_numel * row_width))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def _pass_chunks(batch, n, row_width, chunk_elements):
    """What a pass streams, in order: [(index, [(start, end), ...])], the chunks of inputs start:end of the batch
    element at `index` of the leading dims `batch`. One entry, index (), the whole batch in every chunk, unless each
    batch element alone fills at least a chunk; then every element on its own, in chunks of its rows: products of
    [rows, d_inp] by [d_inp, k] instead of a batch of matrices as many times shorter (benchmarks/routing.md measures
    the difference)."""
    if batch.numel() <= 1 or n * row_width < chunk_elements:
        return [((), _chunks(n, batch.numel(), row_width, chunk_elements))]
    chunks = _chunks(n, 1, row_width, chunk_elements)
    return [(index, chunks) for index in itertools.product(*map(range, batch))]


def _item(t, index, trailing=2):
    """t's part at `index` of the leading dims of a batch that t broadcasts against ([*batch, *trailing dims]): t
    itself for index () (the whole batch) or when t has no leading dims (a float, None, [n, n_out])."""
    lead = t.dim() - trailing if torch.is_tensor(t) else 0
    if not index or lead <= 0:
        return t
    return t[tuple(i if size > 1 else 0 for i, size in zip(index[-lead:], t.shape[:lead]))]


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


def _add_product(out, a, b):
    """out [..., c, d] += a [..., c, k] @ b [..., k, d] in place, the sum done by the GEMM itself (baddbmm over
    the leading dims) instead of through a [..., c, d] temporary; b's leading dims may broadcast. Under autocast,
    or with mixed dtypes, the product runs as autocast has it (a @ b) and is then added."""
    lead, (c, d), k = out.shape[:-2], out.shape[-2:], a.shape[-1]
    if (a.shape[:-2] != lead or len(b.shape[:-2]) > len(lead) or not out.dtype == a.dtype == b.dtype
            or autocast_enabled(out.device.type)):
        out += a @ b
        return
    out.view(-1, c, d).baddbmm_(a.reshape(-1, c, k), b.expand(*lead, k, d).reshape(-1, k, d))


# The parameters of EfficientVectorRouting that a _StreamedPass reads, in its argument order.
# beta_use, beta_ign: the [n_inp, n_out] parameters, or (n_inp = -1) compute_beta_*.weight [n_out, d_inp]
# with compute_beta_*.bias in beta_*_bias (None for n_inp > 0).
_STREAMED_PARAMS = ('W_A', 'B_A', 'beta_use', 'beta_use_bias', 'beta_ign', 'beta_ign_bias', 'W_S', 'B_S')


def _x_products(p, per_input, pred=None, G=None, uniform_R=False, skip=()):
    """The [k, d_inp] blocks W that multiply every input, y = x W^T, stacked for one GEMM per chunk:
    G (backward: dphi = x G^T + g_1), pred (t > 0: L = x pred^T) and, when the parameters are shared
    by all inputs (n_inp = -1), the beta layers' weights (beta = x W^T + bias). (x . W_A is computed once per
    forward, _x_W_A.)
    With uniform_R (t = 0 and R = 1/n_out wherever f_a > 0) phi = f_a (beta_use R - beta_ign (1 - R))
    needs only beta_0 = (beta_use - (n_out - 1) beta_ign) / n_out, one block instead of two.
    skip: names of blocks to leave out (those a pass reads from _Pass.kept instead of computing them).
    -> (names, sizes, W [..., K, d_inp]); x_c @ W^T split by sizes gives the products by name."""
    blocks = {'G': G, 'pred': pred}
    if not per_input and uniform_R:
        blocks.update(beta_0=_beta_0(p['beta_use'], p['beta_ign']))
    elif not per_input:
        blocks.update(beta_use=p['beta_use'], beta_ign=p['beta_ign'])
    blocks = {name: w for name, w in blocks.items() if w is not None and name not in skip}
    if not blocks:
        return [], [], None
    batch = torch.broadcast_shapes(*(w.shape[:-2] for w in blocks.values()))
    W = torch.cat([w.expand(*batch, *w.shape[-2:]) for w in blocks.values()], dim=-2)   # [..., K, d_inp]
    return list(blocks), [w.shape[-2] for w in blocks.values()], W


def _x_W_A(x, W_A, per_input, mask):
    """x . W_A: [..., n], with per-input W_A [n, d_inp] or one W_A [1, d_inp] shared by all inputs (0 for inputs the
    mask masks for every output, as the chunks see them), detached: the passes compute its gradient by hand. The
    same at every iteration, so computed once per forward (as a column of each chunk's GEMM it would be recomputed
    in every pass, forward and backward, and widen every product by one)."""
    with torch.no_grad():
        x_W_A = torch.einsum('...id,id->...i', x, W_A) if per_input else x @ W_A[0]     # [..., n]
        return x_W_A if mask is None else x_W_A.masked_fill(mask.all(dim=-1), 0.0)


def _add_W_A_grads(ps, chunks, d_x_W_A, grads):
    """d x += d(x . W_A) W_A and d W_A += d(x . W_A) x, from d(x . W_A) [..., n] summed over every pass, chunk by
    chunk (no [..., n, d] temporary); W_A per input [n, d_inp] or shared [1, d_inp]."""
    x, W_A = ps.x, ps.p['W_A']
    one_sample = d_x_W_A.numel() == x.shape[-2]
    for s, e in chunks:
        d_c = d_x_W_A[..., s:e]                                                          # [..., c]
        if 'x' in grads:
            grads['x'][..., s:e, :].addcmul_(d_c[..., None], W_A[s:e] if ps.per_input else W_A)
        if 'W_A' not in grads:
            continue
        x_c = x[..., s:e, :]
        if ps.masks_inputs:
            x_c = without_masked_inputs(x_c, _rows(ps.mask, s, e, x.shape[-2]))
        if not ps.per_input:                                        # [1, d] += sum over [...] of [1, c] @ [c, d]
            grads['W_A'] += (d_c[..., None, :] @ x_c).sum_to_size(grads['W_A'].shape)
        elif one_sample:
            grads['W_A'][s:e].addcmul_(d_c.reshape(e - s, 1), x_c.reshape(e - s, -1))
        else:
            grads['W_A'][s:e] += torch.einsum('...i,...id->id', d_c, x_c)


class _Pass(NamedTuple):
    """What every chunk of one pass reads: the input x [..., n, d_inp], the mask (None or bool broadcastable to
    [..., n, n_out]) and whether it masks some input for every output, the scale n^(-1/2) (float or [..., 1, 1]),
    the parameters p (by _STREAMED_PARAMS name), the iteration t, n_out, whether the parameters are per input
    (n_inp > 0), the pass's blocks (_x_products: `products`, all of them, whose gradients backward computes, and
    `gemm`, those the chunk's GEMM computes), the kept beta block and x . W_A [..., n] (_x_W_A).
    kept (n_inp = -1): [..., n, n_out] rows of one beta block (with its bias) that the first pass's forward writes
    and every later pass, and every backward, reads instead of computing it: kept_name 'beta_0' when the first
    iteration's R is uniform (its only block; the later iterations recover beta_ign = (beta_use - n_out beta_0) /
    (n_out - 1), well conditioned since |beta_0| is of the order of |beta_ign|), else 'beta_ign'. Each pass but
    the first forward computes one [n_out, d_inp] block fewer, for one [..., n, n_out] tensor of memory."""
    x: torch.Tensor
    mask: Optional[torch.Tensor]
    masks_inputs: bool
    scale: Union[float, torch.Tensor]
    p: dict
    t: int
    n_out: int
    per_input: bool
    products: tuple
    gemm: tuple
    kept: Optional[torch.Tensor]
    kept_name: Optional[str]
    x_W_A: Optional[torch.Tensor] = None


def _make_pass(cfg, x, mask, scale, p, pred, x_W_A, kept, G=None, index=()):
    """The _Pass of iteration cfg[0] for its forward (G None) or its backward (G: the gradient of phi_x), over the
    batch element `index` (_pass_chunks; () for the whole batch). Only the first iteration's forward computes (and
    writes) the kept block; the other passes leave it out of their GEMM."""
    t, n_iters, n_out, per_input, chunk_elements, uniform_R, masks_inputs = cfg
    x, mask, scale, pred, kept, G = (_item(v, index) for v in (x, mask, scale, pred, kept, G))
    x_W_A = _item(x_W_A, index, 1)
    products = _x_products(p, per_input, pred=pred, G=G, uniform_R=uniform_R and t == 0)
    writes_kept = t == 0 and G is None
    gemm = products if kept is None or writes_kept else \
        _x_products(p, per_input, pred=pred, G=G, uniform_R=uniform_R and t == 0, skip=('beta_0', 'beta_ign'))
    kept_name = None if kept is None else 'beta_0' if uniform_R else 'beta_ign'
    return _Pass(x, mask, masks_inputs, scale, p, t, n_out, per_input, products, gemm, kept, kept_name, x_W_A)


def _chunk(ps, s, e, diagnostics=False, phi_out=None, with_phi=True):
    """One iteration's steps for the inputs s:e, with the functions of steps.py (docs/equations.md: step 1, the
    betas; 3-4, a_inp and f_a; the E-step's R; the D-step and the credit phi), from the input and the parameters.
    The products of x with [k, d_inp] blocks come from one GEMM (_x_products). D_use and D_ign only with
    diagnostics (phi needs neither). Inputs masked for every output are replaced by zeros (a copy of the chunk's
    rows) when the mask has any (ps.masks_inputs). The mask enters as a factor `keep` (1 where the (input, output)
    pair counts, else 0) of q and of the backward's f_a dphi: a multiplication instead of masked_fill
    (benchmarks/routing.md). ps: the pass's _Pass; phi_out: None or a [..., c, n_out] tensor to write phi into; with_phi:
    False where phi is not needed (the backward without an input gradient), then returned as None.
    -> dict of [..., c, *] tensors (f_a [..., c, 1] before the mask)."""
    x, mask, scale, p, t, n_out, per_input = ps.x, ps.mask, ps.scale, ps.p, ps.t, ps.n_out, ps.per_input
    n = x.shape[-2]
    x_c, mask_c = x[..., s:e, :], _rows(mask, s, e, n)                          # [..., c, d]
    if ps.masks_inputs:
        x_c = without_masked_inputs(x_c, mask_c)
    names, sizes, W = ps.gemm
    # [..., c, k] blocks, in the parameters' precision under autocast (the steps below update them in place)
    if W is None:
        Y = {}
    else:
        XW = x_c @ W.transpose(-1, -2)                                          # [..., c, K]
        Y = dict(zip(names, XW.to(p['W_A'].dtype).split(sizes, dim=-1)))
    keep = None if mask_c is None else (~mask_c).to(p['W_A'].dtype)            # [..., c, n_out] (broadcastable)
    # 3-4. a_inp = (x . W_A) n^(-1/2) + B_A, f_a = sigma(a_inp) (0 for masked pairs: through q below)
    a, f_a = activations(ps.x_W_A[..., s:e], scale, p['B_A'][s:e] if per_input else p['B_A'], None)  # [..., c], [.., c, 1]
    # 1. beta_use, beta_ign: rows of the parameters, or compute_beta_*(x) (or only beta_0, see _x_products); kept
    # as beta_sum = beta_use + beta_ign and beta_ign. The GEMM's blocks are this chunk's own, so they are updated in
    # place (the biases added, beta_use's block turned into beta_sum); the kept block's rows (ps.kept) are read only
    beta_sum = beta_ign = beta_0 = None
    kept = None if ps.kept is None else ps.kept[..., s:e, :]                     # [..., c, n_out]
    if per_input:
        beta_sum, beta_ign = p['beta_use'][s:e] + p['beta_ign'][s:e], p['beta_ign'][s:e]   # [c, n_out]
    elif 'beta_0' in ps.products[0]:
        beta_0 = _beta_rows(Y, 'beta_0', _beta_0(p['beta_use_bias'], p['beta_ign_bias']), kept)  # [..., c, n_out]
    else:
        beta_use = Y['beta_use'].add_(p['beta_use_bias'])                         # [..., c, n_out]
        if ps.kept_name == 'beta_0':                     # t > 0: beta_0 = (beta_use - (n_out - 1) beta_ign) / n_out
            beta_ign = torch.sub(beta_use, kept, alpha=n_out).div_(n_out - 1)
        else:
            beta_ign = _beta_rows(Y, 'beta_ign', p['beta_ign_bias'], kept)
        beta_sum = beta_use.add_(beta_ign)
    # E-step: R = 1/n_out (t = 0), or R = softmax_j(S), S = logsigma(L W_S + B_S), L = x pred^T
    L = S = None
    if t == 0:
        R = initial_R(f_a, mask_c, n_out)                                        # [..., c, n_out]
    else:
        L = Y['pred']                                                              # [..., c, n_out]
        S = agreement(L, _rows(p['W_S'], s, e, n), _rows(p['B_S'], s, e, n))
        R = _softmax_over_kept(S, keep, ps.masks_inputs)
    # D-step and credit: D_use = f_a R, D_ign = f_a - D_use, phi = f_a q with q = beta_use R - beta_ign (1 - R)
    # (= beta_0 when R = 1/n_out, t = 0), 0 for masked pairs; q is what the backward's d f_a needs
    if beta_0 is not None:
        q = beta_0 if keep is None else beta_0 * keep                            # [..., c, n_out]
    else:
        q = credit_per_activation(R, beta_sum, beta_ign)                          # [..., c, n_out]
        if keep is not None:
            q.mul_(keep)
    phi = torch.mul(f_a, q, out=phi_out) if with_phi else None                    # [..., c, n_out]
    D_use = D_ign = None
    if diagnostics:
        D_use = f_a * R
        D_ign = (f_a if keep is None else f_a * keep) - D_use
    return dict(x=x_c, keep=keep, Y=Y, a=a, f_a=f_a, beta_sum=beta_sum, beta_ign=beta_ign,
                beta_0=beta_0, L=L, S=S, R=R, q=q, D_use=D_use, D_ign=D_ign, phi=phi)


def _diagnostics(parts, batch):
    """The diagnostics of a pass from its chunks' parts {index: [[a, S, R, D_use, D_ign, phi] of each chunk]}
    (_pass_chunks' order): each part's chunks concatenated over the inputs and, when the pass streamed the batch
    elements one after the other, the elements stacked into the batch. -> {a_inp [..., n], S, R, D_use, D_ign,
    phi [..., n, n_out]} (S None at t = 0)"""
    out = {}
    for k, name in enumerate(('a_inp', 'S', 'R', 'D_use', 'D_ign', 'phi')):
        if next(iter(parts.values()))[0][k] is None:
            out[name] = None
            continue
        dim = -1 if name == 'a_inp' else -2
        rows = [torch.cat([chunk[k] for chunk in chunks], dim=dim) for chunks in parts.values()]
        out[name] = rows[0] if list(parts) == [()] else torch.stack(rows).reshape(*batch, *rows[0].shape)
    return out


def _beta_rows(Y, name, bias, kept):
    """A chunk's rows of the beta block `name` with its bias: from the chunk's GEMM (Y), then also written into the
    kept rows when there are any (the first iteration's forward), or else read from the kept rows."""
    if name not in Y:
        return kept
    rows = Y[name].add_(bias)
    if kept is not None:
        kept.copy_(rows)
    return rows


def _softmax_over_kept(S, keep, rows_all_masked):
    """masked_softmax(S, mask) with the mask as keep = 1 - mask (float): the masked entries are moved to
    -finfo.max / 4 by an addition (instead of masked_fill); they come out exactly 0 in every
    row with an unmasked entry. Rows with every entry masked come out 1/n_out and are then zeroed by keep (only
    needed when the mask masks some input for every output, rows_all_masked). S [..., c, n_out] -> R"""
    if keep is None:
        return S.softmax(dim=-1)
    R = torch.add(S, keep - 1, alpha=torch.finfo(S.dtype).max / 4).softmax(dim=-1)
    return R.mul_(keep) if rows_all_masked else R


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


def _used(name, n_iters):
    """Whether the passes read this input of _StreamedPass: W_S and B_S only enter the E-step of t > 0."""
    return n_iters > 1 or name not in ('W_S', 'B_S')


def _mask_kinds(mask):
    """-> (uniform_R, masks_inputs), read with one host sync per forward. uniform_R: whether the first iteration's
    R is 1/n_out for every input that counts: no mask, or one that masks whole inputs only (their f_a is 0, so
    their R does not matter). masks_inputs: whether the mask masks some input for every output."""
    if mask is None:
        return True, False
    masked_for_all = mask.all(dim=-1)
    uniform_R, masks_inputs = torch.stack([(mask.any(dim=-1) == masked_for_all).all(), masked_for_all.any()]).tolist()
    return uniform_R, masks_inputs


class _StreamedPass(torch.autograd.Function):
    """One iteration of EfficientVectorRouting (memory_efficient=True): a pass over chunks of inputs whose memory
    above its input, parameters and their gradients grows with n only by what the module docstring lists (x . W_A
    and its gradient, the kept beta block). From x, the iteration's pred (None at t = 0) and the parameters it
    recomputes chunk by chunk everything else of size [..., n, *] (_chunk: the betas, a_inp, f_a, the logits
    L = x pred^T, R, D, phi) and returns only the two sums the M-step needs,

        phi_x[..., j, d] = sum_i phi[..., i, j] x[..., i, d]          phi_1[..., j] = sum_i phi[..., i, j]

    The small steps between passes (x_out from the sums, the next pred from x_out: [..., n_out, *]
    tensors) run on plain autograd outside, so autograd keeps their activations and backward never
    recomputes them. Saved for backward: x, the mask, pred, the kept beta block (n_inp = -1: _Pass) and the
    parameters. Backward gets
    (G, g_1) = the gradient of (phi_x, phi_1) and makes one pass over chunks that recomputes the
    chunk and writes, in place into one buffer per input or parameter, the gradients (the buffers are
    shared by the passes of one forward, `shared`: autograd runs their backwards from the last
    iteration to the first, each adds into them, and only the first iteration's returns them, so no
    second input-sized or [n_inp, *] parameter-sized gradient is ever allocated, whatever n_iters)

        dphi  = x G^T + g_1                                           (M-step sums)
        dx   += phi G
        df_a  = dphi ((beta_use + beta_ign) R - beta_ign)             (phi = f_a ((beta_use + beta_ign) R - beta_ign))
        dbeta_use = dphi f_a R            dbeta_ign = dphi f_a (R - 1)
        da    = sum_j df_a (unmasked) sigma(a) (1 - sigma(a))         (f_a = sigma(a), masked pairs 0)
        dR    = dphi f_a (beta_use + beta_ign)
        dS    = R (dR - sum_j dR R)                                   (R = softmax_j S)
        dZ    = dS sigma(-Z) = -dS expm1(S)                         (S = logsigma Z)
        dW_S  = dZ L,   dB_S = dZ,   dL = dZ W_S                      (Z = L W_S + B_S)
        dpred = dL^T x, dx += dL pred                                 (L = x pred^T)
        and for each block W of a product y = x W^T (the beta layers when n_inp = -1):
        dW += dy^T x, dx += dy W, with dy = dbeta_* (and their biases sum it); with per-input parameters
        (n_inp > 0) their rows s:e get dbeta_* and dB_A = da. x . W_A is the same at every iteration and computed
        once per forward: its gradient da n^(-1/2) is summed over the passes into one [..., n] buffer that the
        last backward multiplies into dW_A += d(x . W_A) x and dx += d(x . W_A) W_A.

    All products of x with [k, d_inp] blocks share one GEMM per chunk (_x_products), and so do the
    gradients that flow back through them. dpred is returned as the gradient of the input pred:
    autograd carries it through the small steps to (G, g_1) of the pass before.
    """

    @staticmethod
    def forward(ctx, cfg, mask, scale, diagnostics, shared, kept, x, pred, *params):
        # cfg: (t, n_iters, n_out, per_input, chunk_elements, uniform_R, masks_inputs); mask: None or bool broadcastable to
        # [..., n, n_out]; scale: n^(-1/2), float or [..., 1, 1]; diagnostics: None or a dict to fill
        # with this pass's intermediates; shared: a dict shared by the passes of one forward (holds the
        # gradient buffers of the input and parameters in backward); kept: None or the [..., n, n_out] rows of the
        # kept beta block (_Pass), written by the first pass; x [..., n, d_inp]; pred [..., n_out, d_inp] or None
        # (t = 0); params: _STREAMED_PARAMS
        p = dict(zip(_STREAMED_PARAMS, params))
        t, n_iters, n_out, per_input, chunk_elements, uniform_R, masks_inputs = cfg
        batch, (n, d) = x.shape[:-2], x.shape[-2:]
        phi_x = x.new_zeros(*batch, n_out, d, dtype=p['W_A'].dtype)                  # [..., n_out, d]
        phi_1 = x.new_zeros(*batch, n_out, dtype=p['W_A'].dtype)                     # [..., n_out]
        parts = {}                                              # diagnostics: {index: the chunks' parts}
        for i, chunks in _pass_chunks(batch, n, d + n_out, chunk_elements):
            ps = _make_pass(cfg, x, mask, scale, p, pred, shared['x_W_A'], kept, index=i)
            phi_x_i, phi_1_i = _item(phi_x, i), _item(phi_1, i, 1)                     # the element's sums
            parts[i] = [_StreamedPass._forward_chunk(ps, s, e, phi_x_i, phi_1_i, diagnostics is not None)
                        for s, e in chunks]
        if diagnostics is not None:
            diagnostics.update(_diagnostics(parts, batch))
        ctx.cfg, ctx.shared = cfg, shared
        ctx.scale = None if torch.is_tensor(scale) else scale
        ctx.save_for_backward(x, mask, scale if torch.is_tensor(scale) else None, pred, kept, *params)
        device_type = x.device.type
        autocast = autocast_enabled(device_type)
        ctx.autocast = (device_type, autocast, torch.get_autocast_dtype(device_type) if autocast else None)
        return phi_x, phi_1

    @staticmethod
    def _forward_chunk(ps, s, e, phi_x, phi_1, diagnostics):
        """The M-step sums of the inputs s:e, added into phi_x and phi_1 (a function of its own so that the
        chunk's intermediates are freed before the next chunk's are made). -> the diagnostics' parts or None"""
        c = _chunk(ps, s, e, diagnostics)
        _add_product(phi_x, c['phi'].transpose(-1, -2), c['x'])                # [..., n_out, d] += phi^T x
        phi_1 += c['phi'].sum(dim=-2)                                           # [..., n_out]
        return [c[k] for k in ('a', 'S', 'R', 'D_use', 'D_ign', 'phi')] if diagnostics else None

    @staticmethod
    def backward(ctx, G, g_1):
        double_backward = torch.is_grad_enabled()                # create_graph=True
        x, mask, scale, pred, kept, *params = ctx.saved_tensors
        scale = ctx.scale if scale is None else scale
        p = dict(zip(_STREAMED_PARAMS, params))
        t, n_iters, n_out, per_input, chunk_elements, uniform_R, masks_inputs = ctx.cfg
        batch, (n, d) = x.shape[:-2], x.shape[-2:]
        # One gradient buffer per input and parameter for the whole forward, written in place chunk by chunk and
        # shared by its passes (ctx.shared): autograd runs their backwards from the last iteration to the first, the
        # first to run allocates the buffers, each adds into them, and only the first iteration's backward returns
        # them, so autograd never holds a second [n_inp, *] or input-sized gradient to sum.
        # d(x . W_A) of every pass is summed into one [..., n] buffer and multiplied into the gradients of x and W_A
        # once, by the last backward (_add_W_A_grads).
        needed = dict(zip(('x', 'pred', *_STREAMED_PARAMS), ctx.needs_input_grad[6:]))
        if t == n_iters - 1:
            ctx.shared['grads'] = {k: torch.zeros_like(v) for k, v in (('x', x), *p.items())
                                   if needed[k] and _used(k, n_iters)}
            if {'x', 'W_A'} & set(ctx.shared['grads']):
                ctx.shared['grads']['x_W_A'] = torch.zeros_like(ctx.shared['x_W_A'], dtype=p['W_A'].dtype)
        grads = ctx.shared['grads']
        dpred = None if pred is None else torch.zeros_like(pred)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.no_grad(), (torch.autocast(device_type, dtype=autocast_dtype) if autocast_on else nullcontext()):
            for i, chunks in _pass_chunks(batch, n, d + n_out, chunk_elements):
                ps = _make_pass(ctx.cfg, x, mask, scale, p, pred, ctx.shared['x_W_A'], kept, G=G, index=i)
                grads_i = {k: _item(v, i, 1 if k == 'x_W_A' else 2) if k in ('x', 'x_W_A') else v
                           for k, v in grads.items()}         # the input's and x . W_A's at i; the parameters' whole
                g_1_i, dpred_i = _item(g_1, i, 1), _item(dpred, i)
                for s, e in chunks:
                    _StreamedPass._backward_chunk(ps, s, e, g_1_i, grads_i, dpred_i)
                if t == 0 and 'x_W_A' in grads_i:
                    _add_W_A_grads(ps, chunks, grads_i['x_W_A'], grads_i)
            if t == 0:
                grads.pop('x_W_A', None)
        returned = grads if t == 0 else {}                       # the last backward of this forward's passes
        grads = [returned.get('x'), dpred if needed['pred'] else None, *(returned.get(k) for k in _STREAMED_PARAMS)]
        if t == 0:
            del ctx.shared['grads']
        if double_backward:
            anchor = next(v for v in (x, pred, *p.values()) if v is not None and v.requires_grad)
            grads = _NoDoubleBackward.apply(anchor, *grads)
        return (None, None, None, None, None, None, *grads)

    @staticmethod
    def _backward_chunk(ps, s, e, g_1, grads, dpred):
        """The gradients of the inputs s:e, added into grads (and dpred). A function of its own so that the chunk's
        intermediates are freed before the next chunk's are made; the chunk's own tensors are updated in place, and the
        gradients dy of the products y = x W^T are written straight into the blocks of one [..., c, K] tensor dY for
        the GEMMs dx += dY W and dW = dY^T x."""
        x, scale, p, t, n_out, per_input = ps.x, ps.scale, ps.p, ps.t, ps.n_out, ps.per_input
        n = x.shape[-2]
        names, sizes, W = ps.products                                             # names[0] == 'G'
        first = 0 if 'x' in grads else 1                                          # the G block only for dx
        dY = x.new_empty(*x.shape[:-2], e - s, sum(sizes[first:]), dtype=p['W_A'].dtype)   # [..., c, K]
        dy = dict(zip(names[first:], dY.split(sizes[first:], dim=-1)))
        c = _chunk(ps, s, e, phi_out=dy.get('G'), with_phi='G' in dy)            # dy_G = phi (dx += phi G)
        f_a, R, q, keep = c['f_a'], c['R'], c['q'], c['keep']
        # M-step sums: phi_x = phi^T x, phi_1 = sum_i phi
        dphi = c['Y']['G'].add_(g_1[..., None, :])                              # [..., c, n_out]
        # credit: phi = f_a q, q = ((beta_use + beta_ign) R - beta_ign) keep (beta_0 keep at t = 0, R = 1/n_out)
        d_f_a = torch.linalg.vecdot(dphi, q)                                    # [..., c]: sum_j dphi q
        d_a = d_f_a * f_a[..., 0] * (1 - f_a[..., 0])                            # [..., c]: f_a = sigma(a)
        d_x_W_A = d_a * squeeze_last(scale)                                    # [..., c]
        f_a_dphi = torch.mul(dphi, f_a, out=dy['beta_0']) if 'beta_0' in dy else dphi.mul_(f_a)   # [..., c, n_out]
        if keep is not None:
            f_a_dphi.mul_(keep)
        if c['beta_0'] is None:
            d_beta = {'beta_use': torch.mul(f_a_dphi, R, out=dy.get('beta_use'))}
            d_beta['beta_ign'] = torch.sub(d_beta['beta_use'], f_a_dphi, out=dy.get('beta_ign'))  # f_a dphi (R - 1)
        else:
            d_beta = {'beta_0': f_a_dphi}
        if t > 0:
            # E-step: R = softmax_j(S), S = logsigma(Z), Z = L W_S + B_S, L = x pred^T
            dR = f_a_dphi * c['beta_sum']                                          # [..., c, n_out]
            dS = dR.sub_(torch.linalg.vecdot(dR, R)[..., None]).mul_(R)
            dZ = dS.mul_(c['S'].expm1_().neg_())                                  # sigma(-Z) = 1 - exp(S)
            if 'W_S' in grads:
                _add_grad(grads['W_S'], dZ * c['L'], p['W_S'], s, e, n)
            if 'B_S' in grads:
                _add_grad(grads['B_S'], dZ, p['B_S'], s, e, n)
            torch.mul(dZ, _rows(p['W_S'], s, e, n), out=dy['pred'])                # [..., c, n_out]
        # the products y = x W^T of the chunk's GEMM: dx += dy W, dW += dy^T x
        if first == 0:
            _add_product(grads['x'][..., s:e, :], dY, W)                           # [..., c, d] += dy W
        if len(names) > 1:
            dW = dY[..., sizes[0] if first == 0 else 0:].transpose(-1, -2) @ c['x']   # [..., K - n_out, d]
            for k, dW_k in zip(names[1:], dW.split(sizes[1:], dim=-2)):
                if k == 'pred':
                    dpred += dW_k                                                  # [..., n_out, d]
                    continue
                for target, factor in _gradient_targets(k, n_out):
                    if target in grads:
                        grads[target] += factor * dW_k.sum_to_size(grads[target].shape)
        if 'x_W_A' in grads:
            grads['x_W_A'][..., s:e] += d_x_W_A                                    # [..., c]
        # per-input parameters (n_inp > 0): their rows s:e; shared ones (n_inp = -1): their biases
        if per_input:
            for k, d_k in (*d_beta.items(), ('B_A', d_a)):
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



def _streamed_params(module):
    """An EfficientVectorRouting's tensors in the order of _STREAMED_PARAMS."""
    if module.n_inp > 0:
        betas = {'beta_use': module.beta_use, 'beta_use_bias': None, 'beta_ign': module.beta_ign, 'beta_ign_bias': None}
    else:
        betas = {'beta_use': module.compute_beta_use.weight, 'beta_use_bias': module.compute_beta_use.bias,
                 'beta_ign': module.compute_beta_ign.weight, 'beta_ign_bias': module.compute_beta_ign.bias}
    return [betas[name] if name in betas else getattr(module, name) for name in _STREAMED_PARAMS]

