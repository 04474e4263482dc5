"""
Forward+backward time and peak memory of EfficientVectorRouting (memory_efficient=True, "ours") against the
straightforward implementation of the equations (benchmarks/reference.py: plain autograd, which keeps every iteration's
[..., n, n_out] intermediates and the scaled copy of the input for backward) and, optionally, against our own
implementation at an earlier commit (--only ... before, --before COMMIT, extracted with git archive), on the same
parameters and inputs.

Configurations: KIND:BATCHxN[:FLAG...], KIND 'var' (n_inp = -1) or 'fixed' (n_inp = N), routing N inputs of size
--d_inp to --n_out outputs of size --d_out (defaults 1024 -> 100 x 1024), n_iters 2. Flags: 'frozen' (no input
gradient, as for a frozen backbone's hidden states), 'masked' (a random [N, n_out] mask shared by the batch, about
a quarter of the (input, output) pairs, no input masked for every output: the straightforward implementation takes
only such masks), 'iters3' (n_iters 3). The loss is <x_out, w> with a fixed random w; its gradients with respect to
the input (unless frozen) and to every parameter are computed.

Each measurement runs in a fresh process, so nothing held from an earlier measurement masks its memory:
  time    wall time of one forward+backward pass (the last of --passes in the process), median over --rounds
          processes; the rounds interleave the implementations. CPU time: the process's CPU time (all threads) of
          the same pass, and in brackets its system part (the kernel's: mostly page faults on fresh allocations).
          Load: the share of the machine's CPU time that other processes used during the timed pass
          (from /proc/stat less this process's own CPU time), the largest over the rounds.
  memory  before each pass the gradients of the input and of every parameter are set to None, freed memory is
          returned to the system (malloc_trim) and the peak is reset, so the pass starts with only the module and
          the input resident and every byte it allocates counts once:
            peak    CPU: the peak resident set size of the pass (VmHWM, reset through /proc/self/clear_refs) minus
                    the RSS at its start; CUDA: torch.cuda.max_memory_allocated minus the memory allocated at its start.
            grads   the bytes of the gradients the pass returns (the input's, unless frozen, and the parameters'),
                    which any implementation must hold at its end.
            beyond  peak - grads: what the computation needs beyond the gradients it returns. An implementation
                    that holds a gradient twice (one buffer per pass, summed) shows it here.
          After the warm-up each process may map at most --memory_limit_gib more (default: the memory free at the
          start less 4 GiB), so an implementation that does not fit fails with an allocation error and the table
          says so instead of the machine running out of memory.
  agreement  max over the output and all gradients of max|a - b| / max|b| against the straightforward
          implementation (the worst tensor named), in float32 (the timed runs) and in float64 (one more pass of
          each, skipped above --float64_max_rows inputs). Gradients of more than 4M entries are compared on every
          k-th entry.
  busy CPU  --busy K starts K processes (one thread each, a float32 matrix product in a loop) before the
          measurements and stops them after: the cores are shared, as on a laptop or a CI machine. The header
          states K; the load column shows what the timed passes shared the machine with.

    python -m benchmarks.routing                              # CPU, the default configurations, quiet
    python -m benchmarks.routing --busy 2                     # the same with two busy processes
    python -m benchmarks.routing --busy 2 --threads 1         # ...each implementation on one thread
    python -m benchmarks.routing --device cuda                # on a GPU
"""
import argparse
import ctypes
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.machine_load import cpu_busy_fraction, machine_cpu_seconds

DEFAULT_CONFIGS = ['var:1x100000', 'fixed:1x100000', 'var:8x10000', 'fixed:8x10000', 'var:1x100000:frozen',
                   'fixed:1x100000:frozen', 'var:1x100000:masked', 'fixed:1x100000:masked', 'var:1x100000:iters3',
                   'fixed:1x100000:iters3', 'var:1x1000000']
