"""
The reference implementation of the equations (docs/equations.md) for the tests (importable as
benchmarks.reference: the tests and benchmarks/routing.py use it):

- straightforward_routing: EfficientVectorRouting's forward pass transcribed line by line from the
  equations (docs/equations.md) with plain autograd, reading the parameters of a heinsen_routing module. It is
  the independent reference the tests compare the library against, and the baseline of
  benchmarks/routing.py (it keeps every iteration's [..., n, n_out] intermediates, and the scaled
  copy xs of the input, for backward). Like the authors' code it takes only a mask shared by the
  whole batch ([n, n_out], masked entries -inf) and scales by the full sequence length.
- spec_state_shapes: the state-dict keys and shapes of EfficientVectorRouting in the table of parameter names
  and shapes (docs/equations.md).
"""
import torch
import torch.nn.functional as F


def straightforward_routing(module, x_inp, mask=None):
    """module: an EfficientVectorRouting (its parameters are used); x_inp [..., n, d_inp];
    mask: optional bool [n, n_out]. -> x_out [..., n_out, d_out]"""
    m = module
    n = x_inp.shape[-2]
    N = (lambda x: x) if m.d_out == 1 else (lambda x: F.layer_norm(x, x.shape[-1:]))
    if m.n_inp > 0:
        beta_use, beta_ign = m.beta_use, m.beta_ign                                  # [n, n_out]
    else:
        beta_use, beta_ign = m.compute_beta_use(x_inp), m.compute_beta_ign(x_inp)   # [..., n, n_out]
    xs = x_inp * n ** -0.5                                                           # [..., n, d_inp]
    if m.n_inp > 0:
        a_inp = torch.einsum('...id,id->...i', xs, m.W_A) + m.B_A                   # [..., n]
    else:
        a_inp = xs @ m.W_A[0] + m.B_A                                               # [..., n]
    a = a_inp[..., None]                                                             # [..., n, 1]
    f_a = torch.sigmoid(a if mask is None else a.masked_fill(mask, float('-inf')))   # [..., n, 1|n_out]
    for t in range(m.n_iters):
        if t == 0:
            logits = torch.full(f_a.shape[:-1] + (m.n_out,), 1.0 / m.n_out, dtype=f_a.dtype).log()
        else:
            pred = torch.einsum('...jh,hd,jd->...jd', N(x_out), m.W_G1, m.W_G2) + m.B_G2   # [..., n_out, d_inp]
            logits = F.logsigmoid(torch.einsum('...id,...jd->...ij', x_inp, pred) * m.W_S + m.B_S)
        if mask is not None:
            logits = logits.masked_fill(mask, float('-inf'))
        R = logits.softmax(dim=-1)                                                   # [..., n, n_out]
        D_use = f_a * R
        D_ign = f_a - D_use
        phi = beta_use * D_use - beta_ign * D_ign                                    # [..., n, n_out]
        x_out = (torch.einsum('...ij,...id,jd,dh->...jh', phi, xs, m.W_F1, m.W_F2)
                 + torch.einsum('...ij,jh->...jh', phi, m.B_F2))                     # [..., n_out, d_out]
    return N(x_out) if m.normalize else x_out


def spec_state_shapes(n_inp, n_out, d_inp, d_out):
    """{state-dict key: shape} of EfficientVectorRouting(n_inp, n_out, d_inp, d_out), from the table of parameter names and shapes (docs/equations.md)."""
    m = max(1, n_inp)
    shapes = {'W_A': (m, d_inp), 'B_A': (m,), 'W_F1': (n_out, d_inp), 'W_F2': (d_inp, d_out),
              'B_F2': (n_out, d_out), 'W_G1': (d_out, d_inp), 'W_G2': (n_out, d_inp),
              'B_G2': (n_out, d_inp), 'W_S': (m, n_out), 'B_S': (m, n_out),
              'CONST_ones_over_n_out': (n_out,)}
    if n_inp > 0:
        shapes.update(beta_use=(n_inp, n_out), beta_ign=(n_inp, n_out))
    else:
        shapes.update({'compute_beta_use.weight': (n_out, d_inp), 'compute_beta_use.bias': (n_out,),
                       'compute_beta_ign.weight': (n_out, d_inp), 'compute_beta_ign.bias': (n_out,)})
    return shapes
