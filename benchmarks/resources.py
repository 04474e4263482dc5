"""
What the set-up and the offline profile cost: the disk the installed requirements take (and the CUDA libraries'
share), and (with --run) the wall time, CPU time and peak memory of `bash train_all_heads.sh offline` from scratch,
and the disk its feature cache takes. Each measurement is added to docs/resources/record.json with how it was made
(CPU, load at the start and end); docs/resources.md is rendered from that record.

    python -m benchmarks.resources                 # installed size only (seconds)
    python -m benchmarks.resources --run           # + the offline profile from scratch, and its heads' accuracies

The offline profile runs into a fresh temporary OUT folder and a fresh feature cache (under --work_dir), so
nothing cached earlier shortens it; the SST is read from --data_root (fetched there if missing).
"""
import argparse
import glob
import importlib.metadata
import importlib.util
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (NOT_RECORDED, busy, finish_meta, how_measured, load_record, measurement_meta,
                               save_record, shown_command, write_report)
from heinsen_replication.runs import read_metrics
from benchmarks.machine_load import machine_cpu_seconds

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


def torch_path():
    """Where torch is installed (its package folder), found without importing it."""
    return importlib.util.find_spec('torch').origin


def disk_usage(folder):
    """Bytes the files under folder occupy on disk (allocated blocks, as du counts them: compiled .pyc included)."""
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(folder) for f in files)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def run_offline_profile(data_root, work_dir):
    """bash train_all_heads.sh offline into fresh folders -> (wall seconds, peak RSS of a run in bytes, cache bytes,
    CPU seconds, the others' share of the CPU, {dataset: (dev accuracy, test accuracy)} of its runs, {dataset:
    {'steps', 'seconds'}}: each run's optimizer steps and training seconds, which the job's estimate scales)."""
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
    return wall, peak, folder_bytes(os.path.join(cache_root, 'features')), cpu, others, accuracies, run_steps(out)


def run_steps(out):
    """The offline profile's runs under OUT -> {dataset: {'steps': optimizer steps, 'seconds': training seconds}}, from
    each run's steps.jsonl and metrics.jsonl."""
    from heinsen_replication.reporting import read_steps
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, 'offline', 'seed*', '*', 'metrics.jsonl'))):
        history, _ = read_metrics(path)
        runs[os.path.basename(os.path.dirname(path))] = {
            'steps': read_steps(os.path.dirname(path))[-1]['step'],
            'seconds': sum(r['epoch_seconds'] for r in history)}
    return runs


def offline_accuracies(out):
    """The offline profile's runs under OUT -> {dataset: (final dev accuracy, final test accuracy)}, from each run
    folder's metrics.jsonl (other files in the profile's folder, such as precision.txt, are not runs)."""
    accuracies = {}
    for path in sorted(glob.glob(os.path.join(out, 'offline', 'seed*', '*', 'metrics.jsonl'))):
        final = read_metrics(path)[1] or {}
        accuracies[os.path.basename(os.path.dirname(path))] = (final.get('valid_accuracy'), final.get('test_accuracy'))
    return accuracies


CUDA_DISTRIBUTIONS = re.compile(r'^(nvidia-.*|triton|cuda-.*)$', re.IGNORECASE)   # what a CPU-only install can drop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run', action='store_true', help='also run the offline profile from scratch and measure it')
    p.add_argument('--data_root', default='.data', help='folder holding sst/ (fetched there if missing)')
    p.add_argument('--work_dir', default=None, help='where the fresh runs and cache go (default: a temporary folder)')
    p.add_argument('--report', default=os.path.join(REPO_ROOT, 'docs', 'resources.md'))
    p.add_argument('--record', default=os.path.join(REPO_ROOT, 'docs', 'resources', 'record.json'))
    args = p.parse_args(argv)
    if args.run and not os.path.isdir(os.path.join(args.data_root, 'sst')):
        subprocess.run([sys.executable, '-m', 'heinsen_replication.data', 'sst5', '--download', '--data_root', args.data_root], check=True)
    record = load_record(args.record) if os.path.exists(args.record) else {'install': [], 'offline': []}
    command = shown_command('benchmarks.resources', sys.argv[1:] if argv is None else argv)

    meta = measurement_meta(command, 'not applicable (sizes on disk)')
    dists = installed_closure(requirement_names(os.path.join(REPO_ROOT, 'requirements.txt')))
    sizes = sorted(((installed_bytes(d), d.metadata['Name']) for d in dists.values()), reverse=True)
    record['install'].append({'meta': finish_meta(meta), 'n_distributions': len(sizes),
                              'bytes': sum(size for size, _ in sizes),
                              'cuda_bytes': sum(size for size, name in sizes if CUDA_DISTRIBUTIONS.match(name)),
                              'largest': [[name, size] for size, name in sizes[:6]],
                              'environment_disk_bytes': disk_usage(os.path.dirname(os.path.dirname(torch_path())))})
    if args.run:
        meta = measurement_meta(command, 'chosen by the offline profile (recipes.cpu_bfloat16_is_faster)')
        with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
            wall, peak, cache, cpu, others, accuracies, runs = run_offline_profile(args.data_root, work_dir)
        record['offline'].append({'meta': finish_meta(meta), 'wall_s': wall, 'cpu_s': cpu, 'others_share': others,
                                  'peak_rss_bytes': peak, 'cache_bytes': cache, 'runs': runs,
                                  'accuracies': {d: {'valid': v, 'test': t} for d, (v, t) in accuracies.items()}})
    save_record(record, args.record)
    write_report([render(args.record)], args.report)


GiB = 2 ** 30