IMPLEMENTATIONS = ['straightforward', 'before', 'ours']
FLAGS = ('frozen', 'masked', 'iters3')
MAX_COMPARED = 1 << 22


def rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def parse_config(config):
    """'KIND:BATCHxN[:FLAG...]' -> (kind, batch, n, set of flags)"""
    kind, size, *flags = config.split(':')
    batch, n = map(int, size.split('x'))
    if kind not in ('var', 'fixed') or not set(flags) <= set(FLAGS):
        raise ValueError(f"configuration must be KIND:BATCHxN[:FLAG...] with KIND 'var' or 'fixed' and FLAGs "
                         f"among {FLAGS}, got {config!r}")
    return kind, batch, n, set(flags)


def config_label(config):
    kind, batch, n, flags = parse_config(config)
    words = [{'frozen': 'frozen input', 'masked': 'masked', 'iters3': 'n_iters 3'}[f] for f in FLAGS if f in flags]
    return ', '.join([f"{'variable' if kind == 'var' else 'fixed'} length, {batch} x {n:,}", *words])


def sample(t):
    """t flattened, every k-th entry so that at most MAX_COMPARED remain (the same for every implementation)."""
    t = t.detach().reshape(-1)
    return t[::max(1, t.numel() // MAX_COMPARED)].cpu().clone()


def worker(impl, config, args, dtype, out_path, source):
    """Runs in its own process: builds the routing, times forward+backward, records peak memory."""
    if source:                                                   # heinsen_routing of the earlier commit, in place
        sys.path.insert(0, source)                               # of the one this module imported at its start
        for name in [m for m in sys.modules if m == 'heinsen_routing' or m.startswith('heinsen_routing.')]:
            del sys.modules[name]
    from benchmarks.reference import straightforward_routing
    from heinsen_routing import EfficientVectorRouting

    kind, batch, n, flags = parse_config(config)
    frozen, n_iters = 'frozen' in flags, 3 if 'iters3' in flags else 2
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

    def build(n_inp):
        torch.manual_seed(0)
        return EfficientVectorRouting(n_inp, args.n_out, args.d_inp, args.d_out, n_iters=n_iters,
                                      chunk_elements=args.chunk_elements).to(device, dtype)

    def forward(module, x, mask=None):
        return straightforward_routing(module, x, mask) if impl == 'straightforward' else module(x, mask=mask)

    # warm-up on a tiny input: loads kernels and thread pools, which are not the computation's memory
    tiny = build(-1)
    forward(tiny, torch.randn(2, 64, args.d_inp, device=device, dtype=dtype)).sum().backward()
    del tiny
    if device == 'cpu':              # from here on, at most memory_limit_gib more address space
        with open('/proc/self/status') as f:
            mapped = next(int(line.split()[1]) for line in f if line.startswith('VmSize')) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + int(args.memory_limit_gib * 2 ** 30), resource.RLIM_INFINITY))

    module = build(n if kind == 'fixed' else -1)
    x = torch.randn(batch, n, args.d_inp, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    x.requires_grad_(not frozen)                                                     # [batch, n, d_inp]
    w = torch.randn(batch, args.n_out, args.d_out, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    mask = None
    if 'masked' in flags:                        # [n, n_out], a quarter masked, every input kept for some output
        mask = torch.rand(n, args.n_out, generator=torch.Generator().manual_seed(3)) < 0.25
        mask[:, 0] = False
        mask = mask.to(device)
    param_grad_bytes = sum(t.numel() * t.element_size() for t in module.parameters() if t.requires_grad)
    input_grad_bytes = 0 if frozen else x.numel() * x.element_size()

    def start_pass():
        """Frees the gradients, gives free heap memory back to the system and resets the peak:
        -> the memory in use now (the next pass's peak above it is what the pass needs; the
        libraries' code pages, touched by the earlier passes, no longer count)."""
        x.grad = None
        module.zero_grad(set_to_none=True)
        gc.collect()
        sync()
        if device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')                                          # resets the peak RSS (VmHWM)
        return rss_bytes()

    def peak_since_start():
        if device == 'cuda':
            return torch.cuda.max_memory_allocated()
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) * 1024

    times, cpu_times, sys_times, loads = [], [], [], []
    result = {}
    try:
        for _ in range(args.passes if dtype == torch.float32 else 1):
            base = start_pass()
            machine = machine_cpu_seconds()
            start, cpu_start, sys_start = time.perf_counter(), time.process_time(), os.times().system
            x_out = forward(module, x, mask)                                           # [batch, n_out, d_out]
            (x_out * w).sum().backward()
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            sys_times.append(os.times().system - sys_start)
            busy, total = (b - a for a, b in zip(machine, machine_cpu_seconds()))
            loads.append(max(0.0, busy - cpu_times[-1]) / max(total, 1e-9))         # the others' share
    except (RuntimeError, MemoryError) as error:
        message = str(error)
        result['error'] = (f"out of memory at the {args.memory_limit_gib:.1f} GiB limit"
                           if "can't allocate memory" in message or isinstance(error, MemoryError)
                           else message.splitlines()[0][:200])
    peak = peak_since_start()
    result.update(times=times, cpu_times=cpu_times, sys_times=sys_times, loads=loads, peak=peak - base,
                  grads=param_grad_bytes + input_grad_bytes, param_grads=param_grad_bytes,
                  extra=peak - base - param_grad_bytes - input_grad_bytes)
    if 'error' not in result:
        result['tensors'] = {'x_out': sample(x_out), **({} if x.grad is None else {'x.grad': sample(x.grad)}),
                             **{name: sample(p.grad) for name, p in module.named_parameters()}}
    torch.save(result, out_path)


def max_rel_diff(a, b):
    """-> '2.1e-06 (B_A)': max over shared tensors of max|a - b| / max|b|, and the worst tensor."""
    diffs = {k: ((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp(min=1e-30)).item()
             for k in b if k in a}
    worst = max(diffs, key=diffs.get)
    return f"{diffs[worst]:.1e} ({worst})"


def wait_for_idle(args):
    """Waits (at most --idle_wait_s) until other processes leave the CPU nearly idle, so that the
    timings compare the implementations and not the load of the machine. -> busy fraction seen last."""
    deadline = time.time() + args.idle_wait_s
    while (busy := cpu_busy_fraction()) > args.idle_threshold and time.time() < deadline:
        time.sleep(5)
    return busy


def measure(impl, config, args, dtype, tmp, source):
    out_path = os.path.join(tmp, f'{impl}-{dtype}.pt')
    if args.device == 'cpu' and args.idle_wait_s > 0:
        wait_for_idle(args)
    cmd = [sys.executable, '-m', 'benchmarks.routing', '--device', args.device, '--configs', config,
           '--passes', str(args.passes), '--n_out', str(args.n_out), '--d_inp', str(args.d_inp),
           '--d_out', str(args.d_out), '--worker', impl, dtype, out_path, source or '']
    if args.chunk_elements:
        cmd += ['--chunk_elements', str(args.chunk_elements)]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    proc = subprocess.run(cmd + ['--memory_limit_gib', str(args.memory_limit_gib)], capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out_path):
        last = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return {'error': f"exit {proc.returncode}: {last[:200]}"}
    result = torch.load(out_path, weights_only=True)                         # plain types and tensors
    os.remove(out_path)
    return result


def measure_rounds(impls, config, args, tmp, sources):
    """--rounds measurements of each implementation, interleaved (A B C A B C ...) so that a change in
    the machine's load affects all alike. -> {impl: {'times', 'cpu_times', 'sys_times': of the timed pass of each
    round, 'peak', 'extra': the largest, 'grads', 'param_grads', 'tensors': of the first round, 'load': the largest}}"""
    results = {impl: {'times': [], 'cpu_times': [], 'sys_times': [], 'extra': 0, 'peak': 0, 'load': 0.0}
               for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            r = results[impl]
            if 'error' in r:
                continue
            m = measure(impl, config, args, 'float32', tmp, sources.get(impl))
            if 'error' in m:
                r['error'] = m['error']
                r['extra'] = m.get('extra')                      # what it had reached when it failed
                continue
            r['times'].append(m['times'][-1])
            r['cpu_times'].append(m['cpu_times'][-1])
            r['sys_times'].append(m['sys_times'][-1])
            r['extra'], r['peak'] = max(r['extra'], m['extra']), max(r['peak'], m['peak'])
            r['grads'], r['param_grads'] = m['grads'], m['param_grads']
            r['load'] = max(r['load'], m['loads'][-1])
            r.setdefault('tensors', m['tensors'])
    return results


class BusyCores:
    """K processes, each a one-thread float32 matrix product in a loop, for the duration of a with block (each also
    stops when this process has ended, killed or not)."""

    SCRIPT = ("import os, torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nparent = os.getppid()\n"
              "while os.getppid() == parent:\n    a = (a @ a).clamp_(-1, 1)\n")

    def __init__(self, k):
        self.k, self.procs = k, []

    def __enter__(self):
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        self.procs = [subprocess.Popen([sys.executable, '-c', self.SCRIPT], env=env) for _ in range(self.k)]
        time.sleep(3 if self.k else 0)                           # torch imported, the loops running
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS,
                        help=f"KIND:BATCHxN[:FLAG...], KIND 'var' or 'fixed', FLAGs among {FLAGS}")
    parser.add_argument('--n_out', type=int, default=100)
    parser.add_argument('--d_inp', type=int, default=1024)
    parser.add_argument('--d_out', type=int, default=1024)
    parser.add_argument('--rounds', type=int, default=3,
                        help='measurements of each implementation (fresh processes, interleaved); the median time is reported')
    parser.add_argument('--passes', type=int, default=2, help='forward+backward passes per process; the last one is timed')
    parser.add_argument('--chunk_elements', type=int, default=None,
                        help="ours: EfficientVectorRouting(chunk_elements=...) (default: the device's)")
    parser.add_argument('--threads', type=int, default=None,
                        help="each measurement's torch threads (torch.set_num_threads in its process; default: torch's)")
    parser.add_argument('--busy', type=int, default=0, metavar='K',
                        help='keep the cores busy with K one-thread processes during the measurements')
    parser.add_argument('--idle_threshold', type=float, default=0.1,
                        help='before each measurement, wait until the CPU is at most this busy...')
    parser.add_argument('--idle_wait_s', type=float, default=0, help='...but no longer than this (0: do not wait)')
    parser.add_argument('--only', nargs='+', choices=IMPLEMENTATIONS, default=['straightforward', 'ours'])
    parser.add_argument('--before', default='91020ab', help='git commit of the earlier implementation (--only ... before)')
    parser.add_argument('--float64_max_rows', type=int, default=100_000,
                        help='run the float64 agreement check only up to this many inputs (batch x n)')
    parser.add_argument('--memory_limit_gib', type=float, default=None,
                        help='address space allowed to each measurement beyond the libraries (default: free memory - 4 GiB)')
    parser.add_argument('--worker', nargs=4, metavar=('IMPL', 'DTYPE', 'OUT', 'SOURCE'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, dtype, out_path, source = args.worker
        return worker(impl, args.configs[0], args, getattr(torch, dtype), out_path, source)
    if args.memory_limit_gib is None:
        with open('/proc/meminfo') as f:
            available = next(int(line.split()[1]) for line in f if line.startswith('MemAvailable')) * 1024
        args.memory_limit_gib = available / 2 ** 30 - 4

    device = torch.cuda.get_device_name() if args.device == 'cuda' else f'cpu ({os.cpu_count()} cores)'
    mib = lambda b: f"{b / 2 ** 20:,.0f}"                                          # noqa: E731
    print(f"device: {device}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, float32, "
          f"{args.d_inp} -> {args.n_out} x {args.d_out}, memory limit {args.memory_limit_gib:.1f} GiB, "
          f"busy processes {args.busy}" + (f", before = {args.before}" if 'before' in args.only else '') +
          f", load average at the start {os.getloadavg()[0]:.2f}; started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with_before = 'before' in args.only
    print(f"| configuration | implementation | time (s, median of {args.rounds}) | time / straightforward's | "
          + ("time / before | " if with_before else '') +
          "CPU time (s: all (system)) | peak above module+input (MiB) | gradients returned (MiB: parameters + input) | "
          "beyond gradients (MiB) | beyond / straightforward's | max rel diff float32 | max rel diff float64 | "
          "others' CPU share |")
    print("|---" * (12 + with_before) + "|")
    with tempfile.TemporaryDirectory() as tmp, BusyCores(args.busy):
        sources = {}
        if with_before:
            sources['before'] = os.path.join(tmp, 'before')
            os.makedirs(sources['before'])
            subprocess.run(f"git archive {args.before} heinsen_routing | tar -x -C {sources['before']}",
                           shell=True, check=True)
        for config in args.configs:
            kind, batch, n, flags = parse_config(config)
            label = config_label(config)
            f32 = measure_rounds(args.only, config, args, tmp, sources)
            f64 = {}
            if batch * n <= args.float64_max_rows:
                f64 = {impl: measure(impl, config, args, 'float64', tmp, sources.get(impl)) for impl in args.only}
            base, before = f32.get('straightforward', {}), f32.get('before', {})
            for impl, r in f32.items():
                if 'error' in r:
                    reached = '' if r.get('extra') is None else f"more than {mib(r['extra'])}"
                    print(f"| {label} | {impl} | failed: {r['error']} |" + " |" * (4 + with_before) +
                          f" {reached} |" + " |" * 4, flush=True)
                    continue
                seconds = statistics.median(r['times'])
                speed = vs_before = ratio = diff32 = diff64 = ''
                if impl != 'straightforward' and base.get('times') and 'error' not in base:
                    speed = f"{seconds / statistics.median(base['times']):.2f}"
                if impl != 'before' and before.get('times') and 'error' not in before:
                    vs_before = f"{seconds / statistics.median(before['times']):.2f}"
                if impl != 'straightforward' and base.get('extra') and 'error' in base:
                    ratio = f"< {r['extra'] / base['extra']:.3f}"     # the straightforward one needs more than it reached
                if impl == 'ours' and 'error' in base and before.get('tensors'):
                    diff32 = max_rel_diff(r['tensors'], before['tensors']) + ' vs before'
                if impl != 'straightforward' and base.get('times') and 'error' not in base:
                    ratio = f"{r['extra'] / base['extra']:.3f}"
                    diff32 = max_rel_diff(r['tensors'], base['tensors'])
                    if all('tensors' in f64.get(k, {}) for k in (impl, 'straightforward')):
                        diff64 = max_rel_diff(f64[impl]['tensors'], f64['straightforward']['tensors'])
                    elif batch * n > args.float64_max_rows:
                        diff64 = 'not run'
                cpu, system = statistics.median(r['cpu_times']), statistics.median(r['sys_times'])
                grads = f"{mib(r['grads'])} ({mib(r['param_grads'])} + {mib(r['grads'] - r['param_grads'])})"
                print(f"| {label} | {impl} | {seconds:.2f} | {speed} | " + (f"{vs_before} | " if with_before else '') +
                      f"{cpu:.2f} ({system:.2f}) | {mib(r['peak'])} | {grads} | {mib(r['extra'])} | {ratio} | {diff32} | "
                      f"{diff64} | {r['load']:.0%} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == '__main__':
    main()
