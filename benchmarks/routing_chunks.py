"""
How much the results of EfficientVectorRouting (memory_efficient=True) depend on the chunk size: a chunk size sets the
order in which the kernel sums over the inputs, so different chunk sizes give results that differ in their low bits.
For each configuration and dtype, one forward+backward per chunk size (loss <x_out, w>, w fixed and random; the
gradients of the input and of every parameter), each compared with the same call in one chunk of the whole input:
max|a - b| / max|b| of the output, the largest over the gradients but B_A's (the worst named), and B_A's. With a
variable length B_A is one scalar whose gradient is a sum over every input that nearly cancels, so its difference is
also given relative to the sum of its terms' magnitudes, sum_i |d loss / d a_inp_i| (from the readable path, where
that is small enough to build: --scale_max_rows). Also: whether the same call twice gave bit-identical results.

Configurations: KIND:BATCHxN:D_INPxN_OUTxD_OUT[:masked], KIND 'var' (n_inp = -1) or 'fixed' (n_inp = N), n_iters
2; 'masked': a random [BATCH, N, N_OUT] mask, about a quarter of the pairs. Chunk sizes: 'input' (one input a chunk),
an int (elements), 'cpu' and 'cuda' (the defaults, streamed.chunk_elements_for).

    python -m benchmarks.routing_chunks                      # the table docs/library.md quotes (CPU)
    python -m benchmarks.routing_chunks --device cuda        # the same on a GPU
"""
import argparse
import os
import time

import torch

from heinsen_routing import EfficientVectorRouting
from heinsen_routing.streamed import chunk_elements_for

DEFAULT_CONFIGS = ['var:2x2000:64x16x32:masked', 'fixed:2x2000:64x16x32:masked', 'var:1x100000:1024x100x1024',
                   'fixed:1x100000:1024x100x1024']
DEFAULT_CHUNKS = ['input', '1000', '262144', 'cpu', 'cuda']


def parse_config(config):
    """'KIND:BATCHxN:D_INPxN_OUTxD_OUT[:masked]' -> (kind, batch, n, d_inp, n_out, d_out, masked)"""
    kind, size, dims, *flags = config.split(':')
    batch, n = map(int, size.split('x'))
    d_inp, n_out, d_out = map(int, dims.split('x'))
    if kind not in ('var', 'fixed') or flags not in ([], ['masked']):
        raise ValueError(f"configuration must be KIND:BATCHxN:D_INPxN_OUTxD_OUT[:masked] with KIND 'var' or "
                         f"'fixed', got {config!r}")
    return kind, batch, n, d_inp, n_out, d_out, bool(flags)


def chunk_size(chunk, d_inp, n_out, dtype):
    """A chunk size of the command line -> chunk_elements."""
    if chunk == 'input':
        return d_inp + n_out
    if chunk in ('cpu', 'cuda'):
        return chunk_elements_for(chunk, dtype)
    return int(chunk)


def forward_backward(module, x, mask, w):
    """-> {'x_out', 'x' (the input's gradient), parameter name: gradient}, copied to the CPU"""
    module.zero_grad(set_to_none=True)
    x.grad = None
    y = module(x, mask=mask)
    (y * w).sum().backward()
    return {'x_out': y.detach().cpu(), 'x': x.grad.cpu(),
            **{name: p.grad.cpu() for name, p in module.named_parameters() if p.grad is not None}}


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300)).item()


def b_a_scale(module, x, mask, w):
    """sum_i |d loss / d a_inp_i| from the readable path (memory_efficient=False, return_dict=True)."""
    module.memory_efficient, module.return_dict = False, True
    out = module(x.detach(), mask=mask)
    module.memory_efficient, module.return_dict = True, False
    d_a_inp, = torch.autograd.grad((out['x_out'] * w).sum(), out['a_inp'])
    return d_a_inp.abs().sum().item()


