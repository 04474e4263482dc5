"""
Real results, offline: routing heads on the frozen all-MiniLM-L6-v2 ('minilm') over the real
Stanford Sentiment Treebank, beside conventional baselines on the same frozen features, and a
deletion test of the heads' credit assignment. Regenerates docs/sst_results.md (docs/results.md quotes it)
from scratch and, with --save_pretrained, the heads under pretrained/.

    python -m benchmarks.sst_results --data_root .data --save_pretrained

Steps (wall-clock time of each is reported):
 1. the frozen hidden states of every SST text, once (train.py's --feature_cache; reused if present);
 2. per seed: an SST-5 head (train.py, the paper's regime, all training phrases), then an SST-2 head
    fine-tuned from it (last routing only); test accuracy of each, mean +- std over seeds;
 3. baselines on the same features and training phrases: logistic regression on the mean-pooled
    states of the last layer, and of all depths concatenated (L2 penalty chosen on dev);
 4. the heads with the best dev accuracy are the pretrained heads (with --save_pretrained, if their dev accuracy
    beats the committed heads'); their test accuracy is measured again with `train.py --eval_only` on the live
    backbone (the number their metadata states);
 5. deletion test on SST-2 test: delete the k tokens with the highest end-to-end credit for the
    predicted class, or k random tokens, re-encode, and measure the drop of the predicted class's
    probability, k = 1, 3, 5.
"""
import argparse
import os
import sys
import time

import torch

from benchmarks.common import (NOT_RECORDED, PRETRAINED, better_on_dev, committed_valid_accuracy, deletion_test,
                               finish_meta, how_measured, live_test_accuracy, load_record, mean_std, measurement_meta,
                               publish_pretrained, save_record, shown_command, sst_feature_store, write_report)
from heinsen_replication import data, recipes
from heinsen_replication.runs import read_metrics

def train_heads(args, seed):
    """-> {dataset: (valid acc, test acc, head path)} for the SST-5 head and the SST-2 head tuned from it: the offline
    recipe (recipes.py) for this seed, with this command's epochs, batch size and steps."""
    import train
    results = {}
    recipe = recipes.runs('offline', data_root=args.data_root, out=args.out_dir, seed=seed,
                          feature_cache=args.feature_cache)
    for dataset, n_epochs in (('sst5', args.sst5_epochs), ('sst2', args.sst2_epochs)):
        argv = [*recipe[dataset], '--n_epochs', str(n_epochs), '--batch_sz', str(args.batch_sz)]
        if args.n_iters_per_train_epoch:
            argv += ['--n_iters_per_train_epoch', str(args.n_iters_per_train_epoch)]
        train.main(argv)                                 # --resume: a rerun continues (or re-evaluates) the same run
        out = train.parse_args(argv).output_dir
        final = read_metrics(out)[1]
        results[dataset] = (final['valid_accuracy'], final['test_accuracy'], os.path.join(out, 'model'))
    return results


def pooled_features(store, split):
    """-> last-layer mean [n, d_emb], all-depths mean concatenated [n, d_depth * d_emb], labels [n]."""
    dataset = store.dataset(split.texts, split.labels)
    means = torch.stack([dataset[k][0].mean(dim=0) for k in range(len(dataset))])  # [n, d_depth, d_emb]
    return means[:, -1], means.flatten(1), torch.tensor(split.labels)


