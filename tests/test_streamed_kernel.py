"""The streamed kernel (heinsen_routing/streamed.py, memory_efficient=True) on the CPU: exact against the readable
forward and tests/reference.py across chunk boundaries, with masks and under autocast; what it allocates (one
input-sized and one parameter-sized gradient buffer per forward, nothing of size n beyond them); its chunk size per
device; and the operators of a paper-shape head step. tests/test_streamed_devices.py runs it on each device, with
determinism, the tolerance between chunk sizes and the absence of global effects."""
import math

import pytest
import torch

from heinsen_routing import EfficientVectorRouting
from tests.helpers.routing import seed  # noqa: F401 (an autouse fixture)
from tests.helpers.routing import assert_close_rel, chunk_elements_for, functional, grads_of, ShapedTensors


# -------------------------------------------------------------------------------------------------
# Exact against the readable path
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n_inp', [-1, 30])
def test_memory_efficient_and_materialised_agree_values_and_grads(n_inp):
    # Chunks of 7 inputs (the last one 2), so the chunked forward/backward is exercised across boundaries.
    module = EfficientVectorRouting(n_inp, 5, 8, 6, n_iters=3, chunk_elements=chunk_elements_for(7, 2, 8, 5)).double()
    x = torch.randn(2, 30, 8, dtype=torch.double, requires_grad=True)
    mask = torch.rand(2, 30, 5) < 0.2
    mask[0, 3] = True
    params = [x] + list(module.parameters())
    outputs, grads = [], []
    for memory_efficient in (True, False):
        module.memory_efficient = memory_efficient
        for m in (None, mask):
            y = module(x, mask=m)
            outputs.append(y)
            grads.append(grads_of(y, params))
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outputs[1], outputs[3], rtol=1e-10, atol=1e-12)
    for g_eff, g_mat in zip(grads[:2], grads[2:]):
        for a, b in zip(g_eff, g_mat):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('n_iters', [1, 2, 3])
@pytest.mark.parametrize('masked', [None, 'whole inputs', 'pairs'])
@pytest.mark.parametrize('frozen_input', [False, True])
def test_variable_length_kept_beta_exact_and_a_second_backward_too(n_iters, masked, frozen_input):
    """With a variable length the first pass keeps one beta block for the later passes and the backwards (beta_0 when
    the first R is uniform: no mask, or one of whole inputs; beta_ign with a mask of (input, output) pairs): the
    outputs and gradients equal the materialised path's, with and without an input gradient, and a second backward
    of the same graph (retain_graph=True) gives them again."""
    module = EfficientVectorRouting(-1, 5, 8, 6, n_iters=n_iters, chunk_elements=chunk_elements_for(7, 2, 8, 5)).double()
    x = torch.randn(2, 30, 8, dtype=torch.double, requires_grad=not frozen_input)
    mask = {None: None, 'whole inputs': torch.rand(2, 30, 1) < 0.3, 'pairs': torch.rand(2, 30, 5) < 0.3}[masked]
    params = ([] if frozen_input else [x]) + list(module.parameters())
    module.memory_efficient = False
    y_expected = module(x, mask=mask)
    expected = torch.autograd.grad(y_expected.square().sum(), params, allow_unused=True)
    module.memory_efficient = True
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask=mask), y_expected, rtol=1e-10, atol=1e-12)
    loss = module(x, mask=mask).square().sum()
    for _ in range(2):
        for a, b in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), expected):
            assert (a is None) == (b is None)                # n_iters 1: no E-step parameters in the graph
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_long_sequence_in_chunks_matches_single_chunk():
    module = EfficientVectorRouting(-1, 3, 4, 4).double()
    x = torch.randn(1000, 4, dtype=torch.double, requires_grad=True)
    y_default = module(x)                                        # one chunk
    g_default = grads_of(y_default, [x] + list(module.parameters()))
    module.chunk_elements = chunk_elements_for(300, 1, 4, 3)     # chunks of 300, 300, 300, 100 inputs
    y_chunked = module(x)
    torch.testing.assert_close(y_chunked, y_default)
    for a, b in zip(grads_of(y_chunked, [x] + list(module.parameters())), g_default):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('n_inp', [-1, 9])
