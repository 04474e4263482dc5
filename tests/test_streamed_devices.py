"""The streamed kernel (memory_efficient=True) on each device: against the readable path (memory_efficient=False) in
float64 and float32, with masks, batches, a frozen input and the kept beta block, across chunk boundaries and with
the device's default chunk; the same call twice gives bit-identical outputs and gradients; results of different
chunk sizes agree within the tolerance docs/library.md states; and a forward+backward reads no file and changes no
process-global setting. Every test runs on the CPU and, where one is present, on a CUDA device (skipped without)."""
import builtins
import io
import os

import pytest
import torch

from heinsen_routing import EfficientVectorRouting
from heinsen_routing.streamed import chunk_elements_for as default_chunk_elements
from tests.helpers.routing import seed  # noqa: F401 (an autouse fixture)
from tests.helpers.routing import assert_close_rel, chunk_elements_for

CUDA = pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'))
DEVICES = ['cpu', CUDA]
# the many-case tests: on the CPU in the slow tier (tests/test_streamed_kernel.py covers the CPU in the fast one)
DEVICES_CPU_SLOW = [pytest.param('cpu', marks=pytest.mark.slow), CUDA]
MASKS = [None, 'whole inputs', 'pairs']

# The tolerance between chunk sizes that docs/library.md states (float32; relative to each tensor's largest entry, and
# for the scalar B_A of a variable length to the sum of its terms' magnitudes), and float64's.
CHUNK_RTOL = {torch.float32: {'x_out': 1e-5, 'grads': 1e-4}, torch.float64: {'x_out': 1e-12, 'grads': 1e-11}}


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """float32 products in full precision (no TF32 on CUDA) during each test, as torch's default; restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    yield
    torch.set_float32_matmul_precision(before)


def make_inputs(device, dtype, n_inp, masked, frozen, batch=(2,), n=30, d=8, n_out=5, n_iters=3):
    """-> (module, x, mask, w): a routing of n inputs of d to n_out outputs of 6, an input [*batch, n, d], a mask of
    the given kind (an input of the first sample masked for every output, a padding tail in the last) and the
    weights w of the loss <x_out, w>."""
    module = EfficientVectorRouting(n_inp, n_out, d, 6, n_iters=n_iters).to(device, dtype)
    x = torch.randn(*batch, n, d, dtype=dtype).to(device).requires_grad_(not frozen)
    mask = None
    if masked == 'whole inputs':
        mask = torch.rand(*batch, n, 1) < 0.2
    elif masked == 'pairs':
        mask = torch.rand(*batch, n, n_out) < 0.3
        mask.view(-1, n, n_out)[0, 3] = True
    if mask is not None:
        mask.view(-1, *mask.shape[-2:])[-1, n - 4:] = True
        mask = mask.to(device)
    w = torch.randn(*batch, n_out, 6, dtype=dtype).to(device)
    return module, x, mask, w


def forward_backward(module, x, mask, w):
    """-> {'x_out': ..., 'x': its gradient (unless frozen), parameter name: its gradient}"""
    module.zero_grad(set_to_none=True)
    x.grad = None
    y = module(x, mask=mask)
    (y * w).sum().backward()
    return {'x_out': y.detach(), **({} if x.grad is None else {'x': x.grad}),
            **{name: p.grad for name, p in module.named_parameters() if p.grad is not None}}


def b_a_scale(module, x, mask, w):
    """sum_i |d loss / d a_inp_i|: the scale of the error of B_A's gradient when B_A is one scalar (a variable
    length), a sum over the inputs that nearly cancels (from the readable path's a_inp)."""
    memory_efficient, return_dict = module.memory_efficient, module.return_dict
    module.memory_efficient, module.return_dict = False, True
    out = module(x.detach(), mask=mask)
    module.memory_efficient, module.return_dict = memory_efficient, return_dict
    d_a_inp, = torch.autograd.grad((out['x_out'] * w).sum(), out['a_inp'])
    return d_a_inp.abs().sum()


def assert_within(got, expected, rtol, scales=None):
    """Each tensor of got within rtol['x_out'] (the output) or rtol['grads'] (gradients) of expected's, relative to
    its largest entry or to scales[name]."""
    assert got.keys() == expected.keys()
    for name in expected:
        scale = (scales or {}).get(name)
        tol = rtol['x_out'] if name == 'x_out' else rtol['grads']
        assert_close_rel(got[name], expected[name], rtol=tol, scale=scale)


@pytest.mark.parametrize('device', DEVICES_CPU_SLOW)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('n_inp', [-1, 30])
@pytest.mark.parametrize('masked', MASKS)
@pytest.mark.parametrize('frozen', [False, True])
@pytest.mark.parametrize('chunking', ['default', 'chunks of the batch', 'each element on its own'])
def test_streamed_matches_the_readable_path(device, dtype, n_inp, masked, frozen, chunking):
    """Outputs and gradients (input, unless frozen, and every parameter) of the streamed kernel equal the readable
    path's, with a batch of 2 x 3 sequences: float64 to 1e-9, float32 to 1e-5 (outputs) and 1e-4 (gradients) of each
    tensor's largest entry, B_A's of a variable length to 1e-4 of the sum of its terms' magnitudes. n_inp = -1, 3
    iterations: the first pass keeps a beta block for the others. Chunks: the device's default (one chunk here), 7
    inputs of every sequence, or 4 inputs of each sequence on its own."""
    module, x, mask, w = make_inputs(device, dtype, n_inp, masked, frozen, batch=(2, 3))
    module.chunk_elements = {'default': None, 'chunks of the batch': chunk_elements_for(7, 6, 8, 5),
                             'each element on its own': chunk_elements_for(4, 1, 8, 5)}[chunking]
    streamed = forward_backward(module, x, mask, w)
    module.memory_efficient = False
    readable = forward_backward(module, x, mask, w)
    if dtype == torch.float64:
        assert_within(streamed, readable, {'x_out': 1e-9, 'grads': 1e-9})
    else:
        scales = {'B_A': b_a_scale(module, x, mask, w)} if n_inp < 0 else None
        assert_within(streamed, readable, {'x_out': 1e-5, 'grads': 1e-4}, scales)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype, rtol', [(torch.bfloat16, 0.1), (torch.float16, 0.05)])
def test_streamed_under_autocast_is_near_float32(device, dtype, rtol):
    """Under autocast the streamed kernel's outputs and gradients are within the low precision's error of float32's,
    and come back in float32."""
    module, x, mask, w = make_inputs(device, torch.float32, -1, 'pairs', False)
    expected = forward_backward(module, x, mask, w)
    with torch.autocast(device, dtype=dtype):
        got = forward_backward(module, x, mask, w)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in got.values())
    assert (got['x_out'] - expected['x_out']).abs().max() < 0.1
    scales = {'B_A': b_a_scale(module, x, mask, w)}
    assert_within({k: v for k, v in got.items() if k != 'x_out'}, {k: v for k, v in expected.items() if k != 'x_out'},
                  {'grads': rtol}, scales)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('n_inp', [-1, 30])
