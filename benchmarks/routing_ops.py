"""
Operators (aten calls, about one kernel launch each on a GPU) of one training step of the 2022 paper's routing head
(models.RoutingHead: forward, cross-entropy loss, backward) at the paper's real shapes, for the streamed routing
(memory_efficient=True) with the chunk size of each policy and for plain autograd (memory_efficient=False, over the
materialised votes). By default counted on the meta device (shapes only, no data, no memory), so the sizes whose
plain-autograd step would need tens of GB still count:

    BEiT-large   batch 50, 197 positions x 25 depths of 1024 (ImageNet / CIFAR runs)
    SST          roberta-large, batch 50, 64 positions x 25 depths of 1024 (a batch of long SST sentences)
    IMDB         roberta-large, batch 5, 2,048 positions (four 512-token windows) x 25 depths of 1024

Chunk policies (EfficientVectorRouting(chunk_elements=...)):
    2^21          2^21 elements a chunk (the only chunk size on every device, before the chunk size per device)
    cpu default   streamed.chunk_elements_for('cpu', float32): 3 x 2^21 elements
    cuda default  streamed.chunk_elements_for('cuda', float32): 3 x 2^27 elements
The backbone's operators are the same for all and are not counted; neither is the optimizer step. Padding masks are
left out (on the meta device the streamed kernel cannot inspect a mask's values; a mask adds a few element-wise
operators per chunk). View operators (view, expand, transpose, slice, ...), which launch no kernel, are not counted.

--device cuda (or cpu) runs the same steps on real random tensors: it counts their operators (the same counts as on
the meta device) and adds the median wall time of --repeats steps (after one warm-up step; synchronised) and the
peak memory of a step (torch.cuda.max_memory_allocated above the memory allocated before it; CUDA only). A step
that does not fit says so. --scale tiny: the same head at toy sizes (to check this script on a CPU).

    python -m benchmarks.routing_ops                              # the counts (seconds, no GPU needed)
    python -m benchmarks.routing_ops --device cuda                # counts, ms per step and memory on a GPU
"""
import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from heinsen_replication import models
from heinsen_routing.streamed import _pass_chunks, chunk_elements_for

SHAPES = {'BEiT-large (batch 50, 197 x 25 x 1024)': (50, 197, 25, 1024, 1000),
          'SST (batch 50, 64 x 25 x 1024)': (50, 64, 25, 1024, 5),
          'IMDB (batch 5, 2,048 x 25 x 1024)': (5, 2048, 25, 1024, 2)}
TINY_SHAPES = {'tiny (batch 3, 5 x 4 x 16)': (3, 5, 4, 16, 3)}
POLICIES = {'2^21': 2 ** 21, 'cpu default': chunk_elements_for('cpu', torch.float32),
            'cuda default': chunk_elements_for('cuda', torch.float32)}


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators that run, less those that only make a view (no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        self.count += not is_view
        return func(*args, **(kwargs or {}))


def build_step(shape, memory_efficient, chunk_elements, device='meta'):
    """-> step(): one forward+backward of a RoutingHead on tensors of `shape` (random on a real device)."""
    batch, n_pos, d_depth, d_emb, n_classes = shape
    torch.manual_seed(0)
    head = models.RoutingHead(d_depth, d_emb, n_classes, chunk_elements=chunk_elements).to(device)
    for routing in head.route:
        routing.memory_efficient = memory_efficient
    hidden = (torch.empty if device == 'meta' else torch.randn)(batch, n_pos, d_depth, d_emb, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)          # hidden: [batch, n_pos, d_depth, d_emb]

    def step():
        head.zero_grad(set_to_none=True)
        scores = head(hidden)                                                    # [batch, n_classes]
        torch.nn.functional.cross_entropy(scores, labels).backward()
    return step


def step_operators(shape, memory_efficient, chunk_elements, device='meta'):
    """-> operators of one forward+backward of a RoutingHead on tensors of `shape`."""
    step = build_step(shape, memory_efficient, chunk_elements, device)
    with OperatorCount() as ops:
        step()
    return ops.count


def timed_step(shape, memory_efficient, chunk_elements, device, repeats):
    """-> (operators, median seconds of a step, peak bytes of a step above the memory before it (CUDA; else None)),
    or the first line of the error of a step that does not fit."""
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    try:
        step = build_step(shape, memory_efficient, chunk_elements, device)
        step()                                                                   # warm-up
        sync()
        if device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() - start_bytes if device == 'cuda' else None
        with OperatorCount() as ops:
            step()
        return ops.count, statistics.median(seconds), peak
    except (RuntimeError, MemoryError) as error:                                 # torch.OutOfMemoryError included
        return str(error).splitlines()[0][:120]
    finally:
        step = None
        if device == 'cuda':
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='meta', choices=['meta', 'cpu', 'cuda'],
                        help='meta: count only; cpu, cuda: also time each step on random tensors')
    parser.add_argument('--scale', default='full', choices=['full', 'tiny'])
    parser.add_argument('--repeats', type=int, default=5, help='timed steps per row (real devices)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    shapes = SHAPES if args.scale == 'full' else TINY_SHAPES
    timed = args.device != 'meta'
    if timed:
        name = torch.cuda.get_device_name() if args.device == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
        print(f"device: {args.device} ({name}), torch {torch.__version__}, float32, median of {args.repeats} steps "
              f"after one warm-up\n")
    print("| shape | implementation | chunk elements | chunks per pass (first routing) | operators per step | "
          "/ plain autograd's |" + (" ms per step | peak memory of a step (GiB) |" if timed else ''))
    print("|---" * (6 + 2 * timed) + "|")
    for label, shape in shapes.items():
        batch, n_pos, d_depth, d_emb, _ = shape
        rows = [('plain autograd (memory_efficient=False)', False, None)]
        rows += [(f'ours, {policy}', True, chunk_elements) for policy, chunk_elements in POLICIES.items()]
        base = step_operators(shape, False, None)
        for implementation, memory_efficient, chunk_elements in rows:
            n_chunks = '' if chunk_elements is None else sum(
                len(chunks) for _, chunks in _pass_chunks(torch.Size([batch]), n_pos * d_depth, d_emb + 64,
                                                          chunk_elements))
            cells = [label, implementation, '' if chunk_elements is None else f'{chunk_elements:,}', n_chunks]
            if not timed:
                ops = step_operators(shape, memory_efficient, chunk_elements)
                cells += [f'{ops:,}', f'{ops / base:.2f}']
            else:
                result = timed_step(shape, memory_efficient, chunk_elements, args.device, args.repeats)
                if isinstance(result, str):
                    cells += ['', '', f'failed: {result}', '']
                else:
                    ops, seconds, peak = result
                    cells += [f'{ops:,}', f'{ops / base:.2f}', f'{seconds * 1000:.1f}',
                              '' if peak is None else f'{peak / 2 ** 30:.2f}']
            print('| ' + ' | '.join(map(str, cells)) + ' |', flush=True)


if __name__ == '__main__':
    main()
