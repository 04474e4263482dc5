"""
Forward+backward wall time and peak memory of EfficientVectorRouting (memory_efficient=True)
versus a straightforward implementation of the spec (benchmarks/straightforward.py, which keeps every
iteration's [n, n_out] intermediates for backward), on the same parameters and inputs, batch 1.

Each measurement runs in a fresh process. CPU: peak resident set size of that process (ru_maxrss),
and the part of it above the RSS just before the first forward pass (torch, parameters and the input
already loaded). CUDA: torch.cuda.max_memory_allocated. Outputs and parameter gradients of the two
implementations are compared, max over tensors of max|a - b| / max|b|: in float32 (the timed runs;
differences are float32 rounding, largest for the ill-conditioned gradient of the scalar B_A, a sum
over all n inputs that nearly cancels) and in float64 (one more run of each), where the two
computations must agree to ~1e-12.

    python -m benchmarks.routing                      # CPU, the three default configurations
    python -m benchmarks.routing --device cuda --configs 2000:1000:1024:2048 1000000:100:1024:1024
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_CONFIGS = ['2000:1000:1024:2048', '10000:1000:1024:2048', '100000:100:1024:1024']
IMPLEMENTATIONS = ['straightforward', 'ours']


def rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def worker(impl, config, device, repeats, dtype, out_path):
    """Runs in its own process: builds the routing, times fwd+bwd, records peak memory."""
    from benchmarks.straightforward import straightforward_routing
    from heinsen_routing import EfficientVectorRouting

    n, n_out, d_inp, d_out = map(int, config.split(':'))
    torch.manual_seed(0)
    module = EfficientVectorRouting(-1, n_out, d_inp, d_out).to(device, dtype)
    x = torch.randn(1, n, d_inp, generator=torch.Generator().manual_seed(1)).to(device, dtype)   # [1, n, d_inp]
    forward = (lambda: module(x)) if impl == 'ours' else (lambda: straightforward_routing(module, x))
    # loss = <x_out, w> with a fixed random w (a layer-normalised x_out has constant squared norm)
    w = torch.randn(1, n_out, d_out, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mib()
    times = []
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        x_out = forward()                                        # [1, n_out, d_out]
        (x_out * w).sum().backward()
        sync()
        times.append(time.perf_counter() - start)
    if device == 'cuda':
        peak, above = torch.cuda.max_memory_allocated() / 2 ** 20, None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10   # KiB on Linux
        above = peak - rss_before
    torch.save({'times': times, 'peak': peak, 'above': above, 'x_out': x_out.detach().cpu(),
                'grads': {k: p.grad.cpu() for k, p in module.named_parameters()}}, out_path)


def max_rel_diff(a, b):
    """-> (max over output and gradients of max|a - b| / max|b|, name of the worst tensor)"""
    pairs = {'x_out': (a['x_out'], b['x_out']), **{k: (a['grads'][k], b['grads'][k]) for k in a['grads']}}
    diffs = {k: ((u - v).abs().max() / v.abs().max().clamp(min=1e-30)).item() for k, (u, v) in pairs.items()}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def measure(impl, config, device, repeats, dtype, tmp):
    out_path = os.path.join(tmp, f'{impl}-{dtype}.pt')
    cmd = [sys.executable, '-m', 'benchmarks.routing', '--device', device, '--configs', config,
           '--repeats', str(repeats), '--worker', impl, dtype, out_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{impl} {config} {dtype} failed:\n{proc.stderr}", file=sys.stderr)
        return None
    return torch.load(out_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS, help='n_inp:n_out:d_inp:d_out, batch 1')
    parser.add_argument('--repeats', type=int, default=3, help='fwd+bwd passes; the median time is reported')
    parser.add_argument('--only', choices=IMPLEMENTATIONS, help='measure one implementation (e.g. when the other does not fit)')
    parser.add_argument('--no-float64-check', action='store_true', help='skip the float64 agreement runs')
    parser.add_argument('--worker', nargs=3, metavar=('IMPL', 'DTYPE', 'OUT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, dtype, out_path = args.worker
        return worker(impl, args.configs[0], args.device, args.repeats, getattr(torch, dtype), out_path)

    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} cores'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, fwd+bwd, batch 1, n_iters 2, float32")
    memory = 'max allocated' if args.device == 'cuda' else 'peak RSS (above inputs)'
    print(f"| n_inp -> n_out (d_inp -> d_out) | implementation | time (s, median of {args.repeats}) | {memory} MiB "
          f"| memory ratio | max rel diff float32 | max rel diff float64 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            impls = [args.only] if args.only else IMPLEMENTATIONS
            f32 = {impl: measure(impl, config, args.device, args.repeats, 'float32', tmp) for impl in impls}
            f64 = {} if args.no_float64_check or args.only else {
                impl: measure(impl, config, args.device, 1, 'float64', tmp) for impl in impls}
            n, n_out, d_inp, d_out = config.split(':')
            base = f32.get('straightforward')
            for impl, r in f32.items():
                if r is None:
                    continue
                mem = f"{r['peak']:.0f}" + ('' if r['above'] is None else f" ({r['above']:.0f})")
                ratio = diff32 = diff64 = ''
                if base and impl != 'straightforward':
                    ratio = f"{r['peak'] / base['peak']:.2f}"
                    if r['above'] is not None:
                        ratio += f" ({r['above'] / base['above']:.2f})"
                    diff32 = '%.1e (%s)' % max_rel_diff(r, base)
                    if f64.get(impl) and f64.get('straightforward'):
                        diff64 = '%.1e (%s)' % max_rel_diff(f64[impl], f64['straightforward'])
                print(f"| {int(n):,} -> {int(n_out):,} ({d_inp} -> {d_out}) | {impl} | "
                      f"{statistics.median(r['times']):.3f} | {mem} | {ratio} | {diff32} | {diff64} |", flush=True)


if __name__ == '__main__':
    main()
