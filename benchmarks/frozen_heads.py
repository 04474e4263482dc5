"""
The routing head against the standard heads on the same frozen features: each head trained in the paper's
SST regime on frozen all-MiniLM-L6-v2 (RAdam, one cycle, mixup; SST-5 10 x 2000 x 50, then SST-2 3 x 2000 x 50
fine-tuning the last stage of the SST-5 head), 3 seeds, every choice by dev only.

    OMP_NUM_THREADS=1 SEED=0 HEADS=scalar_mix_mean bash train_all_heads.sh frozen-heads &   # each seed, head
    python -m benchmarks.frozen_heads --time_steps 200     # time per training step of every head, in turn
    python -m benchmarks.frozen_heads                      # docs/frozen_heads.md from the runs' metrics

Heads (models.py): (a) scalar_mix_mean, ScalarMixMeanHead: a learned softmax mix of the depths (ELMo's ScalarMix /
SUPERB's weighted sum), mean over tokens, Linear; (b) scalar_mix_attention, ScalarMixAttentionHead: the same mix,
attention pooling with one learned query, Linear; (c) token_depth_attention, TokenDepthAttentionHead: attention
pooling of all (token, depth) vectors by 8 learned queries (a PMA block), Linear, about the routing head's parameter
count. SST-2 fine-tunes each head's final Linear only (`classify`, re-initialised for 2 classes) from the final SST-5
head, the analogue of the routing head's last routing (the stage that maps the pooled representation to classes).

1. Each finished run's metrics.jsonl (under --runs/<head>/seed<k>/{sst5,sst2}) is copied to
   docs/frozen_heads/<head>_seed<k>_<dataset>.jsonl; seeds recorded there earlier are kept and counted.
2. --time_steps N: every head, the routing head included, trains N steps of SST-5 (batch 50, the regime's settings,
   from the feature cache), in rounds that take every head in turn (the same load for all); seconds per step and the
   load average are recorded in docs/frozen_heads/time_per_step.json.
3. docs/frozen_heads.md: parameters, test accuracy mean ± std over the recorded seeds, seconds per step, beside the
   routing head's paper-regime seeds (docs/sst_paper_regime/seed<k>_{sst5,sst2}.jsonl).
"""
import argparse
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import (finish_meta, how_measured, load_record, mean_std, measurement_meta, save_record,
                               shown_command, write_report)
from heinsen_replication import models, standard_heads
from heinsen_replication.runs import read_metrics

HEADS = {'routing_head': "routing head (2022), the paper's", 'scalar_mix_mean': '(a) ScalarMix, mean pooling, Linear',
         'scalar_mix_attention': '(b) ScalarMix, attention pooling (1 query), Linear',
         'token_depth_attention': '(c) attention pooling of (token, depth) vectors (8 queries), Linear'}
DATASETS = {'sst5': 'SST-5', 'sst2': 'SST-2'}
D_DEPTH, D_EMB = 7, 384                                  # minilm: embeddings + 6 layers, 384 features


def n_parameters(name, n_classes):
    cls = models.RoutingHead if name == 'routing_head' else standard_heads.FROZEN_HEADS[name]
    return sum(p.numel() for p in cls(D_DEPTH, D_EMB, n_classes).parameters())


def n_finetuned(name):
    """Parameters the SST-2 fine-tuning trains: the last routing (routing head) or the final Linear `classify`."""
    cls = models.RoutingHead if name == 'routing_head' else standard_heads.FROZEN_HEADS[name]
    prefix = 'route.2.' if name == 'routing_head' else cls.LAST_STAGE
    return sum(p.numel() for k, p in cls(D_DEPTH, D_EMB, 2).named_parameters() if k.startswith(prefix))


def collect(runs, records):
    """Copies finished runs' metrics into records/ and reads every recorded one.
    -> {head: {seed: {dataset: (epochs, final)}}} (routing head: the paper-regime records), and the unfinished runs
    under runs: [(head, seed, dataset, epochs done)]."""
    os.makedirs(records, exist_ok=True)
    unfinished = []
    for path in sorted(glob.glob(os.path.join(runs, '*', 'seed*', 'sst*', 'metrics.jsonl'))):
        head, seed, dataset = path.split(os.sep)[-4:-1]
        if head not in standard_heads.FROZEN_HEADS or dataset not in DATASETS:
            continue
        epochs, final = read_metrics(path)
        if final is None:
            unfinished.append((head, seed, dataset, len(epochs)))
        else:
            shutil.copyfile(path, os.path.join(records, f"{head}_{seed}_{dataset}.jsonl"))
    return recorded(records), unfinished