@pytest.mark.parametrize('mask_shape', [None, (9, 1), (2, 1, 9, 4), (3, 9, 4)])
@pytest.mark.parametrize('frozen_input', [False, True])
def test_batch_elements_streamed_one_after_the_other_match_the_whole_batch(n_inp, mask_shape, frozen_input):
    """When each batch element alone fills a chunk, a pass streams the elements one after the other, each in chunks
    of its own rows (_pass_chunks): values and gradients equal those of one chunk of the whole batch, with masks
    that broadcast over some batch dims and the input frozen or not."""
    from heinsen_routing.streamed import _pass_chunks
    batch, n, d, n_out = (2, 3), 9, 4, 4
    module = EfficientVectorRouting(n_inp, n_out, d, 5, n_iters=3).double()
    x = torch.randn(*batch, n, d, dtype=torch.double, requires_grad=not frozen_input)
    mask = None if mask_shape is None else torch.rand(mask_shape) < 0.3
    tensors = [x] * (not frozen_input) + list(module.parameters())
    y_whole = module(x, mask=mask)                                  # one chunk of the whole batch
    g_whole = grads_of(y_whole, tensors)
    module.chunk_elements = 4 * (d + n_out)                          # chunks of 4, 4 and 1 inputs of one element
    chunks = [(0, 4), (4, 8), (8, 9)]
    assert _pass_chunks(x.shape[:-2], n, d + n_out, module.chunk_elements) == \
        [((i, j), chunks) for i in range(2) for j in range(3)]
    y = module(x, mask=mask)
    torch.testing.assert_close(y, y_whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(y, tensors), g_whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('n_inp', [-1, 7])
@pytest.mark.parametrize('batch_shape, rows', [((), 1), ((), 3), ((2, 2), 2)])
@pytest.mark.parametrize('masks', ['partial', 'whole inputs', None])
def test_gradcheck_streamed_across_chunk_boundaries_with_masks(n_inp, batch_shape, rows, masks):
    """Every recomputed path of backward (betas from the input or per-input rows, a_inp, logits, the
    per-input rows of W_A, B_A, W_S, B_S; at t = 0 with R = 1/n_out the merged beta_0 when no mask
    or only whole inputs are masked) against finite differences, with chunks that split the sequence
    (1, 2 or 3 inputs each), masks, a padding input and leading batch dims."""
    chunk_elements = chunk_elements_for(rows, math.prod(batch_shape), 4, 3)
    module = EfficientVectorRouting(n_inp, 3, 4, 2, n_iters=3, chunk_elements=chunk_elements).double()
    x = torch.randn(*batch_shape, 7, 4, dtype=torch.double, requires_grad=True)
    mask = None
    if masks is not None:
        mask = torch.rand(*batch_shape, 7, 3 if masks == 'partial' else 1) < 0.25
        mask[..., 5, :] = True                               # an input masked for every output
    params = [p.detach().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradcheck(functional(module, mask), (x, *params), fast_mode=bool(batch_shape))


@pytest.mark.parametrize('n_inp', [-1, 256])
@pytest.mark.parametrize('rows, chunk_shape', [(32, (64, 6)), (160, (2, 160, 6))], ids=['per element', 'whole batch'])
def test_streamed_keeps_nothing_of_size_n_but_the_gradients(n_inp, rows, chunk_shape):
    """Neither forward nor backward creates a [..., n, *] tensor (betas, logits, R, phi, their
    gradients, a second gradient buffer): only chunks of inputs, [..., n_out, *] sums, and the one
    gradient buffer of the input and of each per-input parameter; also x . W_A, the same at every iteration, and its
    gradient summed over the passes ([..., n] scalars, 1/d_inp of the input), and with n_inp = -1 the one beta block
    that the first pass keeps for the others ([..., n, n_out], n_out/d_inp of the input), made once. Views (of the
    input, of a batch element) allocate nothing and are not counted. Chunks of each batch element on its own (64 of
    its inputs) or of the whole batch (160 inputs of both)."""
    from torch.overrides import TorchFunctionMode

    class RecordShapes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.shapes += [(*t.shape, t.dtype) for t in (out if isinstance(out, (tuple, list)) else [out])
                            if torch.is_tensor(t) and t._base is None]
            return out

    n, n_out, d = 256, 4, 6
    module = EfficientVectorRouting(n_inp, n_out, d, 5, n_iters=3, chunk_elements=chunk_elements_for(rows, 2, d, n_out))
    x = torch.randn(2, n, d, requires_grad=True)
    mask = torch.zeros(2, n, 1, dtype=torch.bool)
    mask[1, 200:] = True
    with RecordShapes() as recorded:
        module(x, mask=mask).square().sum().backward()
    allowed = {(*x.shape, x.dtype)} | {(*p.shape, p.dtype) for p in module.parameters()}
    allowed.add((2, n, torch.bool))                          # which inputs the mask leaves (for n^(-1/2))
    allowed.add((2, n, x.dtype))                             # x . W_A and its gradient
    kept_beta = (2, n, n_out, x.dtype)
    if n_inp < 0:
        allowed.add(kept_beta)
        assert recorded.shapes.count(kept_beta) == 1
    assert {s for s in recorded.shapes if n in s} <= allowed
    assert (*chunk_shape, x.dtype) in recorded.shapes       # the chunks were seen (the copies of the masked ones)


@pytest.mark.parametrize('dtype, rtol', [(torch.bfloat16, 0.1), (torch.float16, 0.05)])
@pytest.mark.parametrize('n_inp', [-1, 23])
def test_streamed_and_materialised_under_autocast_agree_with_float32(dtype, rtol, n_inp):
    """Under autocast both settings are within the low precision's error of the float32 result,
    outputs (the tolerance of the autocast test above) and every gradient, relative to the tensor's
    largest entry; with n_inp = -1 the scalar B_A's gradient is a sum over inputs that nearly cancels, so its
    error is relative to the sum of its terms' magnitudes, sum_i |d loss / d a_inp_i|."""
    module = EfficientVectorRouting(n_inp, 4, 16, 8, memory_efficient=False, chunk_elements=chunk_elements_for(5, 2, 16, 4))
    x = torch.randn(2, 23, 16, requires_grad=True)
    mask = torch.zeros(2, 23, 1, dtype=torch.bool)
    mask[1, 17:] = True
    w = torch.randn(2, 4, 8)                                 # loss <y, w> (|y|^2 is constant after N(.))

    def run():
        y = module(x, mask=mask).float()
        return y, torch.autograd.grad((y * w).sum(), [x, *module.parameters()])

    y_ref, g_ref = run()
    scales = [None] * len(g_ref)                             # assert_close_rel's default: the tensor's max|g|
    if n_inp < 0:
        module.return_dict = True
        out = module(x, mask=mask)
        module.return_dict = False
        d_a_inp, = torch.autograd.grad((out['x_out'] * w).sum(), out['a_inp'])
        scales[1 + [name for name, _ in module.named_parameters()].index('B_A')] = d_a_inp.abs().sum()
    for memory_efficient in (True, False):
        module.memory_efficient = memory_efficient
        with torch.autocast('cpu', dtype=dtype):
            y, grads = run()
        assert (y - y_ref).abs().max() < 0.1
        for g, g32, scale in zip(grads, g_ref, scales):
            assert g.dtype == g32.dtype and torch.isfinite(g).all()
            assert_close_rel(g, g32, rtol=rtol, scale=scale)


def test_streamed_return_dict_equals_materialised_across_chunks():
    module = EfficientVectorRouting(-1, 4, 6, 5, n_iters=3, return_dict=True,
                                    chunk_elements=chunk_elements_for(3, 2, 6, 4)).double()
    x = torch.randn(2, 11, 6, dtype=torch.double)
    mask = torch.rand(2, 11, 4) < 0.2
    streamed = module(x, mask=mask)
    module.memory_efficient = False
    materialised = module(x, mask=mask)
    assert streamed['V'] is None
    for k in ('a_inp', 'pred_x_inp', 'S', 'R', 'D_use', 'D_ign', 'phi', 'x_out'):
        torch.testing.assert_close(streamed[k], materialised[k], msg=k)


def test_double_backward_of_streamed_routing_raises_naming_the_alternative():
    module = EfficientVectorRouting(-1, 3, 4, 2).double()
    x = torch.randn(2, 6, 4, dtype=torch.double, requires_grad=True)
    # gradient penalty: || d output / d x ||^2, then backward through it
    g, = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r'memory_efficient=False'):
        g.square().sum().backward()
    # with respect to the parameters only (Hessian-vector products of the loss)
    grads = torch.autograd.grad(module(x.detach()).square().sum(), list(module.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match=r'memory_efficient=False'):
        torch.autograd.grad(sum(v.square().sum() for v in grads), list(module.parameters()))


@pytest.mark.parametrize('n_inp', [-1, 6])
def test_gradgradcheck_materialised(n_inp):
    module = EfficientVectorRouting(n_inp, 3, 4, 2, memory_efficient=False).double()
    x = torch.randn(2, 6, 4, dtype=torch.double, requires_grad=True)
    mask = torch.zeros(2, 6, 3, dtype=torch.bool)
    mask[1, 4:] = True
    params = [p.detach().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradgradcheck(functional(module, mask), (x, *params), fast_mode=True)


# -------------------------------------------------------------------------------------------------
# What it allocates
# -------------------------------------------------------------------------------------------------

def test_streamed_backward_allocates_one_input_sized_gradient():
    """The passes of all iterations share one gradient buffer for the input (none allocates its own), so the
    memory above the input and its gradient does not grow with n_iters * n."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class InputSizedTensors(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.created = shape, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func._schema.name.endswith('_') and torch.is_tensor(out) and out.shape == self.shape:
                self.created.append(str(func))                    # an out-of-place op made an input-sized tensor
            return out

    routing = EfficientVectorRouting(n_inp=-1, n_out=4, d_inp=8, d_out=8, n_iters=3, chunk_elements=64)
    x = torch.randn(2, 50, 8, requires_grad=True)
    loss = routing(x).square().sum()
    with InputSizedTensors(x.shape) as mode:
        loss.backward()
    assert mode.created == ['aten.zeros_like.default', 'aten.detach.default'], mode.created   # the buffer, x.grad


@pytest.mark.parametrize('n_iters', [2, 3])
@pytest.mark.parametrize('masked', [False, True])
def test_fixed_length_parameter_gradients_use_one_buffer_per_forward(n_iters, masked):
    """Fixed n_inp: the per-input parameters' gradients ([n_inp, *]) get one buffer each for the whole forward,
    shared by its passes (as the input's gradient), not one per pass summed by autograd; they equal plain autograd's."""
    n, n_out, d = 40, 4, 8
    routing = EfficientVectorRouting(n, n_out, d, 6, n_iters=n_iters, chunk_elements=chunk_elements_for(7, 3, d, n_out))
    routing = routing.double()
    x = torch.randn(3, n, d, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, n, 1) < 0.2) if masked else None
    per_input = {name: p for name, p in routing.named_parameters() if p.shape[0] == n}   # W_A, B_A, beta_*, W_S, B_S
    assert sorted(per_input) == ['B_A', 'B_S', 'W_A', 'W_S', 'beta_ign', 'beta_use']
    shapes = {tuple(p.shape) for p in per_input.values()} | {tuple(x.shape)}
    loss = routing(x, mask=mask).square().sum()
    with ShapedTensors(shapes) as mode:
        loss.backward()
    made = sorted(mode.created)
    expected = sorted([(tuple(t.shape), 'aten.zeros_like.default') for t in (x, *per_input.values())])
    assert made == expected, made
    grads = {name: p.grad.clone() for name, p in routing.named_parameters()}
    routing.zero_grad(set_to_none=True)
    routing.memory_efficient = False
    routing(x, mask=mask).square().sum().backward()
    for name, p in routing.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_fixed_length_parameter_gradients_accumulate_over_steps():
    """The shared buffers are per forward: a second forward+backward without zero_grad adds to .grad, as autograd."""
    routing = EfficientVectorRouting(20, 3, 6, 4, chunk_elements=chunk_elements_for(6, 2, 6, 3)).double()
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    routing(x).square().sum().backward()
    once = {name: p.grad.clone() for name, p in routing.named_parameters()}
    routing(x).square().sum().backward()
    for name, p in routing.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=name)


def test_single_iteration_leaves_the_unused_e_step_parameters_without_gradient():
    """n_iters = 1 never reads W_S and B_S: as with plain autograd they get no gradient (not a zero buffer)."""
    for memory_efficient in (True, False):
        routing = EfficientVectorRouting(10, 3, 6, 4, n_iters=1, memory_efficient=memory_efficient)
        routing(torch.randn(2, 10, 6)).sum().backward()
        assert routing.W_S.grad is None and routing.B_S.grad is None and routing.W_A.grad is not None


# -------------------------------------------------------------------------------------------------
# Chunk size per device, and operators
# -------------------------------------------------------------------------------------------------

def test_chunk_policy_per_device():
    """chunk_elements=None: a fixed number of bytes per device type, in elements of the parameters' dtype: 24 MiB on a
    CPU (3 x 2^21 float32, 3 x 2^20 float64 elements) and on other devices but CUDA, 1.5 GiB on CUDA (3 x 2^27
    float32), so that the paper's largest head inputs (BEiT-large: 197 positions x 25 depths of 1024 at batch 50;
    IMDB: 2,048 positions x 25 depths at batch 5; routed to 64) are one chunk there. On a CPU BEiT's batch elements
    (5,358,400 elements each) do not fill a chunk alone, so the chunks hold inputs of all 50."""
    from heinsen_routing.streamed import _pass_chunks, chunk_elements_for
    assert chunk_elements_for('cpu', torch.float32) == 3 * 2 ** 21
    assert chunk_elements_for('cpu', torch.float64) == 3 * 2 ** 20
    assert chunk_elements_for('meta', torch.float32) == 3 * 2 ** 21
    assert chunk_elements_for('cuda', torch.float32) == chunk_elements_for(torch.device('cuda', 1), torch.float32) \
        == 3 * 2 ** 27
    assert chunk_elements_for('cuda', torch.float64) == 3 * 2 ** 26
    n, batch, row = 197 * 25, torch.Size([50]), 1024 + 64
    [(index, chunks)] = _pass_chunks(batch, n, row, chunk_elements_for('cpu', torch.float32))
    assert index == () and len(chunks) == 43 and chunks[0] == (0, 115)                    # 115 inputs a chunk
    assert _pass_chunks(batch, n, row, chunk_elements_for('cuda', torch.float32)) == [((), [(0, n)])]
    n, batch = 2048 * 25, torch.Size([5])                                                 # IMDB
    assert _pass_chunks(batch, n, row, chunk_elements_for('cuda', torch.float32)) == [((), [(0, n)])]


def test_chunk_elements_none_picks_the_device_default(monkeypatch):
    """The module's default (None) asks chunk_elements_for at forward time, with the input's device and dtype;
    an explicit chunk_elements overrides it. On the meta device (no compute) the CPU policy applies."""
    import heinsen_routing.streamed as streamed
    seen = []
    real = streamed._chunks
    monkeypatch.setattr(streamed, '_chunks', lambda *args: seen.append(args[-1]) or real(*args))
    routing = EfficientVectorRouting(-1, 4, 16, 8, n_iters=2).to('meta')
    assert routing.chunk_elements is None
    routing(torch.empty(3, 1000, 16, device='meta', requires_grad=True)).sum().backward()
    assert seen == [3 * 2 ** 21] * 4                                         # two passes forward, two backward
    seen.clear()
    routing.chunk_elements = 5000
    routing(torch.empty(3, 1000, 16, device='meta')).sum()
    assert seen == [5000] * 2
    assert 'chunk_elements=5000' in repr(routing)


def test_routing_head_exposes_the_chunk_size():
    from heinsen_replication import models
    head = models.RoutingHead(3, 8, 2, n_hid=4, chunk_elements=300)
    assert [r.chunk_elements for r in head.route] == [300] * 3
    hidden = torch.randn(2, 5, 3, 8)
    scores = head(hidden)
    head.set_chunk_elements(None)
    assert [r.chunk_elements for r in head.route] == [None] * 3
    torch.testing.assert_close(head(hidden), scores)
    with pytest.raises(ValueError, match="chunk_elements must be a positive int, got 0"):
        head.set_chunk_elements(0)


@pytest.mark.slow
def test_paper_head_on_a_gpu_launches_at_most_twice_the_straightforward_operators():
    """At BEiT-large's real shapes (batch 50, 197 x 25 x 1024) a training step of the streamed head with the CUDA
    default chunk (the whole sequence in one chunk) runs at most 2x the operators of plain autograd, where chunks of
    2^21 elements ran over 30x (counted on the meta device: no compute)."""
    from benchmarks.routing_ops import SHAPES, step_operators
    from heinsen_routing.streamed import chunk_elements_for
    shape = SHAPES['BEiT-large (batch 50, 197 x 25 x 1024)']
    straightforward = step_operators(shape, False, None)
    on_gpu = step_operators(shape, True, chunk_elements_for('cuda', torch.float32))
    assert on_gpu <= 2 * straightforward
    assert step_operators(shape, True, 2 ** 21) > 30 * straightforward
