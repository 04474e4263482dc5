"""
The routing head's cost against its accuracy on the same frozen all-MiniLM-L6-v2 features: lighter configurations
of models.RoutingHead (fewer hidden vectors n_hid, two routings instead of three, routings at a reduced width d_hid)
beside the paper's head, each trained in the offline profile's short budget (recipes.py `offline`: SST-5 1 x 2000
steps of 32 phrases from the feature cache, then SST-2 fine-tuning the last routing of the SST-5 head), 3 seeds.

    python -m benchmarks.routing_head_study --run --data_root $DATA_ROOT --feature_cache $FEATURE_CACHE --out $OUT
    python -m benchmarks.routing_head_study --data_root $DATA_ROOT --feature_cache $FEATURE_CACHE --costs --time_steps 100
    python -m benchmarks.routing_head_study                 # the report alone, from the records

1. --run trains the runs missing from the records, seed by seed (every configuration of seed 0 first, the most
   promising first, then seed 1, then seed 2), one thread, each SST-5 run followed by its SST-2 run: train.py with the
   offline recipe's arguments and the configuration's --n_hid / --n_routings / --d_hid, under
   OUT/<configuration>/offline/seed<k>/<dataset> (train.py --resume: a stopped study continues where it stopped).
   Each finished run appends its record to docs/routing_head_study/<configuration>.jsonl: accuracies, its train.py
   command, the commit, CPU, torch version, threads, precision and the load average at its start and end.
2. --costs measures the parameters of each head and the FLOPs of one SST-5 training step (mixup, forward, loss,
   backward; torch.utils.flop_counter.FlopCounterMode, averaged over the first --flop_steps batches of the training
   stream, the same batches for every head), the standard head (c) token_depth_attention included, into
   docs/routing_head_study/costs.json; --time_steps N the seconds per step of every head and of head (c) in one
   process, in interleaved rounds (benchmarks.frozen_heads.time_runs), into docs/routing_head_study/time_per_step.json.
3. docs/routing_head_study.md from the records (render; `python -m benchmarks.reports` renders it too), against the
   paper's head in the same budget: this study's runs of it where they have two seeds or more, else the committed
   docs/sst_results/record.json (benchmarks.sst_results, seeds 0-2).
"""
import argparse
import glob
import json
import os
import statistics
import sys
import tempfile

import train
from benchmarks.common import (finish_meta, how_measured, live_test_accuracy, load_record, mean_std,
                               measurement_meta, publish_pretrained, save_record, shown_command, write_report)
from benchmarks.frozen_heads import time_runs
from heinsen_replication import recipes
from heinsen_replication.checkpoints import from_pretrained
from heinsen_replication.models import RoutingHead
from heinsen_replication.runs import read_metrics
from heinsen_replication.settings import run_settings

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
SST_RESULTS = os.path.join('docs', 'sst_results', 'record.json')   # the paper's head in this budget, seeds 0-2
PRETRAINED_LIGHT = {'sst5': 'pretrained/sst5_minilm_routing_head_light',       # save_pretrained
                    'sst2': 'pretrained/sst2_minilm_routing_head_light'}
PRECISION = 'float32 head, features from the float16 cache (the offline recipe on a CPU without bfloat16)'
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
                command = 'python train.py ' + ' '.join(argv)
                meta = measurement_meta(command, PRECISION, threads=1)
                print(f"routing_head_study: {config} seed {seed} {dataset}: {command}", flush=True)
                train.main(argv)
                out = train.parse_args(argv).output_dir
                epochs, final = read_metrics(os.path.join(out, 'metrics.jsonl'))
                _, model_config = from_pretrained(os.path.join(out, 'model'))
                record = {'config': config, 'seed': seed, 'dataset': dataset,
                          'head': {k: model_config[k] for k in ('n_hid', 'n_routings', 'd_hid')},
                          'valid_accuracy': final['valid_accuracy'], 'test_accuracy': final['test_accuracy'],
                          'train_loss': epochs[-1]['train_loss'], 'train_seconds': sum(e['epoch_seconds'] for e in epochs),
                          'steps': final['n_epochs'] * train.parse_args(argv).n_iters_per_train_epoch,
                          'meta': finish_meta(meta)}
                with open(os.path.join(args.records, f'{config}.jsonl'), 'a') as f:
                    f.write(json.dumps(record) + '\n')