def measure(config, chunks, dtype, device, scale_max_rows, max_chunks):
    """-> rows of the table for one configuration and dtype"""
    kind, batch, n, d_inp, n_out, d_out, masked = parse_config(config)
    torch.manual_seed(0)
    module = EfficientVectorRouting(n if kind == 'fixed' else -1, n_out, d_inp, d_out).to(device, dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n, d_inp, generator=generator, dtype=dtype).to(device).requires_grad_()
    w = torch.randn(batch, n_out, d_out, generator=generator, dtype=dtype).to(device)
    mask = (torch.rand(batch, n, n_out, generator=generator) < 0.25).to(device) if masked else None
    module.chunk_elements = batch * n * (d_inp + n_out)                            # one chunk of everything
    reference = forward_backward(module, x, mask, w)
    identical = all(torch.equal(a, b) for a, b in zip(reference.values(), forward_backward(module, x, mask, w).values()))
    scale = b_a_scale(module, x, mask, w) if kind == 'var' and batch * n <= scale_max_rows else None
    rows = []
    for chunk in chunks:
        module.chunk_elements = chunk_size(chunk, d_inp, n_out, dtype)
        inputs = max(1, module.chunk_elements // (d_inp + n_out))                  # of the batch, or of an element
        if inputs >= batch * n:
            rows.append((config, dtype, chunk, module.chunk_elements, 'one chunk: the reference', None))
            continue
        if batch * n / inputs > max_chunks:
            rows.append((config, dtype, chunk, module.chunk_elements, f'not run: over {max_chunks:,} chunks a pass',
                         None))
            continue
        start = time.perf_counter()
        got = forward_backward(module, x, mask, w)
        seconds = time.perf_counter() - start
        grads = {k: rel_diff(got[k], reference[k]) for k in reference if k not in ('x_out', 'B_A')}
        worst = max(grads, key=grads.get)
        b_a = rel_diff(got['B_A'], reference['B_A'])
        b_a_of_terms = ('' if scale is None else
                        f"{(got['B_A'].double() - reference['B_A'].double()).abs().max().item() / scale:.1e}")
        rows.append((config, dtype, chunk, module.chunk_elements, '',
                     (rel_diff(got['x_out'], reference['x_out']), grads[worst], worst, b_a, b_a_of_terms, seconds)))
    return rows, identical


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS)
    parser.add_argument('--chunks', nargs='+', default=DEFAULT_CHUNKS,
                        help="'input', an int (elements), 'cpu' or 'cuda' (the defaults)")
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'float64'], choices=['float32', 'float64'])
    parser.add_argument('--scale_max_rows', type=int, default=4000,
                        help="B_A's sum of magnitudes only up to this many inputs (it builds the votes)")
    parser.add_argument('--max_chunks', type=int, default=5000, help='skip chunk sizes that make more chunks a pass')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    name = torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} cores'
    print(f"device: {args.device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, float32 "
          f"matmul precision {torch.get_float32_matmul_precision()}, load average at the start "
          f"{os.getloadavg()[0]:.2f}; started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| configuration | dtype | chunk | chunk elements | x_out | gradients but B_A (worst) | B_A | "
          "B_A / sum of its terms' magnitudes | s (forward+backward) |")
    print("|---" * 9 + "|")
    identical = {}
    for config in args.configs:
        for dtype in args.dtypes:
            rows, identical[config, dtype] = measure(config, args.chunks, getattr(torch, dtype), args.device,
                                                     args.scale_max_rows, args.max_chunks)
            for config_, dtype_, chunk, elements, note, diffs in rows:
                cells = [config_, str(dtype_).replace('torch.', ''), chunk, f'{elements:,}']
                if diffs is None:
                    cells += [f'({note})', '', '', '', '']
                else:
                    x_out, grad, worst, b_a, b_a_of_terms, seconds = diffs
                    cells += [f'{x_out:.1e}', f'{grad:.1e} ({worst})', f'{b_a:.1e}', b_a_of_terms, f'{seconds:.2f}']
                print('| ' + ' | '.join(cells) + ' |', flush=True)
    same = [f"{c} {d}" for (c, d), ok in identical.items() if ok]
    differ = [f"{c} {d}" for (c, d), ok in identical.items() if not ok]
    print(f"\nThe same call twice (one chunk), bit-identical outputs and gradients: {', '.join(same) or 'none'}"
          + (f"; NOT bit-identical: {', '.join(differ)}" if differ else '') +
          f".\nload average at the end {os.getloadavg()[0]:.2f}; finished "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == '__main__':
    main()