def time_steps(args, rounds=10):
    """Seconds per training step of every head, the routing head included: each head's SST-5 run of its recipe
    (recipes.py: paper-minilm, frozen-heads) timed by time_runs. -> the record of time_per_step.json"""
    from heinsen_replication import recipes
    argvs = {'routing_head': recipes.runs('paper-minilm', args.data_root, feature_cache=args.feature_cache)['sst5']}
    argvs.update({name: argv for stage, argv in recipes.runs('frozen-heads', args.data_root,
                                                             feature_cache=args.feature_cache).items()
                  for name in standard_heads.FROZEN_HEADS if stage == f'{name}/sst5'})
    with tempfile.TemporaryDirectory() as tmp:
        return time_runs({name: [*argvs[name], '--output_dir', os.path.join(tmp, name), '--device', 'cpu']
                          for name in HEADS}, args.time_steps, rounds)


def time_runs(argvs, n_steps, rounds=10):
    """Seconds per training step of several train.py runs ({name: arguments}) on the same batches' kind and the
    same load, in one process: each run is built by train.py's own stages (train.build_run), then `rounds` rounds,
    each timing n_steps / rounds steps (train.train_step: the next batch of the training stream from the feature
    cache, mixup, forward, loss, backward, optimizer step) of every run in turn, after one untimed round; each run
    built and timed in its own process-global settings (run_settings: matmul precision, threads, seeds).
    -> {'seconds_per_step': {name: s}, 'steps', 'rounds', 'load_average_1min': [one per round], 'cpu_count',
    'cpu_model', 'omp_num_threads'}"""
    import train
    from heinsen_replication import recipes
    from heinsen_replication.settings import run_settings
    per_round = max(1, n_steps // rounds)
    seconds, loads, runs = {name: 0.0 for name in argvs}, [], {}
    for name, argv in argvs.items():
        args_of_run = train.parse_args(argv)
        with run_settings(args_of_run):
            runs[name] = train.build_run(args_of_run)
        runs[name].head.train()
    for r in range(rounds + 1):
        loads.append(os.getloadavg()[0])
        for name, run in runs.items():
            with run_settings(run.args, seed=False):
                started = time.perf_counter()
                for _ in range(per_round):
                    loss, _ = train.train_step(run, next(run.batches))
                    loss.item()
            if r > 0:                                                            # round 0 warms up
                seconds[name] += time.perf_counter() - started
    for run in runs.values():
        train.release_output_dir(run.args.output_dir)
    return {'seconds_per_step': {name: t / (rounds * per_round) for name, t in seconds.items()},
            'steps': rounds * per_round, 'rounds': rounds, 'load_average_1min': loads,
            'cpu_count': os.cpu_count(), 'cpu_model': recipes.cpuinfo('model name'),
            'omp_num_threads': os.environ.get('OMP_NUM_THREADS')}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default='runs/frozen-heads', help="the OUT/frozen-heads folder of train_all_heads.sh")
    p.add_argument('--records', default='docs/frozen_heads', help='the recorded metrics (kept across sittings)')
    p.add_argument('--data_root', default='.data')
    p.add_argument('--feature_cache', default='.data/features')
    p.add_argument('--time_steps', type=int, default=None, help='measure the time per step of every head first')
    p.add_argument('--report', default='docs/frozen_heads.md')
    args = p.parse_args(argv)
    if args.time_steps:
        command = shown_command('benchmarks.frozen_heads', sys.argv[1:] if argv is None else argv)
        meta = measurement_meta(command, "float32, matmul precision medium (the paper-minilm recipe)")
        timing = time_steps(args)
        save_record({**timing, 'meta': finish_meta(meta)}, os.path.join(args.records, 'time_per_step.json'))
    found, unfinished = collect(args.runs, args.records)
    if unfinished:
        print(f"Runs still unfinished under {args.runs} (not counted): "
              + '; '.join(f"{h} {s} {d}: {n} epochs done" for h, s, d, n in unfinished) + '.')
    write_report([render(args.records)], args.report)
    return found