def named_config(name):
    """The study's configuration of RoutingHead.CONFIGURATIONS[name] (a head the library names)."""
    sizes = RoutingHead.CONFIGURATIONS[name]
    return next(c for c, (_, options) in CONFIGS.items() if {**RoutingHead.CONFIGURATIONS['paper'], **options} == sizes)


def save_pretrained(args):
    """The heads of RoutingHead.CONFIGURATIONS['light'] with the best dev accuracy over the recorded seeds, each
    dataset's, -> PRETRAINED_LIGHT[dataset], with their test accuracy through the live backbone (train.py
    --eval_only) beside the feature cache's."""
    config = named_config('light')
    for dataset, folder in PRETRAINED_LIGHT.items():
        seed, record = max(((seed, runs[dataset]) for seed, runs in read_records(args.records)[config].items()
                            if dataset in runs), key=lambda found: found[1]['valid_accuracy'])
        run = train.parse_args(study_runs(config, seed, args.data_root, args.out, args.feature_cache)[dataset])
        with tempfile.TemporaryDirectory() as tmp:
            live = live_test_accuracy(os.path.join(run.output_dir, 'model'), dataset, args.data_root, tmp)
        then = ' (its SST-2 run fine-tunes that seed\'s SST-5 head)' if dataset == 'sst2' else ''
        publish_pretrained(os.path.join(run.output_dir, 'model'), folder, dataset, live, record['test_accuracy'],
                           record['valid_accuracy'], trained_by=f"python -m benchmarks.routing_head_study --run "
                           f"(configuration {config}, seed {seed}, the best dev accuracy of the seeds{then})")
        print(f"routing_head_study: {folder} <- {config} seed {seed}: dev {record['valid_accuracy']:.4f}, test "
              f"{live:.4f} (live backbone), {record['test_accuracy']:.4f} (feature cache)")


def run_meta(record):
    """A run record's meta (measurement_meta's fields); the first records, written before the study used
    benchmarks.common's meta, hold the same facts under other names."""
    if 'meta' in record:
        return record['meta']
    return {'command': record['command'], 'commit': record['commit'][:7] + ('+changes' if '+' in record['commit'] else ''),
            'when': record['started'][:16] + ' UTC', 'cpu_model': record['cpu_model'], 'cpu_count': record['cpu_count'],
            'torch': record['torch'], 'threads': record['torch_threads'], 'precision': PRECISION,
            'load_start': round(record['load_average_at_start'][0], 2),
            'load_end': round(record['load_average_at_end'][0], 2)}


def costs(args):
    """-> {name: {'parameters', 'gflop_per_step'}} of every configuration and of head (c): each one's SST-5 run of
    the offline recipe built by train.py's stages (train.build_run), and the FLOPs FlopCounterMode counts in
    train.train_step over the first --flop_steps batches of its training stream (the same batches for all: the
    same seed)."""
    from torch.utils.flop_counter import FlopCounterMode
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in step_argvs(args, tmp).items():
            args_of_run = train.parse_args(argv)
            with run_settings(args_of_run):                 # the run's matmul precision, threads and seeds
                run = train.build_run(args_of_run)
                run.head.train()
                with FlopCounterMode(display=False) as counter:
                    for _ in range(args.flop_steps):
                        train.train_step(run, next(run.batches))
            result[name] = {'parameters': sum(p.numel() for p in run.head.parameters()),
                            'gflop_per_step': counter.get_total_flops() / args.flop_steps / 1e9}
            train.release_output_dir(run.args.output_dir)
    return result


def step_argvs(args, tmp):
    """-> {name: train.py arguments} of the SST-5 run of every configuration and of head (c), outputs under tmp."""
    argvs = {config: study_runs(config, 0, args.data_root, os.path.join(tmp, 'study'), args.feature_cache)['sst5']
             for config in CONFIGS}
    argvs[STANDARD_HEAD] = [*recipes.runs('offline', args.data_root, os.path.join(tmp, 'offline'),
                                          feature_cache=args.feature_cache)['sst5'], '--model', STANDARD_HEAD]
    return {name: [*argv, '--output_dir', os.path.join(tmp, name), '--device', 'cpu'] for name, argv in argvs.items()}


