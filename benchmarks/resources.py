"""
What the set-up and the offline profile cost on this machine: the disk the installed requirements take, and
(with --run) the wall time and peak memory of `bash train_all_heads.sh offline` from scratch, and the disk its
feature cache takes. Writes docs/resources.md (docs/replication.md quotes it) and, with --run, docs/resources.json:
the record the offline job's start summary estimates its cost from (heinsen_replication.reporting.estimate).

    python -m benchmarks.resources                 # installed size only (seconds)
    python -m benchmarks.resources --run           # + the offline profile from scratch, and its heads' accuracies

The offline profile runs into a fresh temporary OUT folder and a fresh feature cache (under --work_dir), so
nothing cached earlier shortens it; the SST is read from --data_root (fetched there if missing).
"""
import argparse
import glob
import importlib.metadata
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

from heinsen_replication.runs import read_metrics
from heinsen_routing.streamed import machine_cpu_seconds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements(path):
    """{distribution name: its requirement line} of a requirements file and the files it includes (-r FILE)."""
    found = {}
    with open(path) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line.startswith('-r '):
                found.update(requirements(os.path.join(os.path.dirname(path), line[3:].strip())))
            elif line:
                found[re.split(r'[<>=!~;\[ ]', line, maxsplit=1)[0]] = line
    return found


def requirement_names(path):
    """The distribution names a requirements file asks for (with those of the files it includes)."""
    return list(requirements(path))


def installed_closure(names):
    """The installed distributions these need, transitively (extras and markers that do not apply are skipped)."""
    seen, todo = {}, list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r'[-_.]+', '-', name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for requirement in dist.requires or []:
            if 'extra ==' in requirement:
                continue
            todo.append(re.split(r'[<>=!~;\[ (]', requirement.strip(), maxsplit=1)[0])
    return seen


def installed_bytes(dist):
    total = 0
    for file in dist.files or []:
        path = dist.locate_file(file)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def run_offline_profile(data_root, work_dir):
    """bash train_all_heads.sh offline into fresh folders -> (wall seconds, peak RSS of a run in bytes, cache bytes,
    CPU seconds, the others' share of the CPU, {dataset: (dev accuracy, test accuracy)} of its runs)."""
    out, cache_root = os.path.join(work_dir, 'runs'), os.path.join(work_dir, 'data')
    os.makedirs(cache_root, exist_ok=True)
    os.symlink(os.path.abspath(os.path.join(data_root, 'sst')), os.path.join(cache_root, 'sst'))
    machine = machine_cpu_seconds()
    started = time.time()
    subprocess.run(['bash', os.path.join(REPO_ROOT, 'train_all_heads.sh'), 'offline'], check=True, cwd=REPO_ROOT,
                   env={**os.environ, 'OUT': out, 'DATA_ROOT': cache_root})
    wall = time.time() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024                                               # the largest child, KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime                                       # all the profile's processes
    busy, total = (b - a for a, b in zip(machine, machine_cpu_seconds()))
    others = max(0.0, busy - cpu) / max(total, 1e-9)          # the share of the machine's CPU time others used
    accuracies = offline_accuracies(out)                         # read before the work folder is removed
    record = offline_record(out, wall)
    return wall, peak, folder_bytes(os.path.join(cache_root, 'features')), cpu, others, accuracies, record


def offline_record(out, wall):
    """The record of the offline profile's run: its wall seconds, each run's training seconds and steps (from its
    metrics.jsonl and steps.jsonl), the rest (loading, encoding the feature cache, evaluating), and the CPU."""
    from heinsen_replication.recipes import cpuinfo
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, 'offline', 'seed*', '*', 'metrics.jsonl'))):
        history, _ = read_metrics(path)
        with open(os.path.join(os.path.dirname(path), 'steps.jsonl')) as f:
            steps = max(json.loads(line)['step'] for line in f if line.strip())
        runs[os.path.basename(os.path.dirname(path))] = {'steps': steps,
                                                          'seconds': round(sum(r['epoch_seconds'] for r in history), 1)}
    return {'wall_seconds': round(wall, 1), 'other_seconds': round(wall - sum(r['seconds'] for r in runs.values()), 1),
            'runs': runs, 'cpu_model': cpuinfo('model name'), 'cpu_count': os.cpu_count(),
            'when': time.strftime('%Y-%m-%d', time.gmtime()), 'torch': torch.__version__,
            'load_average_at_end': round(os.getloadavg()[0], 2)}


