"""
Argument checks of the routing modules: one clear ValueError per kind of bad input, naming the argument with
the expected and the actual shape, dtype or value.
"""
import math
import numbers
from typing import Any, Optional, Sequence

import torch


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sizes(n_inp: Any, n_out: Any) -> None:
    if not (is_int(n_inp) and (n_inp == -1 or n_inp > 0)):
        raise ValueError(f"n_inp must be a positive int or -1 (variable length), got {n_inp!r}")
    if not (is_int(n_out) and n_out >= 2):
        raise ValueError(f"n_out must be an int >= 2, got {n_out!r}")


def check_n_iters(n_iters: Any) -> None:
    if not (is_int(n_iters) and n_iters >= 1):
        raise ValueError(f"n_iters must be an int >= 1, got {n_iters!r}")


def check_dims(**named_sizes: Any) -> None:
    """Each keyword (a size: d_inp=..., d_out=..., d_cov=...) must be a positive int (bool is not)."""
    for name, size in named_sizes.items():
        if not (is_int(size) and size > 0):
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def check_eps(eps: Any) -> None:
    """eps (a small constant added for stability) must be a positive finite number."""
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and 0 < eps < math.inf):
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def check_sequence(name: str, x: Any, n_inp: int, trailing: Sequence[Optional[int]],
                   trailing_names: Sequence[str]) -> int:
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


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for this device type (False for one that has no autocast: meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_dtype(name: str, x: torch.Tensor, param: torch.Tensor) -> None:
    """Outside autocast the input's dtype must equal the parameters' (no silent casts). Autocast
    casts float32 to its lower precision but leaves float64 alone, so float64 input to a module of
    lower precision is an error there too."""
    autocast = autocast_enabled(x.device.type)
    if x.dtype != param.dtype and not autocast:
        raise ValueError(f"{name} has dtype {x.dtype} but the module's parameters are {param.dtype}: "
                         f"cast the input (x.to({param.dtype})) or the module (module.to({x.dtype})), "
                         f"or run inside torch.autocast")
    if autocast and x.dtype == torch.float64 and param.dtype != torch.float64:
        low = torch.get_autocast_dtype(x.device.type)
        raise ValueError(f"{name} has dtype torch.float64 inside torch.autocast({x.device.type!r}, dtype={low}), "
                         f"which does not cast float64: expected float32, float16 or bfloat16 input "
                         f"(x.float()) under autocast, or a float64 module (module.double()) outside it")


def check_mask(mask: Any, batch_shape: torch.Size, n: int, n_out: int) -> None:
    """mask must be a bool tensor broadcastable to [*batch_shape, n, n_out]."""
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

