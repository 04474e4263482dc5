"""
The 2022 routing head in the paper's own SST regime on the offline backbone: SST-5 for 10 epochs of 2000 batches
of 50, then SST-2 for 3 x 2000 x 50 fine-tuning only the last routing of the final SST-5 head (`bash
train_all_heads.sh paper-minilm`, one run per seed), summarised from the runs' metrics.jsonl:

    OMP_NUM_THREADS=1 SEED=0 bash train_all_heads.sh paper-minilm &    # and SEED=1, SEED=2 (resumable)
    python -m benchmarks.sst_paper_regime --save_pretrained

1. Each finished seed's metrics (per epoch: train loss and accuracy under mixup, dev accuracy; at the end: dev and
   test accuracy of the final head) are copied to docs/sst_paper_regime/seed<k>_{sst5,sst2}.jsonl. Those are the
   per-seed figures; seeds recorded there earlier (another sitting, another machine) are kept and counted.
2. docs/sst_paper_regime.md: the per-seed table and the mean +- std over seeds; docs/sst_paper_regime_curves.png:
   the learning curves of every seed.
3. --save_pretrained: the run with the best dev accuracy (of the runs under --runs) replaces the committed
   pretrained head of its dataset if its dev accuracy is higher (dev only decides); its test accuracy is measured
   again on the live backbone (train.py --eval_only). The deletion test (benchmarks.sst_results) is re-run on the
   committed SST-2 head. Reported in docs/sst_paper_regime_pretrained.md, which only this option rewrites.
4. Diagnostic variants (not the paper's recipe; chosen and judged on dev only): SST-2 from seed 0's final SST-5 head
   with one setting changed (VARIANTS). `--run_variants NAME ...` trains them (train.py, resumable) into
   --variants/<name>; the report lists every finished one beside the paper's recipe for seed 0.
5. Which depths the credit uses (dev only): for each seed's final SST-5 and SST-2 heads, the share of the absolute
   end-to-end credit for the predicted class that falls on each of minilm's 7 depths (embeddings = 0), averaged
   over the dev sentences, read from the feature cache (--feature_cache).
"""
import argparse
import glob
import os
import re
import shutil
import statistics
import sys

import torch

from benchmarks.common import (PRETRAINED, better_on_dev, committed_valid_accuracy, deletion_test, finish_meta,
                               how_measured, load_record, mean_std, measurement_meta, publish_pretrained, save_record,
                               shown_command, sst_feature_store, write_report)
from heinsen_replication import checkpoints, data, recipes
from heinsen_replication.runs import read_metrics

DATASETS = {'sst5': 'SST-5', 'sst2': 'SST-2'}
# name -> (what changes against the paper's SST-2 recipe, train.py arguments added to it)
VARIANTS = {
    'finetune_all': ('every parameter of the head fine-tuned (not only the last routing)', ['--finetune', 'all']),
    'no_mixup': ('no mixup (Beta(0.65, 0.65) off), last routing only', ['--mixup_alpha', '0']),
}


def run_variant(args, name):
    """Trains variant `name` of seed 0's SST-2 run: the paper-minilm recipe's SST-2 run with its own arguments added."""
    import train
    argv = recipes.runs('paper-minilm', data_root=args.data_root, seed=0, feature_cache=args.feature_cache)['sst2']
    train.main([*argv, '--pretrained_path', os.path.join(args.runs, 'seed0', 'sst5', 'model'),
                '--output_dir', os.path.join(args.variants, name), *VARIANTS[name][1]])


def record_if_finished(metrics_path, record_path):
    """Copies a run's metrics.jsonl to record_path once the run has finished (its final record is written)."""
    if os.path.exists(metrics_path) and read_metrics(metrics_path)[1] is not None:
        shutil.copyfile(metrics_path, record_path)


