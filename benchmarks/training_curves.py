"""
Draws a run's curves from its TensorBoard event files (train.py --log_with tensorboard), as TensorBoard shows them:
the training loss and accuracy of every log interval, the evaluation accuracy of every epoch, the learning rate and
the seconds per optimizer step. Writes docs/training_curves.png from the run recorded in docs/training_curves/ (its
event files, steps.jsonl, metrics.jsonl and train.log, copied from the run's folder), or from any run folder.

    python -m benchmarks.training_curves                                   # docs/training_curves/ -> the figure
    python -m benchmarks.training_curves --run runs/x --out /tmp/curves.png
"""
import argparse
import os

from heinsen_replication.reporting import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, 'docs', 'training_curves')
PANELS = [('train/train_loss', 'training loss (mixup targets)'), ('train/train_acc', 'training accuracy'),
          ('valid/accuracy', 'validation accuracy (per epoch)'), ('train/lr', 'learning rate'),
          ('train/step_seconds', 'seconds per step')]


def draw(run_dir, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    scalars = read_scalars(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (tag, title) in zip(axes, PANELS):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker='o' if len(steps) < 10 else None, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('optimizer step')
        ax.grid(alpha=0.3)
    axes[3].ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return scalars


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run', default=RECORD, help='a run folder (train.py --output_dir) written with --log_with tensorboard')
    p.add_argument('--out', default=os.path.join(ROOT, 'docs', 'training_curves.png'))
    args = p.parse_args(argv)
    scalars = draw(args.run, args.out)
    print(f"{args.out}: {', '.join(f'{tag} ({len(points)} points)' for tag, points in sorted(scalars.items()))}")


if __name__ == '__main__':
    main()