def render(records):
    """docs/routing_head_study.md from the records folder (the runs' <configuration>.jsonl, costs.json,
    time_per_step.json) and the committed docs/sst_results/record.json beside it; nothing is measured."""
    found = read_records(records)
    cost = load_record(os.path.join(records, 'costs.json'))
    timing_path = os.path.join(records, 'time_per_step.json')
    timing = load_record(timing_path) if os.path.exists(timing_path) else None
    complete = {c: {s: r for s, r in found.get(c, {}).items() if set(r) == set(DATASETS)} for c in CONFIGS}
    acc = {c: {d: [r[d]['test_accuracy'] for r in seeds.values()] for d in DATASETS} for c, seeds in complete.items()}
    steps = timing['seconds_per_step'] if timing else {}
    flops = {c: v['gflop_per_step'] for c, v in cost['heads'].items()}

    def ratio(values, c):
        return f"{values[c] / values[BASELINE]:.2f}" if c in values and BASELINE in values else ''

    lines = ["| configuration (RoutingHead options) | parameters (SST-5) | GFLOP / step | FLOPs / paper's | s / step "
             "| s / step / paper's | SST-5 test (%) | SST-2 test (%) | seeds |", '|---|---|---|---|---|---|---|---|---|']
    for c in [*SHOWN, STANDARD_HEAD]:
        if c == STANDARD_HEAD:
            what, cells, n = f"head (c) {c} (benchmarks/frozen_heads.py; not trained here)", ['', ''], ''
        else:
            shown = ', '.join(f'{k} {v}' for k, v in CONFIGS[c][1].items()) or 'defaults'
            what, n = f"`{c}`: {CONFIGS[c][0]} ({shown})", len(complete[c])
            cells = [mean_std(acc[c][d]) if acc[c][d] else 'not run' for d in DATASETS]
        step = f"{steps[c]:.3f}" if c in steps else ''
        lines.append(f"| {what} | {cost['heads'][c]['parameters']:,} | {flops[c]:.2f} | {ratio(flops, c)} | {step} "
                     f"| {ratio(steps, c)} | {cells[0]} | {cells[1]} | {n} |")
    base, source = baseline(acc, committed_baseline(os.path.join(os.path.dirname(os.path.abspath(records)),
                                                                 'sst_results', 'record.json')))
    lines += ['', verdict(acc, flops, base), '', "The paper's head to compare with: " + source + ', SST-5 '
              + ', SST-2 '.join(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in base.values()) + '.', '']
    lines += ["Test accuracy of the final head of each run (nothing chosen on test), mean ± sample std over seeds, in "
              "the offline profile's budget (`bash train_all_heads.sh offline`): SST-5 1 epoch of 2000 steps of 32 "
              "phrases, then SST-2 1 x 2000 x 32 fine-tuning the last routing of the SST-5 head (the rest frozen, "
              "the projection included), RAdam, one cycle (max lr 1e-3), mixup Beta(0.65, 0.65), features from the "
              "float16 feature cache. FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one SST-5 training step "
              f"(mixup, forward, loss, backward; matrix products only), averaged over the first {cost['flop_steps']} "
              "batches of the training stream (seed 0, the same batches for every head). " + how_measured(cost['meta']),
              '']
    if timing:
        loads = ', '.join(f"{v:.1f}" for v in timing['load_average_1min'])
        lines += [f"Seconds per step: every head's SST-5 run of the offline recipe built by train.py's stages, then "
                  f"{timing['rounds']} rounds of {timing['steps'] // timing['rounds']} steps of every head in turn (one "
                  f"untimed round first), in one process; load average (1 min) at each round: {loads}. Compare the "
                  f"heads with each other, not with other tables. " + how_measured(timing['meta']), '']
    lines += ['Per seed (dev / test, %; the load average of the SST-5 run at its start and end; the runs shared the '
              'machine, some were stopped for a while, so their own times are no measure of speed: the seconds per '
              'step above are):', '', '| configuration | seed | SST-5 dev | SST-5 test | SST-2 dev | SST-2 test '
              '| SST-5 run: load at start, end |', '|---|---|---|---|---|---|---|']
    for c in SHOWN:
        for seed, r in sorted(found.get(c, {}).items()):
            cells = [f"{100 * r[d][k]:.2f}" if d in r else '' for d in DATASETS
                     for k in ('valid_accuracy', 'test_accuracy')]
            s5 = r.get('sst5')
            load = f"{run_meta(s5)['load_start']}, {run_meta(s5)['load_end']}" if s5 else ''
            lines.append(f"| {c} | {seed} | {' | '.join(cells)} | {load} |")
    made = sorted({(m['commit'], m['cpu_model'], m['cpu_count'], m['torch'], m['threads'], m['precision'])
                   for seeds in found.values() for runs in seeds.values() for m in map(run_meta, runs.values())})
    lines += ['', 'The runs were made by `python -m benchmarks.routing_head_study --run` (each record in '
              f'{RECORDS}/<configuration>.jsonl holds its train.py command and its meta) with: '
              + ('; '.join(f"commit {m[0]}, CPU {m[1]} ({m[2]} cores, shared), torch {m[3]}, {m[4]} thread(s), "
                           f"precision: {m[5]}" for m in made) or 'none recorded yet') + '.']
    return '\n'.join(lines)


