"""
Every CUDA figure the docs promise, in one command, for whoever has a GPU: about 9 minutes on one H100 (each part has
a time limit, and the parts left when the total limit is reached are skipped and said so). Writes one folder:

    OUT/summary.md            the device, torch, the commit, and each part's command, exit status and seconds
    OUT/tests.txt             the CUDA tests (tests/test_streamed_devices.py and tests/test_gpu_paper_path.py, -k cuda)
    OUT/routing.md            benchmarks.routing on CUDA: ours against the straightforward implementation, and
                              1,000,000 x 1024 inputs (ours only: the straightforward one needs 400 GB of votes)
    OUT/routing_ops.md        benchmarks.routing_ops --device cuda: operators, ms and memory per step of the paper's
                              head at the paper's shapes, per chunk policy
    OUT/routing_chunks.md     benchmarks.routing_chunks --device cuda: the differences between chunk sizes
    OUT/full_scale_smoke.md   benchmarks.full_scale_smoke --device cuda: roberta-large and BEiT-large (random weights)
                              through train.py with the paper's settings, and 300 steps of the CIFAR-10 run

    python -m benchmarks.gpu_check --out gpu_check_records             # on a machine with a CUDA device
    python -m benchmarks.gpu_check --device cpu --scale tiny --out DIR   # the same parts at toy sizes on a CPU
                                                                        # (checks this script, measures nothing)
Without a CUDA device, `--device cuda` (the default) stops at once with exit status 2.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

from benchmarks import REPO_ROOT

TEST_FILES = ['tests/test_streamed_devices.py', 'tests/test_gpu_paper_path.py']


def parts(device, scale, out):
    """[(name, output file, argv of `python -m ...`, time limit in seconds)], in the order they run."""
    tiny = scale == 'tiny'
    routing = (['--configs', 'var:1x300', 'fixed:1x300', 'var:1x300:frozen', '--d_inp', '32', '--n_out', '8',
                '--d_out', '16', '--rounds', '1', '--passes', '2'] if tiny else
               ['--configs', 'var:1x20000', 'fixed:1x20000', 'var:1x20000:frozen', 'var:1x20000:masked',
                'var:8x2500', 'var:1x100000', 'fixed:1x100000', 'var:1x1000000',
                '--rounds', '1', '--passes', '3', '--float64_max_rows', '20000'])
    chunks = (['--configs', 'var:2x100:16x4x8:masked', 'fixed:1x100:16x4x8', '--chunks', 'input', 'cpu']
              if tiny else [])
    smoke = (['--scale', 'tiny', '--steps', '1', '--batch_sz', '4', '--work', os.path.join(out, 'full_scale')]
             if tiny else ['--steps', '2', '--cifar_steps', '300'])
    return [
        ('tests', 'tests.txt', ['pytest', '-q', '-rs', '-p', 'no:cacheprovider', *TEST_FILES, '-k', 'cuda'], 180),
        ('routing', 'routing.md', ['benchmarks.routing', '--device', device, *routing], 200),
        ('routing_ops', 'routing_ops.md', ['benchmarks.routing_ops', '--device', device,
                                           *(['--scale', 'tiny', '--repeats', '2'] if tiny else [])], 120),
        ('routing_chunks', 'routing_chunks.md', ['benchmarks.routing_chunks', '--device', device, *chunks], 90),
        ('full_scale_smoke', 'full_scale_smoke.log', ['benchmarks.full_scale_smoke', '--device', device, *smoke,
                                                      '--report', os.path.join(out, 'full_scale_smoke.md')], 330),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='the folder of the records (made if missing)')
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--scale', default='full', choices=['full', 'tiny'])
    parser.add_argument('--total_limit_s', type=float, default=570,
                        help='skip the parts that would start after this many seconds')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device is available (torch.cuda.is_available() is False): run it on a "
              "machine with a GPU, or with --device cpu --scale tiny to check the script", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip() or 'unknown'
    device = torch.cuda.get_device_name() if args.device == 'cuda' else f'cpu ({os.cpu_count()} cores)'
    summary = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
               f"Device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}; commit {commit}; "
               f"scale {args.scale}.\n", '| part | command | exit status | seconds | record |', '|---|---|---|---|---|']
    started, failed = time.time(), 0
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
           **({'OMP_NUM_THREADS': '1'} if args.scale == 'tiny' else {})}      # toy tensors: one thread
    for name, record, module_argv, limit in parts(args.device, args.scale, out):
        command = f"python -m {' '.join(module_argv)}"
        left = args.total_limit_s - (time.time() - started)
        if left < 30:
            summary.append(f"| {name} | `{command}` | skipped: the total limit was reached | | |")
            failed += 1
            continue
        if args.scale == 'tiny':                              # a check of the script: the total limit only
            limit = left
        t = time.time()
        with open(os.path.join(out, record), 'w') as f:
            try:
                rc = subprocess.run([sys.executable, '-m', *module_argv], stdout=f, stderr=subprocess.STDOUT,
                                    cwd=REPO_ROOT, env=env, timeout=min(limit, left)).returncode
            except subprocess.TimeoutExpired:
                rc = f'stopped at its limit ({min(limit, left):.0f} s)'
        failed += rc != 0
        summary.append(f"| {name} | `{command}` | {rc} | {time.time() - t:.0f} | {record} |")
        print(summary[-1], flush=True)
    summary.append(f"\nTotal {time.time() - started:.0f} s.")
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write('\n'.join(summary) + '\n')
    print(f"records in {out}", flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
