"""
Training-step time of a routing head with and without the feature cache (train.py --feature_cache),
on the real SST-5 and the offline backbone 'minilm'. Without the cache the frozen backbone runs on
every batch; with it, the hidden states of all depths are read back from a float16 memory map.

    python -m benchmarks.feature_cache --data_root .data --feature_cache .data/features

Each configuration trains --steps steps (a capped epoch) in a fresh output folder; the epoch time
of a full pass over the SST-5 training phrases is extrapolated from the measured seconds per step.
"""
import argparse
import math
import os
import tempfile

import train
from heinsen_replication import data, runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data')
    p.add_argument('--feature_cache', default='.data/features', help='built first if empty (not timed)')
    p.add_argument('--steps', type=int, default=100)
    p.add_argument('--batch_sz', type=int, default=32)
    args = p.parse_args(argv)
    n_train = len(data.get_dataset_splits('sst5', data_root=args.data_root)['train'])
    steps_per_epoch = math.ceil(n_train / args.batch_sz)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (('with feature cache', ['--feature_cache', args.feature_cache]), ('without (live backbone)', [])):
            out = os.path.join(tmp, name.split()[0])
            train.main(['--dataset_name', 'sst5', '--backbone', 'minilm', '--data_root', args.data_root, '--device', 'cpu',
                        '--n_epochs', '1', '--n_iters_per_train_epoch', str(args.steps), '--batch_sz', str(args.batch_sz),
                        '--output_dir', out, *extra])
            seconds = runs.read_metrics(out)[0][0]['epoch_seconds']
            rows.append((name, seconds / args.steps, seconds / args.steps * steps_per_epoch / 60))
    print(f"\n| SST-5 head on minilm, batch {args.batch_sz} | s / step ({args.steps} steps) "
          f"| full epoch ({n_train} phrases, {steps_per_epoch} steps), min |\n|---|---|---|")
    for name, per_step, epoch_minutes in rows:
        print(f"| {name} | {per_step:.3f} | {epoch_minutes:.1f} |")


if __name__ == '__main__':
    main()
