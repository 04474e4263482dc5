"""
The routing head's cost against its accuracy on the same frozen all-MiniLM-L6-v2 features: lighter configurations
of models.RoutingHead (fewer hidden vectors n_hid, two routings instead of three, routings at a reduced width d_hid)
beside the paper's head, each trained in the offline profile's short budget (recipes.py `offline`: SST-5 1 x 2000
steps of 32 phrases from the feature cache, then SST-2 fine-tuning the last routing of the SST-5 head), 3 seeds.

    python -m benchmarks.routing_head_study --run --data_root $DATA_ROOT --feature_cache $FEATURE_CACHE --out $OUT
    python -m benchmarks.routing_head_study --data_root $DATA_ROOT --feature_cache $FEATURE_CACHE --time_steps 200
    python -m benchmarks.routing_head_study                 # the report alone, from the records

1. --run trains the runs missing from the records, seed by seed (every configuration of seed 0 first, the most
   promising first, then seed 1, then seed 2), one thread, each SST-5 run followed by its SST-2 run: train.py with the
   offline recipe's arguments and the configuration's --n_hid / --n_routings / --d_hid, under
   OUT/<configuration>/offline/seed<k>/<dataset> (train.py --resume: a stopped study continues where it stopped).
   Each finished run appends its record to docs/routing_head_study/<configuration>.jsonl: accuracies, its train.py
   command, the commit, CPU, torch version, threads, precision and the load average at its start and end.
2. Without --run: the parameters of each head; the FLOPs of one SST-5 training step (mixup, forward, loss, backward;
   torch.utils.flop_counter.FlopCounterMode, averaged over the first --flop_steps batches of the training stream,
   the same batches for every head); with --time_steps N, the seconds per step of every head and of the standard head
   (c) token_depth_attention in one process, in interleaved rounds (benchmarks.frozen_heads.time_runs), recorded in
   docs/routing_head_study/time_per_step.json; then docs/routing_head_study.md from the records.
"""
import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import models
import recipes
import train
from benchmarks import REPO_ROOT, shown_command
from benchmarks.frozen_heads import time_runs
from benchmarks.sst_results import mean_std, write_report

# The configurations, in the order --run trains them: {name: (what it is, RoutingHead / train.py options)}.
CONFIGS = {
    'n_hid16': ('16 hidden vectors', {'n_hid': 16}),
    'two_routings': ('two routings (no middle routing)', {'n_routings': 2}),
    'd_hid128': ('routings at width 128 (a projection 384 -> 128 first)', {'d_hid': 128}),
    'n_hid32': ('32 hidden vectors', {'n_hid': 32}),
    'n_hid8': ('8 hidden vectors', {'n_hid': 8}),
    'n_hid16_d_hid128': ('16 hidden vectors at width 128', {'n_hid': 16, 'd_hid': 128}),
    'paper': ("the paper's head: 64 hidden vectors, three routings, width 384", {}),
}
BASELINE = 'paper'
SHOWN = [BASELINE, *(c for c in CONFIGS if c != BASELINE)]             # the report's order: the paper's head first
STANDARD_HEAD = 'token_depth_attention'                  # head (c) of benchmarks/frozen_heads.py
DATASETS = {'sst5': 'SST-5', 'sst2': 'SST-2'}
RECORDS = os.path.join('docs', 'routing_head_study')
SST_RESULTS = os.path.join('docs', 'sst_results.md')        # the paper's head in this budget, seeds 0-2
D_DEPTH, D_EMB = 7, 384                                  # minilm: embeddings + 6 layers, 384 features


def head_argv(options):
    """RoutingHead options -> train.py arguments (--n_hid 16 ...)."""
    return [arg for name, value in options.items() for arg in (f'--{name}', str(value))]


def study_runs(config, seed, data_root, out, feature_cache):
    """-> {dataset: train.py arguments} of one configuration and seed: the offline recipe under
    out/<config>/offline/seed<k>/, with the configuration's head options (SST-2 fine-tunes the SST-5 head, whose
    architecture it keeps)."""
    recipe = recipes.runs('offline', data_root=data_root, out=os.path.join(out, config), seed=seed,
                          feature_cache=feature_cache)
    return {'sst5': [*recipe['sst5'], *head_argv(CONFIGS[config][1])], 'sst2': recipe['sst2']}