def collect(runs, docs):
    """Copies the finished runs' metrics (runs None: none) into docs/ (one file per seed and dataset) and reads every
    recorded seed.
    -> {seed: {dataset: (epochs, final)}} for the seeds whose SST-5 and SST-2 runs have both finished."""
    os.makedirs(docs, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(runs, 'seed*', 'sst*', 'metrics.jsonl')) if runs else []):
        seed_dir, dataset = os.path.split(os.path.dirname(path))
        if dataset in DATASETS:
            record_if_finished(path, os.path.join(docs, f"{os.path.basename(seed_dir)}_{dataset}.jsonl"))
    seeds = {}
    for path in sorted(glob.glob(os.path.join(docs, 'seed*_sst*.jsonl'))):
        seed, dataset = re.fullmatch(r'seed(\d+)_(sst\d)\.jsonl', os.path.basename(path)).groups()
        seeds.setdefault(int(seed), {})[dataset] = read_metrics(path)
    return {seed: runs for seed, runs in sorted(seeds.items()) if set(runs) == set(DATASETS)}


def plot_curves(seeds, path):
    """Train loss, train accuracy (under mixup) and dev accuracy per epoch, SST-5 then SST-2, every seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for row, dataset in enumerate(DATASETS):
        loss_ax, acc_ax = axes[row]
        for k, (seed, runs) in enumerate(seeds.items()):
            epochs, _ = runs[dataset]
            x = [r['epoch'] for r in epochs]
            color = f"C{k}"
            loss_ax.plot(x, [r['train_loss'] for r in epochs], 'o-', color=color, label=f"seed {seed}")
            acc_ax.plot(x, [100 * r['train_acc'] for r in epochs], 'o--', color=color, alpha=0.6,
                        label=f"seed {seed}, train (mixup)")
            acc_ax.plot(x, [100 * r['valid_acc'] for r in epochs], 'o-', color=color, label=f"seed {seed}, dev")
        steps = '2000 steps of 50'
        loss_ax.set(title=f"{DATASETS[dataset]}: training loss (mixup targets)", xlabel=f"epoch ({steps})",
                    ylabel='cross-entropy')
        acc_ax.set(title=f"{DATASETS[dataset]}: accuracy", xlabel=f"epoch ({steps})", ylabel='%')
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        loss_ax.legend(fontsize=8)
        acc_ax.legend(fontsize=8)
    fig.suptitle("RoutingHead on frozen all-MiniLM-L6-v2, the paper's SST regime (SST-2 fine-tunes the last routing)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def depth_credit(head, dev, batch_sz=100):
    """-> [d_depth]: the mean over dev samples of each depth's share of the absolute end-to-end credit for the
    predicted class (summed over positions)."""
    head.eval()
    batches = data.LengthGroupedBatchSampler(dev.lengths, batch_sz, shuffle=False)
    shares = []
    for batch in batches:
        hidden, mask, _ = data.collate_features([dev[i] for i in batch])
        credit, scores = head.credit(hidden, mask)                              # [b, n_pos, d_depth, n_classes]
        predicted = credit[torch.arange(len(batch)), ..., scores.argmax(-1)]     # [b, n_pos, d_depth]
        per_depth = predicted.abs().sum(dim=1)                                   # [b, d_depth]
        shares.append(per_depth / per_depth.sum(dim=-1, keepdim=True))
    return torch.cat(shares).mean(dim=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default='runs/paper-minilm', help='the OUT/paper-minilm folder of train_all_heads.sh')
    p.add_argument('--data_root', default='.data', help='folder holding sst/{train,dev,test}.txt')
    p.add_argument('--save_pretrained', action='store_true',
                   help='replace the committed heads by the best-dev runs if better on dev; rerun the deletion test')
    p.add_argument('--feature_cache', default='.data/features', help="train.py's --feature_cache of the runs")
    p.add_argument('--variants', default='runs/paper-minilm-variants', help='where the diagnostic variants train')
    p.add_argument('--run_variants', nargs='+', default=[], choices=sorted(VARIANTS),
                   help='train these variants first (each resumes where it stopped)')
    p.add_argument('--records', default='docs/sst_paper_regime',
                   help="the per-seed metrics (copied from --runs, kept across sittings); curves: <records>_curves.png")
    p.add_argument('--report', default='docs/sst_paper_regime.md')
    args = p.parse_args(argv)
    for name in args.run_variants:
        run_variant(args, name)
    seeds = collect(args.runs, args.records)
    if not seeds:
        raise SystemExit(f"no seed has finished both runs in {args.runs} (nor is one recorded in {args.records})")
    plot_curves(seeds, args.records + '_curves.png')
    for name in VARIANTS:
        record_if_finished(os.path.join(args.variants, name, 'metrics.jsonl'),
                           os.path.join(args.records, f'variant_{name}.jsonl'))
    command = shown_command('benchmarks.sst_paper_regime', sys.argv[1:] if argv is None else argv)
    meta = measurement_meta(command, 'float32 (the credit of the float16 cache)')
    store = sst_feature_store(args.data_root, args.feature_cache)
    shares = {}
    for dataset in DATASETS:
        dev_split = data.get_dataset_splits(dataset, data_root=args.data_root)['valid']
        dev = store.dataset(dev_split.texts, dev_split.labels)
        heads = [os.path.join(args.runs, f'seed{seed}', dataset, 'model') for seed in seeds]
        heads = [h for h in heads if os.path.isdir(h)]
        if heads:
            shares[dataset] = {'n_seeds': len(heads), 'share': torch.stack(
                [depth_credit(checkpoints.from_pretrained(h)[0], dev) for h in heads]).mean(dim=0).tolist()}
    record_path = os.path.join(args.records, 'record.json')
    record = load_record(record_path) if os.path.exists(record_path) else {}
    save_record({**record, 'depth_credit': shares, 'depth_credit_meta': finish_meta(meta)}, record_path)
    write_report([render(args.records)], args.report)
    if args.save_pretrained:
        publish(args, seeds, command)
    return seeds


def render(records):
    """docs/sst_paper_regime.md from the records folder (per-seed metrics, variants, record.json: how the runs were
    made and the credit per depth); nothing is measured."""
    seeds = collect(None, records)
    record = load_record(os.path.join(records, 'record.json'))
    lines = ["| seed | SST-5 dev | SST-5 test | SST-2 dev | SST-2 test | SST-5 min / epoch | SST-2 min / epoch |",
             "|---|---|---|---|---|---|---|"]
    for seed, runs in seeds.items():
        cells = []
        for dataset in DATASETS:
            final = runs[dataset][1]
            cells += [f"{100 * final['valid_accuracy']:.2f}", f"{100 * final['test_accuracy']:.2f}"]
        minutes = [statistics.mean(r['epoch_seconds'] for r in runs[d][0]) / 60 for d in DATASETS]
        lines.append(f"| {seed} | {' | '.join(cells)} | {minutes[0]:.1f} | {minutes[1]:.1f} |")
    summary = [mean_std([runs[d][1][k] for runs in seeds.values()], decimals=2) for d in DATASETS
               for k in ('valid_accuracy', 'test_accuracy')]
    lines.append(f"| **mean ± std** ({len(seeds)} seeds) | {' | '.join(summary)} | | |")
    lines += ['', "Accuracies in %, of the final head (after the last epoch, as the paper; nothing chosen on dev or "
              "test), from the float16 feature cache. Minutes per epoch: training only (the dev evaluation after it "
              "is not counted); they depend on how the seeds shared the CPU (docs/results.md, \"The paper's regime "
              "on minilm\").", '', 'The runs: ' + how_measured(record['meta']), '',
              f"![learning curves]({os.path.basename(records)}_curves.png)", '']
    variants = {name: read_metrics(os.path.join(records, f'variant_{name}.jsonl')) for name in VARIANTS
                if os.path.exists(os.path.join(records, f'variant_{name}.jsonl'))}
    if variants and 0 in seeds:
        lines += ["Diagnostic variants, **not the paper's recipe**: SST-2 from seed 0's final SST-5 head with one "
                  "change (`--run_variants`); dev accuracy after each of the 3 epochs, then the final head's test "
                  "accuracy, which played no part in choosing anything:", '',
                  '| SST-2, seed 0 | dev, epoch 1 / 2 / 3 | test |', '|---|---|---|']
        for name, (epochs, final) in [('paper', seeds[0]['sst2'])] + list(variants.items()):
            what = "the paper's recipe (last routing, mixup Beta(0.65, 0.65))" if name == 'paper' else VARIANTS[name][0]
            dev = ' / '.join(f"{100 * r['valid_acc']:.2f}" for r in epochs)
            lines.append(f"| {what} | {dev} | {100 * final['test_accuracy']:.2f} |")
        lines.append('')
    lines += ["Share of the absolute end-to-end credit for the predicted class by depth (dev; mean over sentences, "
              "then over seeds; depth 0 = embeddings):", '', '| head | ' + ' | '.join(map(str, range(7))) + ' |',
              '|---|' + '---|' * 7]
    for dataset, credit in record['depth_credit'].items():
        lines.append(f"| {DATASETS[dataset]} ({credit['n_seeds']} seeds) | "
                     + ' | '.join(f"{100 * v:.1f}%" for v in credit['share']) + ' |')
    lines += ['', how_measured(record['depth_credit_meta'])]
    return '\n'.join(lines)


def publish(args, seeds, command):
    """The best-dev heads into pretrained/ where better on dev than the committed ones, and the deletion test of the
    committed SST-2 head, recorded in <records>/pretrained.json and reported in <report>_pretrained.md (rewritten
    only by --save_pretrained)."""
    meta = measurement_meta(command, 'float32 (the live backbone)')
    choices = []
    for dataset in DATASETS:
        runs_here = [(seed, r[dataset][1]) for seed, r in seeds.items()
                     if os.path.isdir(os.path.join(args.runs, f'seed{seed}', dataset, 'model'))]
        committed = committed_valid_accuracy(dataset)
        choice = {'dataset': dataset, 'committed_valid': committed, 'folder': PRETRAINED[dataset]}
        if runs_here:
            seed, final = max(runs_here, key=lambda r: r[1]['valid_accuracy'])
            choice.update(seed=seed, valid=final['valid_accuracy'], test_cached=final['test_accuracy'])
            if better_on_dev(final['valid_accuracy'], committed):
                import train
                run_model = os.path.join(args.runs, f'seed{seed}', dataset, 'model')
                choice['test_live'] = train.main(['--dataset_name', dataset, '--backbone', 'minilm', '--data_root',
                                                  args.data_root, '--eval_only', '--pretrained_path', run_model,
                                                  '--device', 'cpu'])
                publish_pretrained(run_model, PRETRAINED[dataset], dataset, choice['test_live'],
                                   final['test_accuracy'], final['valid_accuracy'])
        choices.append(choice)
    deletion = deletion_test(args, PRETRAINED['sst2'])
    record = {'meta': finish_meta(meta), 'choices': choices, 'deletion_head': PRETRAINED['sst2'],
              'deletion': [[k, top, rand, n] for k, (top, rand, n) in deletion.items()]}
    save_record(record, os.path.join(args.records, 'pretrained.json'))
    write_report([render_pretrained(os.path.join(args.records, 'pretrained.json'))],
                 args.report.replace('.md', '_pretrained.md'))


def render_pretrained(record_path):
    """docs/sst_paper_regime_pretrained.md from publish's record."""
    record = load_record(record_path)
    lines = ['Pretrained heads (the run of best dev accuracy among the seeds; test accuracy played no part):', '']
    for c in record['choices']:
        if 'seed' not in c:
            lines.append(f"- {c['dataset']}: no run folder; {c['folder']} kept")
        elif 'test_live' not in c:
            lines.append(f"- {c['dataset']}: best run (seed {c['seed']}) dev {100 * c['valid']:.2f}% is not "
                         f"above the committed head's {100 * c['committed_valid']:.2f}%: {c['folder']} kept")
        else:
            lines.append(f"- {c['dataset']}: seed {c['seed']}, dev {100 * c['valid']:.2f}% (the committed head "
                         f"had {100 * c['committed_valid']:.2f}%), test {100 * c['test_live']:.2f}% on the live float32 "
                         f"backbone ({100 * c['test_cached']:.2f}% from the cache) -> {c['folder']}")
    lines += ['', f"Deletion test of {record['deletion_head']} (SST-2 test): mean drop of the predicted class's "
              "probability after deleting k tokens and re-encoding", '',
              '| k | highest-credit tokens deleted | random tokens deleted | sentences |', '|---|---|---|---|']
    lines += [f"| {k} | {top:.3f} | {rand:.3f} | {n} |" for k, top, rand, n in record['deletion']]
    lines += ['', how_measured(record['meta'])]
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
