"""
Real results, offline, of the 2019 paper's text model: models.SSTClassifier (frozen hidden states of
all depths of all-MiniLM-L6-v2 routed as 1 x 64 capsules by two GenerativeMatrixRoutings), trained by
`train.py --model capsules2019` in the 2019 regime on the real Stanford Sentiment Treebank, SST-5 and
SST-2 each from scratch, several seeds. Writes docs/sst_capsules2019.md (docs/results.md quotes it) and,
with --save_pretrained, the best-dev models under pretrained/.

    python -m benchmarks.sst_capsules --data_root .data --feature_cache .data/features --save_pretrained

The runs are independent processes, --jobs at a time (one CPU thread each: these small models train
faster on one thread than on two, and two runs then use both cores). The frozen features come from
train.py's --feature_cache (computed once if missing: about 9 min on 2 cores).
"""
import argparse
import concurrent.futures
import os
import subprocess
import sys
import time

from benchmarks.common import (finish_meta, how_measured, live_test_accuracy, load_record, mean_std, measurement_meta,
                               publish_pretrained, save_record, shown_command, sst_feature_store, write_report)
from heinsen_replication import recipes
from heinsen_replication.runs import read_metrics

PRETRAINED = {'sst5': 'pretrained/sst5_minilm_capsules2019',
              'sst2': 'pretrained/sst2_minilm_capsules2019'}


def final_metrics(out):
    """-> (dev accuracy, test accuracy, [(epoch seconds, dev accuracy) per epoch]) of a finished train.py run in out."""
    epochs, final = read_metrics(out)
    return final['valid_accuracy'], final['test_accuracy'], [(r['epoch_seconds'], r['valid_acc']) for r in epochs]