def read_records(records):
    """-> {config: {seed: {dataset: record}}} of the records' JSON lines (a later line of the same run wins)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(records, '*.jsonl'))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    found.setdefault(r['config'], {}).setdefault(r['seed'], {})[r['dataset']] = r
    return found


def git_commit():
    """The commit of the code that runs (with '+changes' when its tracked files differ from it)."""
    def git(*args):
        return subprocess.run(['git', '-C', REPO_ROOT, *args], capture_output=True, text=True).stdout.strip()
    commit = git('rev-parse', 'HEAD') or 'unknown'
    return commit + ('+changes' if git('status', '--porcelain', '--untracked-files=no') else '')


def environment():
    """How a run was made, beyond its command: the machine, the library, the threads."""
    import torch
    return {'commit': git_commit(), 'cpu_model': recipes.cpuinfo('model name') or platform.processor(),
            'cpu_count': os.cpu_count(), 'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
            'omp_num_threads': os.environ.get('OMP_NUM_THREADS')}


def run_missing(args):
    """Trains every (configuration, seed) run the records lack, seed by seed, and appends each finished run's
    record to RECORDS/<config>.jsonl."""
    import torch
    torch.set_num_threads(1)
    os.makedirs(args.records, exist_ok=True)
    for seed in args.seeds:
        for config in args.configs:
            done = read_records(args.records).get(config, {}).get(seed, {})
            for dataset, argv in study_runs(config, seed, args.data_root, args.out, args.feature_cache).items():
                if dataset in done or dataset not in args.datasets:
                    continue
                started, load_start = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), os.getloadavg()
                print(f"routing_head_study: {config} seed {seed} {dataset}: train.py {' '.join(argv)}", flush=True)
                train.main(argv)
                out = train.parse_args(argv).output_dir
                epochs, final = train.read_metrics(os.path.join(out, 'metrics.jsonl'))
                _, model_config = models.from_pretrained(os.path.join(out, 'model'))
                record = {'config': config, 'seed': seed, 'dataset': dataset,
                          'head': {k: model_config[k] for k in ('n_hid', 'n_routings', 'd_hid')},
                          'valid_accuracy': final['valid_accuracy'], 'test_accuracy': final['test_accuracy'],
                          'train_loss': epochs[-1]['train_loss'], 'train_seconds': sum(e['epoch_seconds'] for e in epochs),
                          'steps': final['n_epochs'] * train.parse_args(argv).n_iters_per_train_epoch,
                          'precision': {k: final[k] for k in ('backbone_precision', 'head_precision', 'matmul_precision')},
                          'features': 'float16 feature cache (train.py --feature_cache)',
                          'command': 'python train.py ' + ' '.join(argv), **environment(),
                          'started': started, 'finished': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
                          'load_average_at_start': load_start, 'load_average_at_end': os.getloadavg()}
                with open(os.path.join(args.records, f'{config}.jsonl'), 'a') as f:
                    f.write(json.dumps(record) + '\n')


def n_parameters(head):
    return sum(p.numel() for p in head.parameters())


def costs(args, configs):
    """-> {name: {'parameters', 'gflop_per_step'}} of every configuration and of head (c): each one's SST-5 run of
    the offline recipe built by train.py's stages (train.build_run), and the FLOPs FlopCounterMode counts in
    train.train_step over the first --flop_steps batches of its training stream (the same batches for all: the
    same seed)."""
    import tempfile

    import torch
    from torch.utils.flop_counter import FlopCounterMode
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in step_argvs(args, configs, tmp).items():
            run = train.build_run(train.parse_args(argv))
            run.head.train()
            torch.manual_seed(0)
            with FlopCounterMode(display=False) as counter:
                for _ in range(args.flop_steps):
                    train.train_step(run, next(run.batches))
            result[name] = {'parameters': n_parameters(run.head),
                            'gflop_per_step': counter.get_total_flops() / args.flop_steps / 1e9}
            train.release_output_dir(run.args.output_dir)
    return result


def step_argvs(args, configs, tmp):
    """-> {name: train.py arguments} of the SST-5 run of every configuration and of head (c), outputs under tmp."""
    argvs = {config: study_runs(config, 0, args.data_root, os.path.join(tmp, 'study'), args.feature_cache)['sst5']
             for config in configs}
    argvs[STANDARD_HEAD] = [*recipes.runs('offline', args.data_root, os.path.join(tmp, 'offline'),
                                          feature_cache=args.feature_cache)['sst5'], '--model', STANDARD_HEAD]
    return {name: [*argv, '--output_dir', os.path.join(tmp, name), '--device', 'cpu'] for name, argv in argvs.items()}


def report(args, found, cost, timing):
    """The report's markdown lines."""
    complete = {c: {s: r for s, r in found.get(c, {}).items() if set(r) == set(DATASETS)} for c in CONFIGS}
    acc = {c: {d: [r[d]['test_accuracy'] for r in seeds.values()] for d in DATASETS} for c, seeds in complete.items()}
    steps = timing['seconds_per_step'] if timing else {}

    def ratio(values, c, name=BASELINE):
        return f"{values[c] / values[name]:.2f}" if c in values and name in values else ''

    flops = {c: v['gflop_per_step'] for c, v in cost.items()}
    lines = [f"| configuration (RoutingHead options) | parameters (SST-5) | GFLOP / step | FLOPs / paper's | s / step "
             f"| s / step / paper's | SST-5 test (%) | SST-2 test (%) | seeds |", '|---|---|---|---|---|---|---|---|---|']
    for c in SHOWN:
        what, options = CONFIGS[c]
        shown = ', '.join(f'{k} {v}' for k, v in options.items()) or 'defaults'
        cells = [mean_std(acc[c][d]) if acc[c][d] else 'not run' for d in DATASETS]
        lines.append(f"| `{c}`: {what} ({shown}) | {cost[c]['parameters']:,} | {flops[c]:.2f} | {ratio(flops, c)} "
                     f"| {steps[c]:.3f} | {ratio(steps, c)} | {cells[0]} | {cells[1]} | {len(complete[c])} |"
                     if c in steps else
                     f"| `{c}`: {what} ({shown}) | {cost[c]['parameters']:,} | {flops[c]:.2f} | {ratio(flops, c)} "
                     f"| | | {cells[0]} | {cells[1]} | {len(complete[c])} |")
    c = STANDARD_HEAD
    lines.append(f"| head (c) {c} (benchmarks/frozen_heads.py; not trained here) | {cost[c]['parameters']:,} "
                 f"| {flops[c]:.2f} | {ratio(flops, c)} | {f'{steps[c]:.3f}' if c in steps else ''} "
                 f"| {ratio(steps, c)} | | | |")
    base, source = baseline(acc, committed_baseline())
    lines += ['', verdict(acc, flops, base), '', "The paper's head to compare with: " + source + ', SST-5 '
              + ', SST-2 '.join(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in base.values()) + '.', '']
    lines += ["Test accuracy of the final head of each run (nothing chosen on test), mean ± sample std over seeds, in "
              "the offline profile's budget (`bash train_all_heads.sh offline`): SST-5 1 epoch of 2000 steps of 32 "
              "phrases, then SST-2 1 x 2000 x 32 fine-tuning the last routing of the SST-5 head (the rest frozen, "
              "the projection included), RAdam, one cycle (max lr 1e-3), mixup Beta(0.65, 0.65), features from the "
              "float16 feature cache. FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one SST-5 training step "
              f"(mixup, forward, loss, backward; matrix products only), averaged over the first {args.flop_steps} "
              "batches of the training stream (seed 0, the same batches for every head).", '']
    if timing:
        loads = ', '.join(f"{v:.1f}" for v in timing['load_average_1min'])
        lines += [f"Seconds per step ({timing['when']}): every head's SST-5 run of the offline recipe built by "
                  f"train.py's stages, then {timing['rounds']} rounds of {timing['steps'] // timing['rounds']} steps "
                  f"of every head in turn (one untimed round first), in one process on {timing['cpu_count']} CPU "
                  f"cores, {timing['torch_threads']} torch thread(s); CPU: {timing['cpu_model']}; load average (1 min) "
                  f"at each round: {loads}. The machine is shared: compare the heads with each other, not with other "
                  f"tables.", '']
    lines += ['Per seed (dev / test, %; s / step: the run\'s own SST-5 epoch time over its steps, on a shared machine):',
              '', '| configuration | seed | SST-5 dev | SST-5 test | SST-2 dev | SST-2 test | SST-5 s / step in the run '
              '| load at start, end |', '|---|---|---|---|---|---|---|---|']
    for c in SHOWN:
        for seed, r in sorted(found.get(c, {}).items()):
            cells = [f"{100 * r[d][k]:.2f}" if d in r else '' for d in DATASETS
                     for k in ('valid_accuracy', 'test_accuracy')]
            s5 = r.get('sst5')
            step = f"{s5['train_seconds'] / s5['steps']:.3f}" if s5 else ''
            load = f"{s5['load_average_at_start'][0]:.1f}, {s5['load_average_at_end'][0]:.1f}" if s5 else ''
            lines.append(f"| {c} | {seed} | {' | '.join(cells)} | {step} | {load} |")
    made = sorted({(r['commit'], r['cpu_model'], r['torch'], r['torch_threads'], r['precision']['head_precision'],
                    r['precision']['matmul_precision']) for seeds in found.values() for runs in seeds.values()
                   for r in runs.values()})
    lines += ['', 'The runs were made by `python -m benchmarks.routing_head_study --run` (each record in '
              f'{RECORDS}/<configuration>.jsonl holds its train.py command) with: '
              + ('; '.join(f"commit {m[0][:12]}, {m[1]}, torch {m[2]}, {m[3]} thread(s), head {m[4]}, matmul "
                           f"precision {m[5]}" for m in made) or 'none recorded yet') + '.']
    command = shown_command('benchmarks.routing_head_study', sys.argv[1:] if args.argv is None else args.argv)
    lines += ['', f"Written by `{command}`."]
    return lines


