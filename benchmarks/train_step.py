"""
Where the time of a head-training step goes: the paper-regime SST-5 run (`bash train_all_heads.sh paper-minilm`:
RoutingHead on the 7 depths of the frozen minilm, batch 50, features from the cache, mixup, RAdam + one cycle),
on this CPU. Builds the run with train.py's own stages (recipes.runs('paper-minilm') -> train.build_run), times
--steps steps of train.train_step after --warmup steps, split into the next batch of the training stream (cache
reads from the float16 memory map, collation) and the step itself (mixup, forward, loss, backward, optimizer):

It also counts the FLOPs of the head's forward and backward (torch.utils.flop_counter) on the same batches, lists
the operators that take the most time (torch.profiler), so a speed-up can be aimed where the time is, and, for a
--matmul_precision other than 'highest', how far the scores and gradients of real batches are from float32's.

    python -m benchmarks.train_step --matmul_precision medium --report benchmarks/train_step.md --label "..."

--report adds the tables, under --label, with how they were measured, to a benchmark log's record (benchmarks/train_step.md holds the
figures before and after the speed-ups).
"""
import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import train
from benchmarks.common import REPO_ROOT
from heinsen_replication import recipes
from heinsen_replication.settings import run_settings


def paper_minilm_args(args, output_dir):
    """train.py's arguments of the paper-minilm SST-5 run (recipes.py), on the CPU, in output_dir, at this command's
    matmul precision and threads."""
    argv = recipes.runs('paper-minilm', data_root=args.data_root, feature_cache=args.feature_cache)['sst5']
    return train.parse_args([*argv, '--output_dir', output_dir, '--device', 'cpu', '--matmul_precision',
                             args.matmul_precision, *(['--threads', str(args.threads)] if args.threads else [])])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data')
    p.add_argument('--feature_cache', default='.data/features', help='built first if empty (not timed)')
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--warmup', type=int, default=30)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own choice)')
    p.add_argument('--matmul_precision', default='highest', choices=['highest', 'high', 'medium'],
                   help="as train.py's (the paper-minilm profile uses medium)")
    p.add_argument('--report', default=None, help="add the tables as a section of this benchmark log's record "
                                                   "(benchmarks/train_step.md) and rewrite it")
    p.add_argument('--label', default='', help='heading of the added section')
    args = p.parse_args(argv)
    from benchmarks.common import finish_meta, measurement_meta, shown_command
    meta = measurement_meta(shown_command('benchmarks.train_step', argv if argv is not None else sys.argv[1:]),
                            f"float32, matmul precision {args.matmul_precision}")
    with tempfile.TemporaryDirectory() as output_dir:
        run_args = paper_minilm_args(args, output_dir)
        with run_settings(run_args):                     # the run's matmul precision, threads and seeds, as train.py's
            report = measure(train.build_run(run_args), args)
    print('\n' + report)
    if args.report:
        from benchmarks.reports import add_section
        add_section(os.path.relpath(os.path.abspath(args.report), REPO_ROOT), args.label, finish_meta(meta), report)


def measure(run, args):
    """Times --steps steps of train.train_step after --warmup, counts their FLOPs and profiles their operators.
    -> the markdown report."""
    run.head.train()

    def step():
        batch = next(run.batches)
        tick('batch')
        train.train_step(run, batch)
        tick('step')
        return batch[0].shape[1]

    seconds, n_pos, last = defaultdict(float), [], time.perf_counter()

    def tick(name):                                               # the time since the previous phase -> name
        nonlocal last
        now = time.perf_counter()
        seconds[name] += now - last
        last = now

    for _ in range(args.warmup):
        step()
    seconds.clear()
    started = last = time.perf_counter()
    for _ in range(args.steps):
        n_pos.append(step())
    total = time.perf_counter() - started
    timed = dict(seconds)                                         # the timed steps' phases (tick goes on below)

    with FlopCounterMode(display=False) as flops:                 # FLOPs of 20 steps' forward and backward
        for _ in range(20):
            step()
    gflop_per_step = flops.get_total_flops() / 20 / 1e9

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(30):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    prof_total = sum(e.self_cpu_time_total for e in prof.key_averages())

    lines = [f"SST-5, paper regime (batch 50), {args.steps} steps after {args.warmup}, {torch.get_num_threads()} "
             f"threads ({os.cpu_count()} cores), torch {torch.__version__}, matmul precision {args.matmul_precision}; "
             f"mean positions per batch {sum(n_pos) / len(n_pos):.1f}", '',
             '| phase | ms / step | share |', '|---|---|---|']
    for name, what in (('batch', 'the next batch (cache reads, collation)'),
                       ('step', 'train.train_step (mixup, forward, loss, backward, optimizer)')):
        lines.append(f"| {what} | {1000 * timed[name] / args.steps:.2f} | {100 * timed[name] / total:.0f}% |")
    lines += [f"| **step** | **{1000 * total / args.steps:.2f}** | **{args.steps / total:.2f} steps/s** |", '',
              f"Head forward + backward: {gflop_per_step:.2f} GFLOP / step (matrix products, flop_counter), "
              f"{gflop_per_step * args.steps / total:.1f} GFLOP/s over whole steps.", '',
              '| operator (torch.profiler, 30 steps) | self CPU ms / step | share |', '|---|---|---|']
    lines += [f"| {e.key} | {e.self_cpu_time_total / 1000 / 30:.2f} | {100 * e.self_cpu_time_total / prof_total:.0f}% |"
              for e in ops]
    if args.matmul_precision != 'highest':
        scores, grads = precision_gap(run.head, run.batches, args.matmul_precision)
        lines += ['', f"Against float32 ('highest') on 5 real batches: scores differ by at most {scores:.1e} (relative "
                  f"to their largest), gradients by at most {grads:.1e} (relative norm, worst parameter)."]
    return '\n'.join(lines)


def precision_gap(head, batches, precision, n_batches=5):
    """-> (max relative difference of the scores, of the gradients) between float32 matrix products and
    `precision`, on n_batches real batches (no mixup)."""
    worst_scores = worst_grads = 0.0
    for _ in range(n_batches):
        hidden, mask, labels = next(batches)
        out = {}
        for p in ('highest', precision):
            torch.set_float32_matmul_precision(p)
            head.zero_grad(set_to_none=True)
            scores = train.class_scores(head, hidden, mask)
            F.cross_entropy(scores, labels).backward()
            out[p] = scores.detach(), {k: v.grad.clone() for k, v in head.named_parameters() if v.grad is not None}
        (s0, g0), (s1, g1) = out['highest'], out[precision]
        worst_scores = max(worst_scores, ((s1 - s0).abs().max() / s0.abs().max()).item())
        gaps = [((g1[k] - g0[k]).norm() / g0[k].norm()).item() for k in g0 if g0[k].norm() > 0]
        worst_grads = max(worst_grads, *gaps)
    head.zero_grad(set_to_none=True)
    return worst_scores, worst_grads


if __name__ == '__main__':
    main()