def train_run(args, dataset, seed):
    """One `train.py --model capsules2019` run in its own process (one thread); resumes if interrupted."""
    argv = recipes.runs('capsules2019', data_root=args.data_root, out=args.out_dir, seed=seed,
                        feature_cache=args.feature_cache)[dataset]
    import train
    out = train.parse_args(argv).output_dir
    if os.path.exists(os.path.join(out, 'model')):
        return final_metrics(out)
    argv = [sys.executable, 'train.py', *argv, '--n_epochs', str(args.n_epochs), '--device', 'cpu']
    if args.n_iters_per_train_epoch:
        argv += ['--n_iters_per_train_epoch', str(args.n_iters_per_train_epoch)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'OMP_WAIT_POLICY': 'PASSIVE', 'TQDM_MININTERVAL': '30'}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'train.log'), 'w') as log:
        subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return final_metrics(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data', help='folder holding sst/{train,dev,test}.txt')
    p.add_argument('--feature_cache', default='.data/features')
    p.add_argument('--out_dir', default='runs/sst_capsules')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--n_epochs', type=int, default=3, help="the 2019 paper's 3 epochs over all training phrases")
    p.add_argument('--n_iters_per_train_epoch', type=int, default=None, help='cap on steps per epoch (smoke runs)')
    p.add_argument('--jobs', type=int, default=2, help='runs at a time')
    p.add_argument('--save_pretrained', action='store_true', help='copy the best-dev models to pretrained/')
    p.add_argument('--report', default='docs/sst_capsules2019.md')
    p.add_argument('--record', default='docs/sst_capsules2019/record.json')
    args = p.parse_args(argv)
    started = time.time()
    meta = measurement_meta(shown_command('benchmarks.sst_capsules', argv if argv is not None else sys.argv[1:]),
                            'float32; features from the float16 cache', threads=1)

    sst_feature_store(args.data_root, args.feature_cache)      # every SST text's features, before the runs read them

    jobs = [(dataset, seed) for dataset in ('sst5', 'sst2') for seed in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(train_run, args, *job) for job in jobs}
        runs = {job: future.result() for job, future in futures.items()}      # (dev, test, per epoch)

    chosen = {}
    for dataset in ('sst5', 'sst2'):
        seed = max(args.seeds, key=lambda s: runs[dataset, s][0])
        valid, test, _ = runs[dataset, seed]
        path = os.path.join(args.out_dir, f'{dataset}_seed{seed}', 'model')
        live = live_test_accuracy(path, dataset, args.data_root, args.out_dir)
        if args.save_pretrained:
            publish_pretrained(path, PRETRAINED[dataset], dataset, live, test, valid)
        chosen[dataset] = {'seed': seed, 'valid': valid, 'test_cached': test, 'test_live': live,
                           'published': PRETRAINED[dataset] if args.save_pretrained else None}
    record = {'meta': finish_meta(meta), 'seeds': args.seeds, 'n_epochs': args.n_epochs,
              'n_iters_per_train_epoch': args.n_iters_per_train_epoch, 'jobs': args.jobs,
              'runs': [{'dataset': dataset, 'seed': seed, 'valid': valid, 'test': test,
                        'dev_per_epoch': [v for _, v in epochs], 'minutes_per_epoch': [t / 60 for t, _ in epochs]}
                       for (dataset, seed), (valid, test, epochs) in runs.items()],
              'chosen': chosen, 'invocation_minutes': (time.time() - started) / 60}
    save_record(record, args.record)
    write_report([render(args.record)], args.report)
    return runs


def render(record_path):
    """docs/sst_capsules2019.md from main's record; nothing is measured."""
    record = load_record(record_path)
    runs = record['runs']
    tests = {d: mean_std([r['test'] for r in runs if r['dataset'] == d]) for d in ('sst5', 'sst2')}
    lines = ['| model (frozen all-MiniLM-L6-v2 features) | SST-5 test acc. (%) | SST-2 test acc. (%) |', '|---|---|---|',
             f"| SSTClassifier (2019 capsules), mean ± std over seeds {record['seeds']} | {tests['sst5']} | "
             f"{tests['sst2']} |", '', '| dataset | seed | dev acc. (%) | test acc. (%) | dev acc. after each epoch (%) | '
             'minutes per epoch |', '|---|---|---|---|---|---|']
    for r in runs:
        lines.append(f"| {r['dataset']} | {r['seed']} | {100 * r['valid']:.2f} | {100 * r['test']:.2f} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in r['dev_per_epoch'])} | "
                     f"{', '.join(f'{m:.1f}' for m in r['minutes_per_epoch'])} |")
    lines += ['', 'Each run reports its final model (after the last epoch; nothing chosen per run). The pretrained '
              'models are the runs of best dev accuracy among the seeds (test accuracy played no part), their test '
              'accuracy again by `train.py --eval_only` on the live float32 backbone:', '']
    for dataset, c in record['chosen'].items():
        where = f" -> `{c['published']}/`" if c.get('published') else ''
        lines.append(f"- {dataset}: seed {c['seed']}, dev {100 * c['valid']:.2f}%, test {100 * c['test_live']:.2f}% "
                     f"(from the float16 feature cache: {100 * c['test_cached']:.2f}%){where}")
    steps = f" of at most {record['n_iters_per_train_epoch']} steps" if record['n_iters_per_train_epoch'] else ''
    wall = (f"; the invocation that trained them took {record['runs_wall_minutes']:.1f} min"
            if record.get('runs_wall_minutes') else '')
    lines += ['', f"Settings: `train.py --model capsules2019`, {record['n_epochs']} epoch(s){steps} over shuffled "
              f"training phrases (all subtrees) for each dataset from scratch, batch 20, RAdam, one cycle of max lr "
              f"5e-4 (10% warm-up, cosine to 1e-5, beta1 cycled), mixup Beta(0.2, 0.2); features from the float16 "
              f"cache. {len(runs)} runs, {record['jobs']} at a time, one thread each{wall}; the invocation that wrote "
              f"this record took {record['invocation_minutes']:.1f} min (runs already finished in --out_dir are "
              f"reused, not retrained). " + how_measured(record['meta'])]
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