def logistic_regression(train_x, train_y, l2, n_classes, max_iter=100):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS on standardised features.
    -> predict(x) -> labels"""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mean) / std
    W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=max_iter, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, train_y) + l2 * W.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda test_x: (((test_x - mean) / std) @ W + b).argmax(-1)


def baselines(args, store, dataset):
    """Logistic regression on mean-pooled frozen states of all training phrases; L2 chosen on dev.
    -> {features: (dev acc, l2, test acc)}"""
    splits = data.get_dataset_splits(dataset, data_root=args.data_root)
    feats = {k: pooled_features(store, splits[k]) for k in ('train', 'valid', 'test')}
    results = {}
    for j, name in enumerate(('last layer, mean-pooled', 'all depths, mean-pooled, concatenated')):
        best = None
        for l2 in (1e-5, 1e-4, 1e-3):
            predict = logistic_regression(feats['train'][j], feats['train'][2], l2, splits['n_classes'])
            with torch.no_grad():
                valid, test = ((predict(feats[k][j]) == feats[k][2]).float().mean().item() for k in ('valid', 'test'))
            if best is None or valid > best[0]:
                best = (valid, l2, test)
        results[name] = best
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data', help='folder holding sst/{train,dev,test}.txt')
    p.add_argument('--feature_cache', default='.data/features')
    p.add_argument('--out_dir', default='runs/sst_results')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--sst5_epochs', type=int, default=1)
    p.add_argument('--sst2_epochs', type=int, default=1)
    p.add_argument('--batch_sz', type=int, default=32)
    p.add_argument('--n_iters_per_train_epoch', type=int, default=None,
                   help="steps per epoch (default: the offline recipe's 2000)")
    p.add_argument('--save_pretrained', action='store_true', help='copy the best-dev heads to pretrained/')
    p.add_argument('--report', default='docs/sst_results.md')
    p.add_argument('--record', default='docs/sst_results/record.json')
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    meta = measurement_meta(shown_command('benchmarks.sst_results', argv if argv is not None else sys.argv[1:]),
                            'float32 (the offline recipe chooses bfloat16 only where it measures faster)')
    timings = {}
    started = time.time()

    # 1. features, once
    t = time.time()
    store = sst_feature_store(args.data_root, args.feature_cache)
    timings['frozen features (all SST texts, once)'] = time.time() - t

    # 2. routing heads
    runs = []
    for seed in args.seeds:
        t = time.time()
        runs.append(train_heads(args, seed))
        timings[f'routing heads, seed {seed} (SST-5, then SST-2 from it)'] = time.time() - t

    # 3. baselines
    t = time.time()
    base = {dataset: baselines(args, store, dataset) for dataset in ('sst5', 'sst2')}
    timings['baselines (logistic regression, 3 L2 penalties, both datasets)'] = time.time() - t

    # 4. pretrained heads: best dev accuracy; test accuracy on the live backbone
    pretrained = {}
    for dataset in ('sst5', 'sst2'):
        valid, test, path = max((r[dataset] for r in runs), key=lambda r: r[0])
        t = time.time()
        live = live_test_accuracy(path, dataset, args.data_root, args.out_dir)
        timings[f'{dataset}: eval_only of the chosen head on the live backbone'] = time.time() - t
        published = args.save_pretrained and better_on_dev(valid, committed_valid_accuracy(dataset))     # dev decides
        if published:
            publish_pretrained(path, PRETRAINED[dataset], dataset, live, test, valid)
        pretrained[dataset] = (valid, test, live, path, published)

    # 5. deletion test with the chosen SST-2 head
    t = time.time()
    deletion = deletion_test(args, pretrained['sst2'][3])
    timings['deletion test (SST-2 test)'] = time.time() - t
    timings['total'] = time.time() - started

    record = {
        'meta': finish_meta(meta), 'seeds': args.seeds,
        'runs': [{'seed': seed, **{d: {'valid': r[d][0], 'test': r[d][1]} for d in ('sst5', 'sst2')}}
                 for seed, r in zip(args.seeds, runs)],
        'routing_head': {d: mean_std([r[d][1] for r in runs]) for d in ('sst5', 'sst2')},
        'baselines': {name: {d: {'valid': base[d][name][0], 'l2': base[d][name][1], 'test': base[d][name][2]}
                             for d in ('sst5', 'sst2')} for name in base['sst5']},
        'chosen': {d: {'valid': valid, 'test_cached': test, 'test_live': live,
                       'published': PRETRAINED[d] if published else None}
                   for d, (valid, test, live, path, published) in pretrained.items()},
        'deletion': [[k, top, rand, n] for k, (top, rand, n) in deletion.items()],
        'minutes': {name: seconds / 60 for name, seconds in timings.items()},
        'settings': {'sst5_epochs': args.sst5_epochs, 'sst2_epochs': args.sst2_epochs, 'batch_sz': args.batch_sz,
                     'n_iters_per_train_epoch': args.n_iters_per_train_epoch}}
    save_record(record, args.record)
    write_report([render(args.record)], args.report)
    return runs, base, pretrained, deletion


def render(record_path):
    """docs/sst_results.md from main's record; nothing is measured."""
    record = load_record(record_path)
    lines = ['| model (frozen all-MiniLM-L6-v2 features) | SST-5 test acc. (%) | SST-2 test acc. (%) |', '|---|---|---|',
             f"| routing head (2022), mean ± std over seeds {record['seeds']} | {record['routing_head']['sst5']} | "
             f"{record['routing_head']['sst2']} |"]
    for name, by_dataset in record['baselines'].items():
        b5, b2 = by_dataset['sst5'], by_dataset['sst2']
        lines.append(f"| logistic regression, {name} (L2 {b5['l2']:g} / {b2['l2']:g} by dev) | {100 * b5['test']:.1f} | "
                     f"{100 * b2['test']:.1f} |")
    lines += ['', 'Per seed (the offline profile, `bash train_all_heads.sh offline`, is seed 0), accuracies in %:', '']
    if record['runs']:
        lines += ['| seed | SST-5 dev | SST-5 test | SST-2 dev | SST-2 test |', '|---|---|---|---|---|']
        lines += [f"| {r['seed']} | " + ' | '.join(f"{100 * r[d][k]:.2f}" for d in ('sst5', 'sst2')
                                                   for k in ('valid', 'test')) + ' |' for r in record['runs']]
    else:
        lines.append(f"{NOT_RECORDED} (this record holds only the mean ± std over the seeds).")
    lines += ['', 'The heads of best dev accuracy among the seeds (test accuracy played no part), their test accuracy '
              'again by `train.py --eval_only` on the live float32 backbone:', '']
    for dataset, c in record['chosen'].items():
        where = f" -> {c['published']}" if c.get('published') else ''
        lines.append(f"- {dataset}: dev {100 * c['valid']:.2f}%, test {100 * c['test_live']:.2f}% (from the float16 "
                     f"feature cache: {100 * c['test_cached']:.2f}%){where}{c.get('since', '')}")
    lines += ['', 'Deletion test (SST-2 test, the chosen head): mean drop of the predicted class probability after '
              'deleting k tokens and re-encoding', '', '| k | highest-credit tokens deleted | random tokens deleted | '
              'sentences |', '|---|---|---|---|']
    lines += [f"| {k} | {top:.3f} | {rand:.3f} | {n} |" for k, top, rand, n in record['deletion']]
    lines += ['', 'Wall-clock minutes:', '']
    lines += [f"- {name}: {minutes:.1f} min" for name, minutes in record['minutes'].items()]
    settings = record['settings']
    steps = f" of at most {settings['n_iters_per_train_epoch']} steps" if settings['n_iters_per_train_epoch'] else ''
    lines += ['', f"Settings: SST-5 {settings['sst5_epochs']} epoch(s){steps} over shuffled training phrases (all "
              f"subtrees), SST-2 {settings['sst2_epochs']} epoch(s){steps} fine-tuning the last routing, batch "
              f"{settings['batch_sz']}, RAdam, one-cycle max lr 1e-3, mixup Beta(0.65, 0.65); nothing chosen per "
              f"run (each run's final head). " + how_measured(record['meta'])]
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