def recorded(records):
    """The recorded runs: {head: {seed: {dataset: (epochs, final)}}} (routing head: the paper-regime records)."""
    found = {name: {} for name in HEADS}
    for path in sorted(glob.glob(os.path.join(records, '*_seed*_sst*.jsonl'))):
        head, seed, dataset = re.fullmatch(r'(\w+)_seed(\d+)_(sst\d)\.jsonl', os.path.basename(path)).groups()
        found[head].setdefault(int(seed), {})[dataset] = read_metrics(path)
    paper = os.path.join(os.path.dirname(os.path.abspath(records)), 'sst_paper_regime')
    for path in sorted(glob.glob(os.path.join(paper, 'seed*_sst*.jsonl'))):
        seed, dataset = re.fullmatch(r'seed(\d+)_(sst\d)\.jsonl', os.path.basename(path)).groups()
        found['routing_head'].setdefault(int(seed), {})[dataset] = read_metrics(path)
    return found


def render(records):
    """docs/frozen_heads.md from the records folder (the runs' metrics, meta.json: how the runs were made,
    time_per_step.json); nothing is measured."""
    found = recorded(records)
    timing_path = os.path.join(records, 'time_per_step.json')
    timing = load_record(timing_path) if os.path.exists(timing_path) else None
    lines = ["| head (frozen all-MiniLM-L6-v2, all 7 depths) | parameters (SST-5) | SST-2 fine-tuned | SST-5 test (%) "
             "| SST-2 test (%) | seeds | s / step (SST-5, batch 50) |", '|---|---|---|---|---|---|---|']
    for name, what in HEADS.items():
        seeds = {s: r for s, r in found[name].items() if set(r) == set(DATASETS)}
        tests = [mean_std([r[d][1]['test_accuracy'] for r in seeds.values()]) if seeds else 'not finished'
                 for d in DATASETS]
        step = f"{timing['seconds_per_step'][name]:.3f}" if timing and name in timing['seconds_per_step'] else ''
        lines.append(f"| {what} | {n_parameters(name, 5):,} | {n_finetuned(name):,} | {tests[0]} | {tests[1]} "
                     f"| {len(seeds)} | {step} |")
    lines += ['', "Test accuracy of the final head (after the last epoch, as the paper; nothing chosen on test or on "
              "dev), mean ± sample std over the seeds whose SST-5 and SST-2 runs both finished, from the float16 "
              "feature cache. SST-2 fine-tunes, from the final SST-5 head, the routing head's last routing or the "
              "other heads' final Linear (re-initialised for 2 classes); the rest stays frozen.", '',
              "The standard heads' runs (the routing head's: [sst_paper_regime.md](sst_paper_regime.md)): "
              + how_measured(load_record(os.path.join(records, 'meta.json'))), '']
    if timing:
        loads = ', '.join(f"{v:.1f}" for v in timing['load_average_1min'])
        lines += [f"Seconds per step: each head's SST-5 run built by train.py's stages, then {timing['rounds']} rounds "
                  f"of {timing['steps'] // timing['rounds']} steps of every head in turn (batch 50 from the feature "
                  f"cache, mixup, forward, backward, RAdam step; one untimed round first), in one process; load "
                  f"average (1 min) at each round: {loads}. " + how_measured(timing['meta']), '']
    lines += ['Per seed (dev / test, %; the last column from the runs\' own epoch times, which depend on how the runs '
              'shared the machine):', '', '| head | seed | SST-5 dev | SST-5 test | SST-2 dev | SST-2 test | '
              'SST-5 s / step in the run |', '|---|---|---|---|---|---|---|']
    for name in HEADS:
        for seed, r in sorted(found[name].items()):
            cells = [f"{100 * r[d][1][k]:.2f}" if d in r else '' for d in DATASETS
                     for k in ('valid_accuracy', 'test_accuracy')]
            step = f"{statistics.mean(e['epoch_seconds'] for e in r['sst5'][0]) / 2000:.3f}" if 'sst5' in r else ''
            lines.append(f"| {name} | {seed} | {' | '.join(cells)} | {step} |")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
