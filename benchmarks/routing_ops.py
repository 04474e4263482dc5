"""
Operators (aten calls, about one kernel launch each on a GPU) of one training step of the 2022 paper's routing head
(models.RoutingHead: forward, cross-entropy loss, backward) at the paper's real shapes, for the streamed routing
(memory_efficient=True) with the chunk size of each policy and for plain autograd (memory_efficient=False, over the
materialised votes). Counted on the meta device (shapes only, no data, no memory), so the sizes whose plain-autograd
step would need tens of GB still count:

    BEiT-large   batch 50, 197 positions x 25 depths of 1024 (ImageNet / CIFAR runs)
    SST          roberta-large, batch 50, 64 positions x 25 depths of 1024 (a batch of long SST sentences)
    IMDB         roberta-large, batch 5, 2,048 positions (four 512-token windows) x 25 depths of 1024

Chunk policies (EfficientVectorRouting(chunk_elements=...)):
    before        2^21 elements a chunk: before the chunk size per device, the only chunk size on every device
    cpu default   streamed.chunk_elements_for('cpu') (3 x 2^21 elements)
    gpu 24 GB     streamed.chunk_elements_for('cuda') with 20 GiB free (a 24 GB GPU running the frozen backbone)
The backbone's operators are the same for all and are not counted; neither is the optimizer step. Padding masks are
left out (on the meta device the streamed kernel cannot inspect a mask's values; a mask adds a few element-wise
operators per chunk). View operators (view, expand, transpose, slice, ...), which launch no kernel, are not counted.

    python -m benchmarks.routing_ops                  # prints the table (seconds, no GPU needed)
"""
import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from heinsen_replication import models
from heinsen_routing.streamed import _pass_chunks, chunk_elements_for

SHAPES = {'BEiT-large (batch 50, 197 x 25 x 1024)': (50, 197, 25, 1024, 1000),
          'SST (batch 50, 64 x 25 x 1024)': (50, 64, 25, 1024, 5),
          'IMDB (batch 5, 2,048 x 25 x 1024)': (5, 2048, 25, 1024, 2)}
GPU_FREE_BYTES = 20 * 2 ** 30


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


def step_operators(shape, memory_efficient, chunk_elements):
    """-> operators of one forward+backward of a RoutingHead on meta tensors of `shape`."""
    batch, n_pos, d_depth, d_emb, n_classes = shape
    head = models.RoutingHead(d_depth, d_emb, n_classes, chunk_elements=chunk_elements).to('meta')
    for routing in head.route:
        routing.memory_efficient = memory_efficient
    hidden = torch.empty(batch, n_pos, d_depth, d_emb, device='meta')             # [batch, n_pos, d_depth, d_emb]
    labels = torch.zeros(batch, dtype=torch.long, device='meta')
    with OperatorCount() as ops:
        scores = head(hidden)                                                    # [batch, n_classes]
        torch.nn.functional.cross_entropy(scores, labels).backward()
    return ops.count


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    policies = {'before': 2 ** 21, 'cpu default': chunk_elements_for('cpu', torch.float32),
                'gpu 24 GB': chunk_elements_for('cuda', torch.float32, free_bytes=GPU_FREE_BYTES)}
    print("| shape | implementation | chunk elements | chunks per pass (first routing) | operators per step | "
          "/ plain autograd's |")
    print("|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        batch, n_pos, d_depth, d_emb, _ = shape
        base = step_operators(shape, False, None)
        print(f"| {label} | plain autograd (memory_efficient=False) | | | {base:,} | 1.00 |")
        for policy, chunk_elements in policies.items():
            n_chunks = sum(len(chunks) for _, chunks in
                           _pass_chunks(torch.Size([batch]), n_pos * d_depth, d_emb + 64, chunk_elements))
            ops = step_operators(shape, True, chunk_elements)
            print(f"| {label} | ours, {policy} | {chunk_elements:,} | {n_chunks} | {ops:,} | {ops / base:.2f} |",
                  flush=True)


if __name__ == '__main__':
    main()