@pytest.mark.parametrize('chunk_elements', [None, chunk_elements_for(4, 1, 8, 5)], ids=['default', 'small'])
def test_the_same_call_twice_is_bit_identical(device, n_inp, chunk_elements):
    """Two forward+backward passes of the same module on the same input give bit-identical outputs and gradients
    (the default chunk depends on nothing that changes between calls)."""
    module, x, mask, w = make_inputs(device, torch.float32, n_inp, 'pairs', False, batch=(2, 3))
    module.chunk_elements = chunk_elements
    first = {k: v.clone() for k, v in forward_backward(module, x, mask, w).items()}
    second = forward_backward(module, x, mask, w)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('n_inp, masked', [(-1, None), (-1, 'pairs'), (60, 'whole inputs')])
def test_chunk_sizes_agree_within_the_documented_tolerance(device, dtype, n_inp, masked):
    """Chunks of 1 and 7 inputs of each sequence and one chunk of everything sum in different orders: their
    outputs and gradients agree within CHUNK_RTOL (docs/library.md; B_A of a variable length relative to the sum of
    its terms' magnitudes). 2 x 60 inputs of 64 routed to 16 x 6."""
    module, x, mask, w = make_inputs(device, dtype, n_inp, masked, False, n=60, d=64, n_out=16, n_iters=2)
    row = 64 + 16
    results = {}
    for rows in (1, 7, 1000):
        module.chunk_elements = rows * row                                 # each sequence on its own, or (1000) one chunk
        results[rows] = {k: v.clone() for k, v in forward_backward(module, x, mask, w).items()}
    scales = {'B_A': b_a_scale(module, x, mask, w)} if n_inp < 0 else None
    for rows in (1, 7):
        assert_within(results[rows], results[1000], CHUNK_RTOL[dtype], scales)


@pytest.mark.parametrize('device', DEVICES)
def test_the_default_chunk_is_the_device_types(device, monkeypatch):
    """chunk_elements=None takes chunk_elements_for(the input's device type, the parameters' dtype): 3 x 2^27 float32
    elements on CUDA, 3 x 2^21 elsewhere, whatever the memory free."""
    import heinsen_routing.streamed as streamed
    seen = []
    real = streamed._chunks
    monkeypatch.setattr(streamed, '_chunks', lambda *args: seen.append(args[-1]) or real(*args))
    module, x, mask, w = make_inputs(device, torch.float32, -1, None, False, n_iters=2)
    forward_backward(module, x, mask, w)
    expected = 3 * 2 ** 27 if device == 'cuda' else 3 * 2 ** 21
    assert default_chunk_elements(device, torch.float32) == expected and seen == [expected] * 4


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('n_inp', [-1, 30])
def test_forward_and_backward_read_no_file_and_set_no_global_state(device, n_inp, monkeypatch):
    """A forward+backward of the streamed kernel (and with return_dict) calls neither torch.set_num_threads nor
    torch.set_num_interop_threads, asks no device for its free memory, and opens no file (builtins.open, io.open,
    os.open); torch's thread count is what it was."""
    module, x, mask, w = make_inputs(device, torch.float32, n_inp, 'pairs', False)
    module.chunk_elements = chunk_elements_for(4, 2, 8, 5)
    forward_backward(module, x, mask, w)                                 # warm-up: kernels loaded, pools made
    calls = []

    def spy(name):
        def called(*args, **kwargs):
            calls.append((name, args))
            raise AssertionError(f"the library called {name}{args}")
        return called

    for target, name in ((torch, 'set_num_threads'), (torch, 'set_num_interop_threads'), (builtins, 'open'),
                         (io, 'open'), (os, 'open'), (torch.cuda, 'mem_get_info')):
        monkeypatch.setattr(target, name, spy(f"{target.__name__}.{name}"))
    threads = torch.get_num_threads()
    for chunk_elements in (None, module.chunk_elements):
        module.chunk_elements = chunk_elements
        forward_backward(module, x, mask, w)
        module.return_dict = True
        module(x, mask=mask)['x_out'].sum().backward()
        module.return_dict = False
    monkeypatch.undo()
    assert calls == [] and torch.get_num_threads() == threads