def summary(records, docs='docs/'):
    """The study's findings in a paragraph, from its records (the README's and docs/choosing_a_head.md's generated
    block; docs: the docs folder as the page links it)."""
    found, cost = read_records(records), load_record(os.path.join(records, 'costs.json'))
    flops = {c: v['gflop_per_step'] for c, v in cost['heads'].items()}
    complete = {c: [r for r in found.get(c, {}).values() if set(r) == set(DATASETS)] for c in CONFIGS}
    acc = {c: {d: [r[d]['test_accuracy'] for r in runs] for d in DATASETS} for c, runs in complete.items()}
    base, _ = baseline(acc, committed_baseline(os.path.join(os.path.dirname(os.path.abspath(records)), 'sst_results',
                                                            'record.json')))
    lighter = [c for c in CONFIGS if c != BASELINE]
    shown = '; '.join(f"{CONFIGS[c][0]} {flops[c]:.2f} ({flops[c] / flops[BASELINE]:.2f}x)" for c in lighter)
    def so_far(c, d):
        values = [r[d]['test_accuracy'] for r in found.get(c, {}).values() if d in r]
        return f"{mean_std(values)} ({len(values)} seed{'s' if len(values) > 1 else ''})" if values else 'not run yet'

    ran = [c for c in lighter if found.get(c)]
    accuracy = ('; '.join(f"{CONFIGS[c][0]} {so_far(c, 'sst5')} / {so_far(c, 'sst2')}" for c in ran)
                if ran else 'none recorded yet')
    return (f"**Is there a lighter routing head?** FLOPs of one SST-5 training step (batch 32, FlopCounterMode): the "
            f"paper's head {flops[BASELINE]:.2f} GFLOP, head (c) {flops[STANDARD_HEAD]:.2f} "
            f"({flops[STANDARD_HEAD] / flops[BASELINE]:.2f}x); lighter routing heads: {shown}. Test accuracy in the "
            f"offline profile's budget (SST-5 / SST-2), against the paper's head's {100 * base['sst5'][0]:.1f} ± "
            f"{100 * base['sst5'][1]:.1f} / {100 * base['sst2'][0]:.1f} ± {100 * base['sst2'][1]:.1f}: {accuracy}. "
            + verdict(acc, flops, base) + f" `python -m benchmarks.routing_head_study`, "
            f"[{docs}routing_head_study.md]({docs}routing_head_study.md).")


def committed_baseline(path=SST_RESULTS):
    """The paper's head in this budget as docs/sst_results/record.json records it (benchmarks.sst_results, seeds
    0-2: the offline profile's regime) -> {dataset: (mean, std)} (fractions)."""
    cells = load_record(path)['routing_head']                          # {'sst5': '45.3 ± 1.1', ...}
    return {d: tuple(float(v) / 100 for v in cells[d].split(' ± ')) for d in DATASETS}


def baseline(acc, committed):
    """The paper's head's {dataset: (mean, std)} and where it comes from: this study's runs where they have at least
    two seeds on both datasets, else the committed ones (committed_baseline)."""
    own = acc[BASELINE]
    if all(len(own[d]) >= 2 for d in DATASETS):
        return ({d: (statistics.mean(own[d]), statistics.stdev(own[d])) for d in DATASETS},
                f"this study's runs of the paper's head ({len(own['sst5'])} seeds)")
    return committed, ("the paper's head in the same budget as [sst_results.md](sst_results.md) records it (seeds 0, "
                       "1, 2 of `python -m benchmarks.sst_results --n_iters_per_train_epoch 2000`)")


def classify(acc, flops, base, max_flops_ratio=1 / 3, min_seeds=3):
    """-> (floors, light, held, pending): the bar per dataset (the paper's head's mean - std, base: {dataset: (mean,
    std)}); the configurations with min_seeds seeds or more whose mean test accuracy reaches it on SST-5 and on SST-2
    at max_flops_ratio of its FLOPs or less (light, lightest first) and at more (held); those with fewer seeds."""
    floors = {d: base[d][0] - base[d][1] for d in DATASETS}
    held, light = [], []
    pending = [c for c in CONFIGS if c != BASELINE and len(acc[c]['sst5']) < min_seeds]
    for c in CONFIGS:
        if c == BASELINE or c in pending:
            continue
        if all(statistics.mean(acc[c][d]) >= floors[d] for d in DATASETS):
            (light if flops[c] <= max_flops_ratio * flops[BASELINE] else held).append(c)
    return floors, sorted(light, key=flops.get), held, pending


