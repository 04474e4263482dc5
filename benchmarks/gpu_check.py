"""
Every CUDA figure the docs promise, in one command, for whoever has a GPU: about 9 minutes on one H100 (each part has
a time limit, and the parts left when the total limit is reached are skipped and said so). It writes one folder:

    OUT/summary.md            the device, torch, the commit, and each part's command, exit status and seconds
    OUT/meta.json             how each part was measured (the records' meta: command, commit, CPU, load, ...)
    OUT/tests.txt             the CUDA tests (tests/test_streamed_devices.py and tests/test_gpu_paper_path.py, -k cuda)
    OUT/routing.md            benchmarks.routing on CUDA: ours against the straightforward implementation, and
                              1,000,000 x 1024 inputs (ours only: the straightforward one needs 400 GB of votes)
    OUT/routing_ops.md        benchmarks.routing_ops --device cuda: operators, ms and memory per training step of the
                              paper's head at the paper's shapes, per chunk policy
    OUT/routing_chunks.md     benchmarks.routing_chunks --device cuda: the differences between chunk sizes
    OUT/full_scale_smoke.log  benchmarks.full_scale_smoke --device cuda: roberta-large and BEiT-large (random weights)
                              through train.py with the paper's settings, and 300 steps of the CIFAR-10 run; its
                              record (the checkout's benchmarks/records/full_scale_smoke.json with the new section)
                              in OUT/records/

    python -m benchmarks.gpu_check --out gpu_check_records             # on a machine with a CUDA device
    python -m benchmarks.gpu_check --add_records gpu_check_records     # then, in the repository: the figures become
                                                                        # sections of benchmarks/routing.md,
                                                                        # routing_ops.md and full_scale_smoke.md
    python -m benchmarks.gpu_check --device cpu --scale tiny --out DIR   # the same parts at toy sizes on a CPU
                                                                        # (checks this script; records nothing)
Without a CUDA device, `--device cuda` (the default) stops at once with exit status 2.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILES = ['tests/test_streamed_devices.py', 'tests/test_gpu_paper_path.py']
SMOKE_RECORD = 'benchmarks/records/full_scale_smoke.json'


def parts(device, scale):
    """{name: (output file, argv of `python -m ...`, time limit in seconds, precision, the benchmark log it adds a
    section to or None)}, in the order they run."""
    tiny = scale == 'tiny'
    routing = (['--configs', 'var:1x300', 'fixed:1x300', 'var:1x300:frozen', '--d_inp', '32', '--n_out', '8',
                '--d_out', '16', '--rounds', '1', '--passes', '2'] if tiny else
               ['--configs', 'var:1x20000', 'fixed:1x20000', 'var:1x20000:frozen', 'var:1x20000:masked',
                'var:8x2500', 'var:1x100000', 'fixed:1x100000', 'var:1x1000000',
                '--rounds', '1', '--passes', '3', '--float64_max_rows', '20000'])
    chunks = ['--configs', 'var:2x100:16x4x8:masked', 'fixed:1x100:16x4x8', '--chunks', 'input', 'cpu'] if tiny else []
    smoke = (['--scale', 'tiny', '--steps', '1', '--batch_sz', '4', '--work', os.path.join('.data', 'gpu_check_tiny')]
             if tiny else ['--steps', '2', '--cifar_steps', '300', '--report', 'benchmarks/full_scale_smoke.md'])
    return {
        'tests': ('tests.txt', ['pytest', '-q', '-rs', '-p', 'no:cacheprovider', *TEST_FILES, '-k', 'cuda'], 180,
                  'float64 and float32', None),
        'routing': ('routing.md', ['benchmarks.routing', '--device', device, *routing], 200, 'float32',
                    'benchmarks/routing.md'),
        'routing_ops': ('routing_ops.md', ['benchmarks.routing_ops', '--device', device,
                                           *(['--scale', 'tiny', '--repeats', '2'] if tiny else [])], 120, 'float32',
                        'benchmarks/routing_ops.md'),
        'routing_chunks': ('routing_chunks.md', ['benchmarks.routing_chunks', '--device', device, *chunks], 90,
                           'float32 and float64, matmul precision highest', 'benchmarks/routing.md'),
        'full_scale_smoke': ('full_scale_smoke.log', ['benchmarks.full_scale_smoke', '--device', device, *smoke], 330,
                             'backbone float16 autocast, head float32', None),
    }


def run(args):
    """Runs every part into args.out -> exit status: 0 when every part ran and passed."""
    from benchmarks.common import finish_meta, git_commit, measurement_meta
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == 'cuda' else f'cpu ({os.cpu_count()} cores)'
    summary = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
               f"Device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}; commit {git_commit()}; "
               f"scale {args.scale}.\n", '| part | command | exit status | seconds | record |', '|---|---|---|---|---|']
    started, failed, metas = time.time(), 0, {'device': device, 'scale': args.scale, 'parts': {}}
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
           **({'OMP_NUM_THREADS': '1'} if args.scale == 'tiny' else {})}      # toy tensors: one thread
    for name, (record, module_argv, limit, precision, _) in parts(args.device, args.scale).items():
        command = f"python -m {' '.join(module_argv)}"
        left = args.total_limit_s - (time.time() - started)
        if left < 30:
            summary.append(f"| {name} | `{command}` | skipped: the total limit was reached | | |")
            failed += 1
            continue
        limit = left if args.scale == 'tiny' else min(limit, left)       # a check of the script: the total only
        meta, t = measurement_meta(command, precision), time.time()
        with open(os.path.join(out, record), 'w') as f:
            try:
                rc = subprocess.run([sys.executable, '-m', *module_argv], stdout=f, stderr=subprocess.STDOUT,
                                    cwd=REPO_ROOT, env=env, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = f'stopped at its limit ({limit:.0f} s)'
        metas['parts'][name] = {'meta': {**finish_meta(meta), 'notes': f'On {device}.'}, 'rc': rc,
                                'seconds': round(time.time() - t, 1)}
        failed += rc != 0
        summary.append(f"| {name} | `{command}` | {rc} | {time.time() - t:.0f} | {record} |")
        print(summary[-1], flush=True)
    if args.scale == 'full' and os.path.exists(os.path.join(REPO_ROOT, SMOKE_RECORD)):
        os.makedirs(os.path.join(out, 'records'), exist_ok=True)
        shutil.copy(os.path.join(REPO_ROOT, SMOKE_RECORD), os.path.join(out, 'records'))
    summary.append(f"\nTotal {time.time() - started:.0f} s.")
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write('\n'.join(summary) + '\n')
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        json.dump(metas, f, indent=1)
    print(f"records in {out}", flush=True)
    return 1 if failed else 0


def add_records(folder):
    """The figures of a gpu_check folder as sections of the benchmark logs (each part that passed), and the
    full-scale smoke run's record in place of the checkout's."""
    from benchmarks.reports import PAGES, add_section, path, resolve, write
    metas = json.load(open(os.path.join(folder, 'meta.json')))
    if metas['scale'] != 'full':
        raise SystemExit(f"{folder} holds a check at scale {metas['scale']!r}: only full-scale figures are records")
    headings = {'routing': f"CUDA: {metas['device']}", 'routing_ops': f"CUDA: {metas['device']}",
                'routing_chunks': f"Chunk sizes, CUDA: {metas['device']}"}
    for name, (record, _, _, _, page) in parts('cuda', 'full').items():
        done = metas['parts'].get(name)
        if page is None or done is None or done['rc'] != 0:
            continue
        with open(os.path.join(folder, record)) as f:
            add_section(page, headings[name], done['meta'], f.read())
        print(f"added {name} to {page}")
    smoke = os.path.join(folder, 'records', os.path.basename(SMOKE_RECORD))
    if metas['parts'].get('full_scale_smoke', {}).get('rc') == 0 and os.path.exists(smoke):
        shutil.copy(smoke, path(SMOKE_RECORD))
        page = 'benchmarks/full_scale_smoke.md'
        write(page, resolve(PAGES[page][1])(path(SMOKE_RECORD)))
        print(f"replaced {SMOKE_RECORD} and wrote {page}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', help='the folder of the records (made if missing)')
    parser.add_argument('--add_records', metavar='FOLDER', help="a gpu_check folder's figures into the benchmark logs")
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--scale', default='full', choices=['full', 'tiny'])
    parser.add_argument('--total_limit_s', type=float, default=570,
                        help='skip the parts that would start after this many seconds')
    args = parser.parse_args(argv)
    if args.add_records:
        return add_records(args.add_records)
    if not args.out:
        parser.error('--out FOLDER (or --add_records FOLDER) is required')
    if args.device == 'cuda' and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device is available (torch.cuda.is_available() is False): run it on a "
              "machine with a GPU, or with --device cpu --scale tiny to check the script", file=sys.stderr)
        return 2
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
