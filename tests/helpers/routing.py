"""Helpers of the routing tests (test_math, test_streamed_kernel, test_errors_library): an autouse seed fixture (import
it), relative closeness, gradients, functional calls for gradcheck, a DefinableVectorRouting that mirrors the
efficient one, and a dispatch mode that records which ops create tensors of given shapes."""
import pytest
import torch
import torch.nn as nn

from heinsen_routing import DefinableVectorRouting


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def grads_of(y, tensors):
    return torch.autograd.grad(y.square().sum(), tensors, allow_unused=True)


def assert_close_rel(a, b, rtol=1e-5, scale=None):
    """|a - b| <= rtol * scale, the scale by default max|b| (the tensor's)."""
    scale = b.abs().max().clamp(min=1e-30) if scale is None else scale
    assert (a - b).abs().max() <= rtol * scale, f"max abs diff {(a - b).abs().max():.3g} vs scale {scale:.3g}"


def chunk_elements_for(rows, batch_numel, d_inp, n_out):
    """EfficientVectorRouting(chunk_elements=...) that makes chunks of `rows` inputs of the whole batch (or, when one
    batch element alone fills such a chunk, of rows * batch_numel inputs of each element: streamed._pass_chunks)."""
    return rows * batch_numel * (d_inp + n_out)


def functional(module, mask=None):
    """f(x, *parameters) -> module(x, mask) with the given parameter tensors (for gradcheck)."""
    names = [name for name, _ in module.named_parameters()]
    return lambda x, *ps: torch.func.functional_call(module, dict(zip(names, ps)), (x,), {'mask': mask})


def definable_routing(n_out, d_inp, d_out):
    A, F_, G = nn.Linear(d_inp, 1), nn.Linear(d_inp, n_out * d_out), nn.Linear(d_out, d_inp)
    S = type('S', (nn.Module,), {'forward': lambda self, x, p: torch.einsum('...id,...jd->...ij', x, p)})()
    return DefinableVectorRouting(A, F_, G, S, n_inp=-1, n_out=n_out)


class ShapedTensors:
    """A TorchDispatchMode recording the out-of-place ops that make a tensor of one of the given shapes (view ops,
    such as one batch element's rows or the detach that stores .grad, allocate nothing and are not recorded)."""

    def __new__(cls, shapes):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if (not func._schema.name.endswith('_') and not func.is_view and torch.is_tensor(out)
                        and tuple(out.shape) in shapes):
                    self.created.append((tuple(out.shape), str(func)))
                return out

        mode = Mode()
        mode.created = []
        return mode