def committed_baseline(path=SST_RESULTS):
    """The paper's head in this budget as docs/sst_results.md records it (benchmarks.sst_results, seeds 0-2: the
    offline profile's regime) -> {dataset: (mean, std)} (fractions)."""
    with open(path) as f:
        row = next((line for line in f if line.startswith('| routing head (2022), mean ± std over seeds')), None)
    cells = re.findall(r'([\d.]+) ± ([\d.]+)', row or '')
    if len(cells) != 2:
        raise ValueError(f"{path} has no row 'routing head (2022), mean ± std over seeds' with SST-5 and SST-2 "
                         f"'mean ± std' cells: run python -m benchmarks.sst_results first")
    return {d: (float(m) / 100, float(s) / 100) for d, (m, s) in zip(DATASETS, cells)}


def baseline(acc, committed):
    """The paper's head's {dataset: (mean, std)} and where it comes from: this study's runs where they have at least
    two seeds on both datasets, else the committed ones (committed_baseline)."""
    own = acc[BASELINE]
    if all(len(own[d]) >= 2 for d in DATASETS):
        return ({d: (statistics.mean(own[d]), statistics.stdev(own[d])) for d in DATASETS},
                f"this study's runs of the paper's head ({len(own['sst5'])} seeds)")
    return committed, (f"the paper's head in the same budget as {SST_RESULTS} records it (seeds 0, 1, 2 of "
                       f"`python -m benchmarks.sst_results --n_iters_per_train_epoch 2000`)")


