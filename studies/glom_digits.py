"""
GLOM beside routing and a plain CNN on real handwritten digits: the three models of studies/glom.py, of
about the same parameter count, trained with the same budget (optimiser, learning rate schedule,
batch size, epochs) on the same split for several seeds, on CPU.

    python -m studies.glom_digits                                   # the table in docs/glom_digits.md
    python -m studies.glom_digits --quick --out_dir /tmp/glom        # a few seconds, end to end
    python -m studies.glom_digits --dataset mnist --data_root .data --max_train 10000

Prints a markdown table (model | parameters | test accuracy mean ± std | train time per seed) and
writes it to OUT_DIR/glom_digits.md (OUT_DIR/glom_mnist.md for MNIST), and saves GLOM's islands
for one test image to OUT_DIR/glom_islands.png: per level, the mean cosine similarity of each
location's level vector to those of its 8 neighbours after the last step (the GLOM of the first
seed). Data: data.get_dataset_splits ('digits': scikit-learn's 1797 real 8x8 digits, the fixed
stratified 75/25 split of data.DIGITS_SEED = 0, 1347 train / 450 test; 'mnist': the standard IDX
files under DATA_ROOT/mnist). The seed sets the models' initialisation, the batch order and GLOM's
training noise; the split is the same for every seed. Train time is the wall time of the training
loop only (no evaluation), with torch.set_num_threads(THREADS) (default 1: the tensors here are
tiny, and on a 2-core CPU shared with other jobs 2 threads were no faster and often much slower).
"""
import argparse
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from heinsen_replication import data
from studies.glom import CNNDigitClassifier, GLOM, GLOMConfig, RoutingDigitClassifier, neighbour_similarity

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = ('glom', 'routing', 'cnn')
MODEL_NAMES = {'glom': 'GLOM', 'routing': 'conv stem + EfficientVectorRouting', 'cnn': 'CNN'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', choices=('digits', 'mnist'), default='digits')
    p.add_argument('--data_root', default='.data', help="folder holding mnist/ (unused for digits)")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--models', nargs='+', choices=MODELS, default=list(MODELS))
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-2, help="Adam's peak learning rate (cosine decay to 0)")
    p.add_argument('--glom_steps', type=int, default=10, help="GLOM's iterations n_steps (the MNIST-sized default is 30)")
    p.add_argument('--glom_levels', type=int, default=4)
    p.add_argument('--glom_hidden', type=int, default=32, help="hidden width of GLOM's bottom-up/top-down nets")
    p.add_argument('--glom_loss', choices=('ce', 'mse'), default='ce')
    p.add_argument('--d_hidden', type=int, default=32, help="channels of the routing and CNN models' conv stem")
    p.add_argument('--max_train', type=int, default=None, help="use only the first N training images")
    p.add_argument('--max_test', type=int, default=None, help="use only the first N test images")
    p.add_argument('--threads', type=int, default=1,
                   help="torch.set_num_threads; 1 by default: these models' tensors are tiny, and on a 2-core CPU "
                        "shared with other jobs 2 threads ran GLOM no faster and often many times slower")
    p.add_argument('--islands_index', type=int, default=0, help="the test image of the islands figure")
    p.add_argument('--out_dir', default=os.path.join(REPO_ROOT, 'docs'))
    p.add_argument('--quick', action='store_true',
                   help="smoke test: 1 epoch, 2 GLOM steps, 96 train / 64 test images")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.glom_steps = 1, 2
        args.max_train = min(args.max_train or 96, 96)
        args.max_test = min(args.max_test or 64, 64)
    for name in ('epochs', 'batch_size', 'glom_steps', 'threads'):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# -------------------------------------------------------------------------------------------------
# data, models, training
# -------------------------------------------------------------------------------------------------

