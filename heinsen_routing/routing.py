"""
Heinsen's routing algorithms, written next to their equations.

  EfficientVectorRouting   "An Algorithm for Routing Vectors in Sequences" (Heinsen, 2022)
  DefinableVectorRouting   the same algorithm with user-defined A, F, G, S modules (2022)
  GenerativeMatrixRouting  "An Algorithm for Routing Capsules in All Domains" (Heinsen, 2019)

Parameter names, shapes and initialisations equal those of the authors' published checkpoints, so
those load with strict=True, and the forward computation is the papers' (float tolerance). The equations are
in docs/equations.md; each is one function of steps.py, and each forward below composes them with its E-, D- and
M-steps labelled. EfficientVectorRouting(memory_efficient=True) computes the same steps streamed over chunks of
inputs (streamed.py); the argument checks are in checks.py. Notation: `...` any leading (batch) dims,
i inputs (n of them), j outputs (n_out), d input features (d_inp), h output features (d_out).

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
import functools
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import (autocast_enabled, check_dims, check_dtype, check_eps, check_mask, check_n_iters, check_sequence,
                     check_sizes)
from .steps import (activations, agreement, betas, credit, init_betas, initial_R, input_scale, layer_norm,
                    masked_softmax, predict, without_masked_inputs)
from .streamed import streamed_routing

__all__ = ['EfficientVectorRouting', 'DefinableVectorRouting', 'GenerativeMatrixRouting', 'Routing']

# What return_dict=True returns: every intermediate by name (None where a step did not run, such as S at n_iters 1).
Intermediates = dict[str, Optional[torch.Tensor]]


def autocast_safe(forward: Callable) -> Callable:
    """Under torch.autocast, a routing's forward (decorated with this) keeps its numerics out of float16's range
    and returns float32, whatever the memory mode:
      - fp16 autocast: the forward runs with autocast off, in the parameters' dtype (float32 unless the module
        was cast), its inputs cast to it. Its sums over the inputs (M-step), softmaxes, squared distances and
        layer norms overflow float16 at input magnitudes of about 100 (EfficientVectorRouting) or 1e4
        (GenerativeMatrixRouting), which would make every output NaN.
      - bf16 autocast (float32's range): the forward runs under autocast as it is.
    Either way every floating-point tensor it returns (x_out; a_out, mu_out, sig2_out; the dict's entries) is
    float32 (as autocast's own reductions: softmax, layer_norm, sum). Outside autocast nothing changes.
    float64 inputs are left to the dtype check (autocast does not cast float64)."""
    @functools.wraps(forward)
    def wrapper(module, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        if not tensors or not autocast_enabled(tensors[0].device.type) \
                or any(t.dtype == torch.float64 for t in tensors):
            return forward(module, *args, **kwargs)
        device_type = tensors[0].device.type
        if torch.get_autocast_dtype(device_type) == torch.float16:
            dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()
                          and not isinstance(p, nn.parameter.UninitializedParameter)), torch.float32)
            cast = lambda a: a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a   # noqa: E731
            with torch.autocast(device_type, enabled=False):
                out = forward(module, *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        else:
            out = forward(module, *args, **kwargs)
        return _to_float32(out)
    return wrapper


def _to_float32(out):
    """Floating-point tensors of out (a tensor, tuple or dict) as float32; anything else as it is."""
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out


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
            [..., n, n_out, d_out] nor any other [..., n, n_out] intermediate for longer than a chunk (one autograd
            function per iteration recomputes them in backward and writes each gradient into one buffer). Beyond
            the input, the parameters and their gradients, the memory that grows with n is 2 + n_out elements per
            input with n_inp = -1 (x . W_A, its gradient and one kept beta block), 2 with a fixed n_inp; the rest
            is one chunk's working set. Its gradients cannot be differentiated again (double backward raises).
            False materialises V and uses plain autograd; both agree to float rounding.
        return_dict: return a dict of the intermediates instead of x_out.
        chunk_elements: with memory_efficient, the inputs in a chunk are as many as make about this
            many elements of [d_inp + n_out] per input over the batch (over each batch element on its own when
            one element alone fills a chunk): smaller saves memory, larger saves per-chunk overhead. None (default)
            is a fixed size per device type (streamed.chunk_elements_for): 3 x 2^27 float32 elements (1.5 GiB) on
            CUDA, 3 x 2^21 (24 MiB) on a CPU and other devices, whatever the memory free. The chunk size sets the order
            of the sums over the inputs: the same call gives bit-identical results, and different chunk sizes
            results that agree to float rounding (docs/library.md gives the measured tolerance).

    Forward:
        x_inp [..., n, d_inp], mask (optional) bool broadcastable to [..., n, n_out]
        -> x_out [..., n_out, d_out], or the dict
           {a_inp, V, pred_x_inp, S, R, D_use, D_ign, phi, x_out} (V None when memory-efficient,
           pred_x_inp and S None when n_iters == 1; with memory_efficient all entries but x_out
           are detached, for inspection; use memory_efficient=False to backprop through them).
    """

    def __init__(self, n_inp: int, n_out: int, d_inp: int, d_out: int, n_iters: int = 2, normalize: bool = True,
                 memory_efficient: bool = True, return_dict: bool = False, chunk_elements: Optional[int] = None):
        super().__init__()
        check_sizes(n_inp, n_out)
        check_dims(d_inp=d_inp, d_out=d_out, **({} if chunk_elements is None else {'chunk_elements': chunk_elements}))
        check_n_iters(n_iters)
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
        init_betas(self, n_inp, n_out, d_inp)
        self.register_buffer('CONST_ones_over_n_out', torch.ones(n_out) / n_out)     # [n_out]

    def extra_repr(self) -> str:
        return (f"n_inp={self.n_inp}, n_out={self.n_out}, d_inp={self.d_inp}, d_out={self.d_out}, "
                f"n_iters={self.n_iters}, normalize={self.normalize}, "
                f"memory_efficient={self.memory_efficient}, return_dict={self.return_dict}, "
                f"chunk_elements={self.chunk_elements}")

    @autocast_safe
    def forward(self, x_inp: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Intermediates]:
        n = check_sequence('x_inp', x_inp, self.n_inp, (self.d_inp,), ('d_inp',))
        check_dtype('x_inp', x_inp, self.W_A)
        batch_shape = x_inp.shape[:-2]
        if mask is not None:
            check_mask(mask, batch_shape, n, self.n_out)
        # 2. xs = x_inp n^(-1/2) with n each sample's true length, applied to products of x_inp (never materialised)
        scale = input_scale(mask, batch_shape, n, self.W_A.dtype)                  # float or [..., 1, 1]
        if self.memory_efficient:                                                   # the same steps, streamed
            x_out, out = streamed_routing(self, x_inp, mask, scale, diagnostics=self.return_dict)
            return self._output(x_out, {**out, 'V': None})

        x_inp = without_masked_inputs(x_inp, mask)                                 # [..., n, d_inp]
        beta_use, beta_ign = betas(self, x_inp)                                     # 1. [n_inp or ..., n, n_out]
        x_dot_W_A = (x_inp @ self.W_A[0] if self.n_inp == -1
                     else torch.einsum('...id,id->...i', x_inp, self.W_A))          # [..., n]
        a_inp, f_a = activations(x_dot_W_A, scale, self.B_A, mask)                 # 3-4. [..., n], [..., n, 1|n_out]
        # votes V[..., i, j, h] = sum_d xs[..., i, d] W_F1[j, d] W_F2[d, h] + B_F2[j, h]
        V = torch.einsum('...id,jd,dh->...ijh', x_inp * scale, self.W_F1, self.W_F2) + self.B_F2  # [..., n, n_out, d_out]

        pred = S = None
        for t in range(self.n_iters):
            # E-step: R = 1/n_out, then R = softmax_j(S), S = logsigma((x_inp . pred_j) W_S + B_S)
            if t == 0:
                R = initial_R(f_a, mask, self.n_out)                                # [..., n, n_out]
            else:
                pred = predict(x_out, self.W_G1, self.W_G2, self.B_G2)              # [..., n_out, d_inp]
                S = agreement(torch.einsum('...id,...jd->...ij', x_inp, pred), self.W_S, self.B_S)
                R = masked_softmax(S, mask)                                         # [..., n, n_out]
            # D-step: D_use = f_a R, D_ign = f_a - D_use; credit phi = beta_use D_use - beta_ign D_ign
            D_use, D_ign, phi = credit(R, f_a, beta_use, beta_ign)                 # [..., n, n_out]
            # M-step: x_out[..., j, h] = sum_i phi[..., i, j] V[..., i, j, h]
            x_out = torch.einsum('...ij,...ijh->...jh', phi, V)                      # [..., n_out, d_out]

        return self._output(x_out, {'a_inp': a_inp, 'V': V, 'pred_x_inp': pred, 'S': S, 'R': R,
                                    'D_use': D_use, 'D_ign': D_ign, 'phi': phi})

    def _output(self, x_out: torch.Tensor, intermediates: Intermediates) -> Union[torch.Tensor, Intermediates]:
        """x_out [..., n_out, d_out], layer-normalised if normalize; or the dict of intermediates with it."""
        x_out = layer_norm(x_out) if self.normalize else x_out
        return {**intermediates, 'x_out': x_out} if self.return_dict else x_out


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

    def __init__(self, A: nn.Module, F: nn.Module, G: nn.Module, S: nn.Module, n_inp: int, n_out: int,
                 n_iters: int = 2, return_dict: bool = False, d_inp: Optional[int] = None):
        super().__init__()
        check_sizes(n_inp, n_out)
        check_n_iters(n_iters)
        if d_inp is not None:
            check_dims(d_inp=d_inp)
        self.A, self.F, self.G, self.S = A, F, G, S
        self.n_inp, self.n_out, self.n_iters, self.return_dict = n_inp, n_out, n_iters, return_dict
        if n_inp == -1 and d_inp is None:
            first_linear = next((m for m in A.modules() if isinstance(m, nn.Linear)
                                 and not isinstance(m, nn.modules.lazy.LazyModuleMixin)), None)
            d_inp = None if first_linear is None else first_linear.in_features
        self.d_inp = d_inp
        init_betas(self, n_inp, n_out, d_inp)
        self.register_buffer('CONST_ones_over_n_out', torch.ones(n_out) / n_out)   # [n_out]

    @autocast_safe
    def forward(self, x_inp: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Intermediates]:
        n = check_sequence('x_inp', x_inp, self.n_inp, (self.d_inp,), ('d_inp',))
        batch_shape = x_inp.shape[:-2]
        if mask is not None:
            check_mask(mask, batch_shape, n, self.n_out)

        x_inp = without_masked_inputs(x_inp, mask)                                 # [..., n, d_inp]
        beta_use, beta_ign = betas(self, x_inp)                                    # [..., n, n_out]
        a_inp = self.A(x_inp).reshape(*batch_shape, n)                              # [..., n]
        V = self.F(x_inp)                                       # [..., n, n_out * d_out] or [..., n, n_out, d_out]
        if tuple(V.shape[:-1]) == (*batch_shape, n) and V.shape[-1] % self.n_out == 0:
            V = V.unflatten(-1, (self.n_out, V.shape[-1] // self.n_out))           # (unambiguous for a batch of 0)
        elif tuple(V.shape[:-1]) != (*batch_shape, n, self.n_out):
            raise ValueError(f"F(x_inp) must have shape [..., n, n_out * d_out] or [..., n, n_out, d_out] with "
                             f"[..., n] = {[*batch_shape, n]} and n_out = {self.n_out}, got {tuple(V.shape)}")
        f_a = torch.sigmoid(a_inp)[..., None]                                       # [..., n, 1]
        if mask is not None:
            f_a = f_a.masked_fill(mask, 0.0)                                        # [..., n, n_out]

        pred = S = None
        for t in range(self.n_iters):
            if t > 0:
                pred = self.G(x_out)                                                # [..., n_out, d_pred]
                S = self.S(x_inp, pred)                                             # [..., n, n_out]
            R = initial_R(f_a, mask, self.n_out) if S is None else masked_softmax(S, mask)
            D_use, D_ign, phi = credit(R, f_a, beta_use, beta_ign)                 # [..., n, n_out]
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

    def __init__(self, n_inp: int, n_out: int, d_cov: int, d_inp: int, d_out: int, n_iters: int = 3,
                 single_beta: bool = False, p_model: str = 'gaussian', eps: float = 1e-5, return_dict: bool = False):
        super().__init__()
        check_sizes(n_inp, 2 if n_out == -1 else n_out)
        check_dims(d_cov=d_cov, d_inp=d_inp, d_out=d_out)
        check_n_iters(n_iters)
        check_eps(eps)
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

    def extra_repr(self) -> str:
        return (f"n_inp={self.n_inp}, n_out={self.n_out}, d_cov={self.d_cov}, d_inp={self.d_inp}, "
                f"d_out={self.d_out}, n_iters={self.n_iters}, single_beta={self.single_beta}, "
                f"p_model={self.p_model!r}, eps={self.eps}, return_dict={self.return_dict}")

    @autocast_safe
    def forward(self, a_inp: torch.Tensor, mu_inp: torch.Tensor, mask: Optional[torch.Tensor] = None,
                n_out: Optional[int] = None) -> Union[tuple[torch.Tensor, torch.Tensor, torch.Tensor], Intermediates]:
        out = self._route(a_inp, mu_inp, mask, n_out)
        return out if self.return_dict else (out['a_out'], out['mu_out'], out['sig2_out'])

    def _biases(self, n_out: int) -> torch.Tensor:
        """B [m, n_out, d_cov, d_out]: the parameter, or (variable n_out) B[i, 0] + B_brk[0] t_j."""
        if self.n_out != -1:
            return self.B
        t = torch.linspace(-1, 1, n_out, dtype=self.B.dtype, device=self.B.device)  # [n_out]
        return self.B + self.B_brk * t[:, None, None]                                # [m, n_out, d_cov, d_out]

    def _check_inputs(self, a_inp, mu_inp, mask, n_out):
        """-> (n, batch shape, n_out) of valid inputs; one ValueError naming the argument otherwise."""
        n = check_sequence('mu_inp', mu_inp, self.n_inp, (self.d_cov, self.d_inp), ('d_cov', 'd_inp'))
        check_dtype('mu_inp', mu_inp, self.W)
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
            check_mask(mask, batch_shape, n, n_out)
        return n, batch_shape, n_out

    def _route(self, a_inp: torch.Tensor, mu_inp: torch.Tensor, mask: Optional[torch.Tensor],
               n_out: Optional[int]) -> Intermediates:
        """The EM loop (docs/equations.md, 2019): -> dict of every intermediate."""
        n, batch_shape, n_out = self._check_inputs(a_inp, mu_inp, mask, n_out)
        if mask is not None:
            # inputs masked for every output: their values (NaN included) never reach a sum
            a_inp = without_masked_inputs(a_inp[..., None], mask)[..., 0]          # [..., n]
            mu_inp = without_masked_inputs(mu_inp.flatten(-2), mask).reshape_as(mu_inp)  # [..., n, d_cov, d_inp]

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
                R = initial_R(f_a, mask, n_out)                                    # [..., n, n_out]
            else:
                sq_dist = (V - mu_out[..., None, :, :, :]) ** 2                    # [..., n, n_out, d_cov, d_out]
                if self.p_model == 'gaussian':
                    log_p = (-(sq_dist / (2 * sig2_out[..., None, :, :, :])).sum(dim=(-2, -1))
                             - 0.5 * torch.log(sig2_out).sum(dim=(-2, -1))[..., None, :])   # [..., n, n_out]
                else:
                    log_p = torch.log_softmax(-sq_dist.sum(dim=(-2, -1)), dim=-1)          # [..., n, n_out]
                R = masked_softmax(F.logsigmoid(a_out)[..., None, :] + log_p, mask)       # [..., n, n_out]
            # D-step, and the M-step's scores: a_out = sum_i (beta_use D_use - beta_ign D_ign)
            D_use, D_ign, phi = credit(R, f_a, self.beta_use, self.beta_ign)       # [..., n, n_out]
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

    def __init__(self, d_cov: int, d_inp: int, d_out: int, n_inp: int = -1, n_out: int = -1, n_iters: int = 3,
                 single_beta: bool = False, p_model: str = 'gaussian', eps: float = 1e-5, return_dict: bool = False):
        super().__init__(n_inp, n_out, d_cov, d_inp, d_out, n_iters=n_iters, single_beta=single_beta,
                         p_model=p_model, eps=eps, return_dict=return_dict)

    @autocast_safe
    def forward(self, a_inp: torch.Tensor, mu_inp: torch.Tensor, return_R: bool = False, n_out: Optional[int] = None,
                mask: Optional[torch.Tensor] = None) -> Union[tuple[torch.Tensor, ...], Intermediates]:
        out = self._route(a_inp, mu_inp, mask, n_out)
        if self.return_dict:
            return out
        result = (out['a_out'], out['mu_out'], out['sig2_out'])
        return (*result, out['R']) if return_R else result