def verdict(acc, flops, base, max_flops_ratio=1 / 3, min_seeds=3):
    """The study's answer: the configurations (with min_seeds seeds or more) whose mean test accuracy is within one
    standard deviation of the paper's head's (base: {dataset: (mean, std)}) on SST-5 and on SST-2, at
    max_flops_ratio of its FLOPs or less, lightest first; and which of them the library names 'light'."""
    floors, light, held, pending = classify(acc, flops, base, max_flops_ratio, min_seeds)
    floor = ' and '.join(f"{100 * floors[d]:.1f}% on {DATASETS[d]}" for d in DATASETS)
    if len(pending) == len(CONFIGS) - 1:
        return (f"**Not answered yet: no lighter configuration has {min_seeds} seeds on record** (the bar: a mean test "
                f"accuracy of at least {floor}, within one std of the paper's head, at one third of its FLOPs or less).")
    if light:
        answer = (f"**Within one std of the paper's head (mean test accuracy at least {floor}) at one third of its "
                  f"FLOPs or less: {', '.join(f'`{c}`' for c in light)}.**")
        named = named_config('light')
        answer += (f" The lightest, `{light[0]}`, is the configuration the library names `light` "
                   f"(`RoutingHead.named('light', ...)`, `train.py --head_config light`)." if named == light[0] else
                   f" The library's `light` configuration, `{named}`, "
                   + ('holds too.' if named in light else f'has fewer than {min_seeds} seeds on record.'
                      if named in pending else 'does not hold here.'))
    else:
        answer = (f"**No configuration with {min_seeds} seeds on record is within one std of the paper's head (mean "
                  f"test accuracy at least {floor}) at one third of its FLOPs or less.**")
    if held:
        answer += f" Within one std at more than a third of its FLOPs: {', '.join(f'`{c}`' for c in held)}."
    if pending:
        answer += (f" Not counted, fewer than {min_seeds} seeds on record: {', '.join(f'`{c}`' for c in pending)} "
                   f"(preliminary).")
    return answer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run', action='store_true', help='train the runs the records lack first (long)')
    p.add_argument('--configs', default=','.join(CONFIGS), help=f"--run: comma-separated, among {','.join(CONFIGS)}")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='--run: these seeds')
    p.add_argument('--datasets', nargs='+', default=list(DATASETS), choices=list(DATASETS),
                   help='--run: these stages only (sst2 needs the sst5 run of the same configuration and seed)')
    p.add_argument('--data_root', default='.data')
    p.add_argument('--feature_cache', default='.data/features')
    p.add_argument('--out', default='runs/routing-head-study', help='the training runs (--run)')
    p.add_argument('--records', default=RECORDS)
    p.add_argument('--costs', action='store_true', help='measure the parameters and FLOPs per step of every head')
    p.add_argument('--flop_steps', type=int, default=10)
    p.add_argument('--time_steps', type=int, default=None, help='measure the seconds per step of every head')
    p.add_argument('--save_pretrained', action='store_true',
                   help="copy the heads of RoutingHead.CONFIGURATIONS['light'] of best dev accuracy to pretrained/")
    p.add_argument('--report', default='docs/routing_head_study.md')
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(',') if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose among {', '.join(CONFIGS)}")
    if args.run:
        run_missing(args)
        return
    if args.save_pretrained:
        save_pretrained(args)
        return
    command = shown_command('benchmarks.routing_head_study', sys.argv[1:] if argv is None else argv)
    if args.costs:
        meta = measurement_meta(command, 'float32; FLOPs are counted, not timed')
        save_record({'heads': costs(args), 'flop_steps': args.flop_steps, 'meta': finish_meta(meta)},
                    os.path.join(args.records, 'costs.json'))
    if args.time_steps:
        meta = measurement_meta(command, PRECISION)
        with tempfile.TemporaryDirectory() as tmp:
            timing = time_runs(step_argvs(args, tmp), args.time_steps)
        save_record({**timing, 'meta': finish_meta(meta)}, os.path.join(args.records, 'time_per_step.json'))
    write_report([render(args.records)], args.report)


if __name__ == '__main__':
    main()