def headline(record):
    """The offline profile's headline run: the latest measured on a machine no other work shared."""
    idle = [r for r in record['offline'] if not busy(r['meta'])]
    return idle[-1] if idle else None


def render(record_path):
    """docs/resources.md from the record; nothing is measured."""
    record = load_record(record_path)
    install = record['install'][-1]
    lines = ['# What the set-up and the offline profile cost', '',
             'Measured by `python -m benchmarks.resources` (the installed size, in seconds) and `python -m '
             'benchmarks.resources --run` (also `bash train_all_heads.sh offline` from scratch: an empty feature cache '
             'and run folder). Each measurement says on what machine and under what load it was made; one made while '
             'other work shared the machine is listed, but is not the headline figure. The cost of every path: the '
             'README\'s "Pick your path".', '',
             '## The install', '',
             f"requirements.txt and what it pulls in: {install['n_distributions']} distributions, "
             f"**{install['bytes'] / GiB:.1f} GiB** on disk, of which {install['cuda_bytes'] / GiB:.1f} GiB are the CUDA "
             f"libraries (`nvidia-*`, `triton`) that the default torch wheel pulls in and a CPU-only machine never uses. "
             f"The largest: " + ', '.join(f"{name} {size / GiB:.2f} GiB" for name, size in install['largest']) + '. '
             + (f"The whole environment's site-packages as du counts them (allocated blocks, compiled `.pyc` files "
                f"and any packages outside requirements.txt included): {install['environment_disk_bytes'] / GiB:.1f} "
                f"GiB. " if install.get('environment_disk_bytes') else '') + how_measured(install['meta']), '']
    for other in record['install'][:-1]:
        lines += [f"Earlier: {other['bytes'] / GiB:.1f} GiB ({other['n_distributions']} distributions). "
                  + how_measured(other['meta']), '']
    lines += ['## The offline profile from scratch', '',
              '`bash train_all_heads.sh offline`: the feature cache of every SST text built first, then the SST-5 head '
              'and the SST-2 head fine-tuned from it (seed 0). CPU time: all its processes, user + system. Peak '
              'memory: the largest resident set of one process (ru_maxrss); the memory-mapped feature cache counts in '
              'it as it is read, so most of it is page cache the system can reclaim, not memory the process '
              'allocates.', '',
              '| measured | wall clock (min) | CPU time (min) | others\' share of the CPU | peak resident memory (GiB) '
              '| feature cache (GiB) | heads: SST-5, SST-2 dev / test (%) |', '|---|---|---|---|---|---|---|']
    best = headline(record)
    for run in record['offline']:
        m = run['meta']
        label = f"{m.get('when') or NOT_RECORDED}, {m.get('cpu_model') or 'CPU not recorded'}" + \
            (', **busy**' if busy(m) else ', idle') + (' (headline)' if run is best else '')
        share = f"{run['others_share']:.0%}" if run.get('others_share') is not None else NOT_RECORDED
        heads = '; '.join(f"{100 * a['valid']:.2f} / {100 * a['test']:.2f}" for d, a in sorted(
            run['accuracies'].items(), reverse=True)) if run.get('accuracies') else NOT_RECORDED
        lines.append(f"| {label} | {run['wall_s'] / 60:.1f} | {run['cpu_s'] / 60:.1f} | {share} | "
                     f"{run['peak_rss_bytes'] / GiB:.1f} | {run['cache_bytes'] / GiB:.1f} | {heads} |")
    lines.append('')
    for run in record['offline']:
        lines += [f"- {run['meta'].get('when') or NOT_RECORDED}: " + how_measured(run['meta'])]
    loaded = [r for r in record['offline'] if busy(r['meta'])]
    if best and loaded:
        other = loaded[-1]
        lines += ['', '## How the costs scale', '',
                  f"- **CPU time is the work; wall clock follows from it.** On the idle 2-core machine the profile "
                  f"used {best['cpu_s'] / best['wall_s']:.1f} cores on average ({best['cpu_s'] / 60:.1f} CPU-min in "
                  f"{best['wall_s'] / 60:.1f} min). With k cores free, expect about CPU-minutes / k of wall clock; a "
                  f"faster CPU shortens both.",
                  f"- **Other load costs more than its share.** On a 2-core CPU busy with other work the same job took "
                  f"{other['wall_s'] / best['wall_s']:.1f}x the wall clock and also {other['cpu_s'] / best['cpu_s']:.1f}x "
                  f"the CPU time: threads that wait for each other and for the cores, and caches shared with other "
                  f"processes, waste CPU time (our reading; the split was not measured). On a shared machine, `OMP_NUM_THREADS=1` per run and fewer runs at a "
                  f"time waste less.",
                  f"- **Memory** does not scale with the CPU: the peak resident set ({best['peak_rss_bytes'] / GiB:.1f} "
                  f"GiB idle, {other['peak_rss_bytes'] / GiB:.1f} GiB busy) is mostly the memory-mapped feature cache, "
                  f"which the system reclaims under pressure; a machine with less free memory reads the cache from "
                  f"disk more often (slower, not failing; expected, not measured).",
                  f"- **Disk**: the install ({install['bytes'] / GiB:.1f} GiB, {install['cuda_bytes'] / GiB:.1f} GiB of "
                  f"it CUDA libraries a CPU-only machine does not use) and the feature cache "
                  f"({best['cache_bytes'] / GiB:.1f} GiB for all SST texts on minilm, float16; a bfloat16-encoded cache "
                  f"is a second one of the same size). Run folders hold a few MiB per head.",
                  "- **Not measured here**: the paper's runs on a GPU (time, GPU memory, the backbones' and datasets' "
                  "disk), the notebooks, loading a pretrained head."]
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