def offline_accuracies(out):
    """The offline profile's runs under OUT -> {dataset: (final dev accuracy, final test accuracy)}, from each run
    folder's metrics.jsonl (other files in the profile's folder, such as precision.txt, are not runs)."""
    accuracies = {}
    for path in sorted(glob.glob(os.path.join(out, 'offline', 'seed*', '*', 'metrics.jsonl'))):
        final = read_metrics(path)[1] or {}
        accuracies[os.path.basename(os.path.dirname(path))] = (final.get('valid_accuracy'), final.get('test_accuracy'))
    return accuracies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run', action='store_true', help='also run the offline profile from scratch and measure it')
    p.add_argument('--data_root', default='.data', help='folder holding sst/ (fetched there if missing)')
    p.add_argument('--work_dir', default=None, help='where the fresh runs and cache go (default: a temporary folder)')
    p.add_argument('--report', default=os.path.join(REPO_ROOT, 'docs', 'resources.md'))
    args = p.parse_args(argv)
    if args.run and not os.path.isdir(os.path.join(args.data_root, 'sst')):
        subprocess.run([sys.executable, '-m', 'heinsen_replication.data', 'sst5', '--download', '--data_root', args.data_root], check=True)

    dists = installed_closure(requirement_names(os.path.join(REPO_ROOT, 'requirements.txt')))
    sizes = sorted(((installed_bytes(d), d.metadata['Name']) for d in dists.values()), reverse=True)
    total = sum(size for size, _ in sizes)
    lines = ['# Resources of the set-up and of the offline profile', '',
             f"Produced by `python -m benchmarks.resources{' --run' if args.run else ''}` on {os.cpu_count()} CPU "
             f"cores, torch {torch.__version__}.", '',
             f"- **Installed requirements** (requirements.txt and what they pull in, {len(sizes)} distributions): "
             f"{total / 2 ** 30:.1f} GiB; the largest: " +
             ', '.join(f"{name} {size / 2 ** 30:.2f} GiB" for size, name in sizes[:5]) + '.']
    if args.run:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
            wall, peak, cache, cpu, others, accuracies, record = run_offline_profile(args.data_root, work_dir)
        with open(os.path.join(os.path.dirname(args.report), 'resources.json'), 'w') as f:
            json.dump({'profiles': {'offline': record}}, f, indent=1)
        lines += [f"- **`bash train_all_heads.sh offline` from scratch** (feature cache built first, then the SST-5 "
                  f"and SST-2 heads): {wall / 60:.1f} min wall clock, {cpu / 60:.1f} min of CPU time (all its "
                  f"processes); other processes used {others:.0%} of the machine's CPU time meanwhile (load average "
                  f"at the end {os.getloadavg()[0]:.2f}).",
                  f"- **Its heads** (seed 0; dev / test accuracy): " + '; '.join(
                      f"{dataset} {dev:.2%} / {test:.2%}" for dataset, (dev, test) in accuracies.items()) + '.',
                  f"- **Feature cache** of all SST texts on minilm: {cache / 2 ** 30:.1f} GiB of disk.",
                  f"- **Peak memory** of one training process (resident set, ru_maxrss): {peak / 2 ** 30:.1f} GiB; "
                  f"the memory-mapped cache counts in it as it is read, so it is mostly page cache the system can "
                  f"reclaim, not memory the process allocates."]
    text = '\n'.join(lines) + '\n'
    print(text)
    os.makedirs(os.path.dirname(args.report), exist_ok=True)
    with open(args.report, 'w') as f:
        f.write(text)


if __name__ == '__main__':
    main()
