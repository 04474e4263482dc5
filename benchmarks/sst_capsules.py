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

import torch

import train
from benchmarks.common import mean_std, publish_pretrained, shown_command, sst_feature_store, write_report
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
    args = p.parse_args(argv)
    started = time.time()

    sst_feature_store(args.data_root, args.feature_cache)      # every SST text's features, before the runs read them

    jobs = [(dataset, seed) for dataset in ('sst5', 'sst2') for seed in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(train_run, args, *job) for job in jobs}
        runs = {job: future.result() for job, future in futures.items()}      # (dev, test, per epoch)

    lines = ['| model (frozen all-MiniLM-L6-v2 features) | SST-5 test acc. (%) | SST-2 test acc. (%) |', '|---|---|---|',
             f"| SSTClassifier (2019 capsules), mean ± std over seeds {args.seeds} | "
             f"{mean_std([runs['sst5', s][1] for s in args.seeds])} | {mean_std([runs['sst2', s][1] for s in args.seeds])} |",
             '', '| dataset | seed | dev acc. (%) | test acc. (%) | dev acc. after each epoch (%) | minutes per epoch |',
             '|---|---|---|---|---|---|']
    for (dataset, seed), (valid, test, epochs) in runs.items():
        lines.append(f"| {dataset} | {seed} | {100 * valid:.2f} | {100 * test:.2f} | "
                     f"{', '.join(f'{100 * v:.1f}' for _, v in epochs)} | {', '.join(f'{t / 60:.1f}' for t, _ in epochs)} |")
    lines += ['', 'Chosen by dev accuracy, test accuracy by `train.py --eval_only` on the live float32 backbone:', '']
    for dataset in ('sst5', 'sst2'):
        seed = max(args.seeds, key=lambda s: runs[dataset, s][0])
        valid, test, _ = runs[dataset, seed]
        path = os.path.join(args.out_dir, f'{dataset}_seed{seed}', 'model')
        live = train.main(['--model', 'capsules2019', '--dataset_name', dataset, '--backbone', 'minilm', '--data_root',
                           args.data_root, '--eval_only', '--pretrained_path', path, '--device', 'cpu',
                           '--output_dir', args.out_dir])
        if args.save_pretrained:
            publish_pretrained(path, PRETRAINED[dataset], dataset, live, test, valid)
        lines.append(f"- {dataset}: seed {seed}, dev {100 * valid:.2f}%, test {100 * live:.2f}% (from the float16 "
                     f"feature cache: {100 * test:.2f}%){' -> ' + PRETRAINED[dataset] if args.save_pretrained else ''}")
    steps = f" of at most {args.n_iters_per_train_epoch} steps" if args.n_iters_per_train_epoch else ''
    lines += ['', f"Settings: `train.py --model capsules2019`, {args.n_epochs} epoch(s){steps} over shuffled training "
              f"phrases (all subtrees) for each dataset from scratch, batch 20, RAdam, one cycle of max lr 5e-4 "
              f"(10% warm-up, cosine to 1e-5, beta1 cycled), mixup Beta(0.2, 0.2); features from the float16 cache. "
              f"{len(jobs)} runs, {args.jobs} at a time, one thread each, on {os.cpu_count()} CPU cores "
              f"(torch {torch.__version__}); this invocation took {(time.time() - started) / 60:.1f} min (runs "
              f"already finished in --out_dir are reused, not retrained). Command: "
              f"`{shown_command('benchmarks.sst_capsules', argv if argv is not None else sys.argv[1:])}`"]
    write_report(lines, args.report)
    return runs


if __name__ == '__main__':
    main()