def verdict(acc, flops, base, max_flops_ratio=1 / 3, min_seeds=3):
    """The study's answer: the configurations (with min_seeds seeds or more) whose mean test accuracy is within one
    standard deviation of the paper's head's (base: {dataset: (mean, std)}) on SST-5 and on SST-2, at
    max_flops_ratio of its FLOPs or less."""
    floors = {d: base[d][0] - base[d][1] for d in DATASETS}
    held, light = [], []
    pending = [c for c in CONFIGS if c != BASELINE and len(acc[c]['sst5']) < min_seeds]
    for c in CONFIGS:
        if c == BASELINE or c in pending:
            continue
        if all(statistics.mean(acc[c][d]) >= floors[d] for d in DATASETS):
            (light if flops[c] <= max_flops_ratio * flops[BASELINE] else held).append(c)
    floor = ' and '.join(f"{100 * floors[d]:.1f}% on {DATASETS[d]}" for d in DATASETS)
    if light:
        answer = (f"**Within one std of the paper's head (mean test accuracy at least {floor}) at one third of its "
                  f"FLOPs or less: {', '.join(f'`{c}`' for c in light)}.**")
    else:
        answer = (f"**No configuration with {min_seeds} seeds on record is within one std of the paper's head (mean "
                  f"test accuracy at least {floor}) at one third of its FLOPs or less.**")
    if held:
        answer += f" Within one std at more than a third of its FLOPs: {', '.join(f'`{c}`' for c in held)}."
    if pending:
        answer += (f" Not counted, fewer than {min_seeds} seeds on record: {', '.join(f'`{c}`' for c in pending)} "
                   f"(their figures below are preliminary).")
    return answer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run', action='store_true', help='train the runs the records lack first (long)')
    p.add_argument('--configs', default=','.join(CONFIGS), help=f"comma-separated, among {','.join(CONFIGS)}")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--datasets', nargs='+', default=list(DATASETS), choices=list(DATASETS),
                   help='--run: these stages only (sst2 needs the sst5 run of the same configuration and seed)')
    p.add_argument('--data_root', default='.data')
    p.add_argument('--feature_cache', default='.data/features')
    p.add_argument('--out', default='runs/routing-head-study', help='the training runs (--run)')
    p.add_argument('--records', default=RECORDS)
    p.add_argument('--flop_steps', type=int, default=10)
    p.add_argument('--time_steps', type=int, default=None, help='measure the seconds per step of every head first')
    p.add_argument('--report', default='docs/routing_head_study.md')
    args = p.parse_args(argv)
    args.argv = argv
    args.configs = [c for c in args.configs.split(',') if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose among {', '.join(CONFIGS)}")
    if args.run:
        run_missing(args)
        return
    timing_path = os.path.join(args.records, 'time_per_step.json')
    if args.time_steps:
        import torch
        with __import__('tempfile').TemporaryDirectory() as tmp:
            timing = time_runs(step_argvs(args, CONFIGS, tmp), args.time_steps)
        timing['torch_threads'] = torch.get_num_threads()
        os.makedirs(args.records, exist_ok=True)
        with open(timing_path, 'w') as f:
            json.dump(timing, f, indent=1)
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else None
    cost = costs(args, CONFIGS)
    write_report(report(args, read_records(args.records), cost, timing), args.report)


if __name__ == '__main__':
    main()