def as_tensors(dataset, limit=None):
    """A dataset of (image [1, H, W], label) -> images [N, 1, H, W] float32, labels [N] int64."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if isinstance(dataset, data.TensorImageDataset):                  # fast path: no per-item loop
        return dataset.images[:n].float() / dataset.max_value, torch.tensor(dataset.labels[:n])
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]).float(), torch.tensor([y for _, y in items])


def load_data(args):
    splits = data.get_dataset_splits(args.dataset, data_root=args.data_root)
    x_train, y_train = as_tensors(splits['train'], args.max_train)
    x_test, y_test = as_tensors(splits['test'], args.max_test)
    return x_train, y_train, x_test, y_test, splits['n_classes']


def build_model(name, n_classes, args):
    if name == 'glom':
        return GLOM(GLOMConfig(n_levels=args.glom_levels, d=n_classes, n_classes=n_classes,
                               n_steps=args.glom_steps, d_hidden=args.glom_hidden, loss=args.glom_loss))
    if name == 'routing':
        return RoutingDigitClassifier(n_classes, d_hidden=args.d_hidden)
    return CNNDigitClassifier(n_classes, d_hidden=args.d_hidden)


def scores_of(model, images):
    out = model(images)
    return out[0] if isinstance(out, tuple) else out                  # GLOM also returns its state


def loss_of(model, scores, labels):
    return model.loss(scores, labels) if hasattr(model, 'loss') else F.cross_entropy(scores, labels)


def train(model, x, y, args, seed):
    """Adam, cosine decay of the learning rate to 0 over all steps, shuffled batches. -> seconds."""
    generator = torch.Generator().manual_seed(seed)
    n_batches = -(-len(x) // args.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * n_batches)
    model.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order, total = torch.randperm(len(x), generator=generator), 0.0
        for b in range(n_batches):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss = loss_of(model, scores_of(model, x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        print(f"    epoch {epoch + 1}/{args.epochs}: train loss {total / len(x):.4f}", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x, y, batch_size=256):
    model.eval()
    correct = sum((scores_of(model, x[s:s + batch_size]).argmax(-1) == y[s:s + batch_size]).sum().item()
                  for s in range(0, len(x), batch_size))
    return correct / len(x)


# -------------------------------------------------------------------------------------------------
# outputs
# -------------------------------------------------------------------------------------------------

def mean_std(values, fmt):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(std)}"


def markdown_table(results):
    rows = ["| model | parameters | test accuracy (mean ± std) | train time per seed (s, mean ± std) |",
            "|---|---:|---:|---:|"]
    for r in results:
        if 'summary' in r:                               # a record that kept only the mean ± std over the seeds
            rows.append(f"| {r['name']} | {r['parameters']:,} | {r['summary']['accuracy']} % | {r['summary']['seconds']} |")
            continue
        rows.append(f"| {r['name']} | {r['parameters']:,} | {mean_std([100 * a for a in r['accuracies']], '{:.2f}')} % "
                    f"| {mean_std(r['seconds'], '{:.1f}')} |")
    return '\n'.join(rows)


@torch.no_grad()
def islands_figure(model, image, label, path):
    """For one image [1, H, W]: the image and, per level, the mean cosine similarity of each
    location's level vector to its 8 neighbours after the last step."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    model.eval()
    scores, state = model(image[None])                                 # [1, n_classes], [1, L, D, H, W]
    similarity = neighbour_similarity(state)[0]                        # [L, H, W]
    n_levels = similarity.shape[0]
    fig, axes = plt.subplots(1, n_levels + 1, figsize=(2.6 * (n_levels + 1), 2.9), constrained_layout=True)
    axes[0].imshow(image[0].numpy(), cmap='gray_r')
    axes[0].set_title(f"test image (label {label},\nGLOM predicts {scores.argmax().item()})", fontsize=9)
    for level in range(n_levels):
        im = axes[level + 1].imshow(similarity[level].numpy(), cmap='viridis', vmin=-1, vmax=1)
        name = 'pixel embedding' if level == 0 else ('top: class vote' if level == n_levels - 1 else '')
        axes[level + 1].set_title(f"level {level}" + (f" ({name})" if name else ''), fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[1:]), shrink=0.8, label='cos. sim. to neighbours')
    fig.suptitle(f"GLOM's islands after the last of {model.config.n_steps} steps", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    from benchmarks.common import finish_meta, measurement_meta
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    meta = measurement_meta('', 'float32', threads=args.threads)
    x_train, y_train, x_test, y_test, n_classes = load_data(args)
    print(f"{args.dataset}: {len(x_train)} train / {len(x_test)} test images of {tuple(x_train.shape[1:])}, "
          f"{n_classes} classes; seeds {args.seeds}; {args.epochs} epochs", flush=True)

    results, first_glom = [], None
    for name in args.models:
        r = {'name': MODEL_NAMES[name], 'accuracies': [], 'seconds': []}
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_model(name, n_classes, args)
            r['parameters'] = sum(p.numel() for p in model.parameters())
            print(f"{r['name']} ({r['parameters']:,} parameters), seed {seed}", flush=True)
            r['seconds'].append(train(model, x_train, y_train, args, seed))
            r['accuracies'].append(accuracy(model, x_test, y_test))
            print(f"    test accuracy {100 * r['accuracies'][-1]:.2f} %, train time {r['seconds'][-1]:.1f} s", flush=True)
            if name == 'glom' and first_glom is None:
                first_glom = model
        results.append(r)
    table = markdown_table(results)

    os.makedirs(args.out_dir, exist_ok=True)
    figure_path = None
    if first_glom is not None:
        i = min(args.islands_index, len(x_test) - 1)
        figure_path = os.path.join(args.out_dir, 'glom_islands.png')
        islands_figure(first_glom, x_test[i], y_test[i].item(), figure_path)
    wall = time.perf_counter() - wall_start

    from benchmarks.common import save_record
    command = 'python -m studies.glom_digits' + ''.join(' ' + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    record = {'meta': {**finish_meta(meta), 'command': command}, 'dataset': args.dataset, 'n_train': len(x_train),
              'n_test': len(x_test), 'image': list(x_train.shape[2:]), 'n_classes': n_classes, 'seeds': args.seeds,
              'epochs': args.epochs, 'batch_size': args.batch_size, 'lr': args.lr,
              'glom': {'levels': args.glom_levels, 'steps': args.glom_steps, 'hidden': args.glom_hidden,
                       'loss': args.glom_loss}, 'd_hidden': args.d_hidden, 'results': results,
              'figure': os.path.basename(figure_path) if figure_path else None, 'wall_s': wall}
    doc_path = os.path.join(args.out_dir, f"glom_{args.dataset}.md")
    record_path = os.path.join(args.out_dir, f"glom_{args.dataset}", 'record.json')
    save_record(record, record_path)
    with open(doc_path, 'w') as f:
        f.write(render(record_path))
    print('\n' + markdown_table(results) + '\n')
    print(f"wrote {doc_path}, {record_path}" + (f" and {figure_path}" if figure_path else '') +
          f"; total wall time {wall:.0f} s")
    return {'results': results, 'table': markdown_table(results), 'doc_path': doc_path, 'figure_path': figure_path,
            'wall_s': wall}


def render(record_path):
    """The report from main's record (nothing measured)."""
    from benchmarks.common import how_measured, load_record
    r = load_record(record_path)
    glom = r['glom']
    return '\n'.join([
        f"# GLOM beside routing and a CNN on {'the digits' if r['dataset'] == 'digits' else 'MNIST'}",
        "",
        "Produced by `python -m studies.glom_digits` (studies/glom.py, studies/glom_digits.py).",
        "",
        f"Data: {r['dataset']}, {r['n_train']} train / {r['n_test']} test images of {'x'.join(map(str, r['image']))} "
        f"pixels" + (" (scikit-learn's real handwritten digits, stratified 75/25 split, random_state 0)"
                     if r['dataset'] == 'digits' else '')
        + f". Seeds {', '.join(map(str, r['seeds']))} (initialisation, batch order, training noise; the split is "
        f"fixed). Same budget for every model: {r['epochs']} epochs, batch {r['batch_size']}, Adam, learning rate "
        f"{r['lr']:g} with cosine decay to 0. Train time: the training loop only, wall clock.",
        "",
        f"GLOM: {glom['levels']} levels of {r['n_classes']} numbers, {glom['steps']} steps, bottom-up/top-down nets "
        f"of width {glom['hidden']}, loss {'cross-entropy' if glom['loss'] == 'ce' else 'MSE to one-hot'} on the mean "
        f"top-level vector. Routing and CNN: conv stem of {r['d_hidden']} channels, cross-entropy.",
        "",
        markdown_table(r['results']),
        "",
        f"Total wall time of the command: {r['wall_s']:.0f} s ({r['wall_s'] / 60:.1f} min). " + how_measured(r['meta']),
        "",
        ("GLOM's islands (glom_islands.png): for one test image, per level, the mean cosine similarity "
         "of each location's level vector to those of its 8 neighbours after the last step (GLOM of "
         f"seed {r['seeds'][0]})." if r['figure'] else ''),
        "",
    ])


if __name__ == '__main__':
    main()
