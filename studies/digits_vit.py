"""
A trained vision model offline: a small ViT pretrained on scikit-learn's real 8x8 handwritten digits, frozen, and
a routing head trained (by train.py) on the hidden states of all its depths; then the routing head's per-depth
patch credit and a patch-deletion test against random deletion.

    python -m studies.digits_vit build --out pretrained/digits_vit      # the committed model (minutes, 1 thread)
    python -m studies.digits_vit report                                 # docs/vision_digits.md (+ .png)
    python -m studies.digits_vit build --out /tmp/dv --quick            # seconds, end to end (not a result)

build:
  1. pretrains a transformers ViTModel (VIT_CONFIG: 8 x 8 single-channel images at their native size, 2 x 2 pixel
     patches -> 16 patches + the class token; 4 layers of width 64) with a linear classifier on its pooled class
     token, on the digits training split only (data.get_dataset_splits('digits'): the fixed stratified 75/25 split
     of data.DIGITS_SEED, 1347 train / 450 test), with the PRETRAIN recipe;
  2. saves the ViT as OUT/backbone/ (save_pretrained: config.json + model.safetensors; it loads through
     backbones.load_backbone(OUT/backbone) as a frozen ImageBackbone of 5 depths, and `train.py --backbone OUT/backbone`)
     and its classifier as OUT/vit_classifier.safetensors;
  3. trains a routing head on the frozen ViT's hidden states of all depths with train.py itself, by the recipe
     `python -m heinsen_replication.recipes digits-vit` prints (the paper's routing-head regime: RAdam, one cycle, mixup Beta(0.2, 0.2),
     batch 50; recipes.HEAD_EPOCHS epochs on the training split, no model selection: digits has no validation
     split), its --backbone set to OUT/backbone, and keeps its final model as OUT/routing_head/
     (config.json names the backbone folder and records the test accuracy train.py measured).
  OUT/backbone and OUT/routing_head are never overwritten without --overwrite.
  The images are pixel / 16 in [0, 1]; the background is 0. With the same torch version and thread count (the
  command sets 1 thread) the build is deterministic: every seed is fixed.

report: loads OUT's model, measures the ViT's and the routing head's test accuracy and runs the deletion test
(deletion_test) on the whole test split, and writes docs/vision_digits.md and the figure docs/vision_digits.png
(credit_figure: a few test digits, each beside its credit map at every depth).

The model, its credit, the deletion test and the figure are the package's (heinsen_replication.vision_digits, which
the credit_vision notebook uses too). Deletion test (deletion_test): for every test image, the k patches ranked highest are set to the background (0)
and the image is re-encoded by the frozen ViT; the drop in the predicted class's probability is averaged over the
test split. Rankings: the routing head's credit for the predicted class (RoutingHead.credit) summed over depths per
patch (the class token dropped), the credit of each depth alone, the patches with the most ink (a baseline that needs
no model), and random (N_RANDOM draws per image); among all patches, and among the patches that hold ink only (a
blank patch set to the background does not change).
"""
import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from heinsen_replication.pretrained import read_config
from heinsen_replication.vision_digits import (FIGURE_DIGITS, N_RANDOM, RANDOM_SEED, credit_figure, deletion_table,
                                               deletion_test, deletion_verdict, digits_tensors, figure_indices,
                                               load_model, patch_grid, predict)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The ViT: 8 x 8 digits at their native size (upsampling would add pixels, not information), 2 x 2 patches.
VIT_CONFIG = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                  num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, qkv_bias=True)
# Its pretraining: AdamW, one-cycle learning rate, cross-entropy with label smoothing. (Random shifts of one pixel
# as augmentation made it learn more slowly in a trial on a held-out part of the training split.)
PRETRAIN = dict(epochs=40, batch_size=32, lr=3e-3, weight_decay=0.05, pct_start=0.1, label_smoothing=0.1, seed=0)
# The routing head: recipes.runs('digits-vit') (train.py's routing-head regime), seed HEAD_SEED.
HEAD_SEED = 0
QUICK = dict(pretrain_epochs=1, head_epochs=1)   # --quick: the pipeline end to end in seconds (not a result)



def pretrain_vit(images, labels, epochs=PRETRAIN['epochs'], log=print):
    """-> (transformers.ViTModel, nn.Linear classifier on its pooled class token), trained on images [N, 1, 8, 8]
    and labels [N] with the PRETRAIN recipe."""
    import transformers
    torch.manual_seed(PRETRAIN['seed'])
    vit = transformers.ViTModel(transformers.ViTConfig(**VIT_CONFIG))
    classifier = nn.Linear(vit.config.hidden_size, 10)
    params = [*vit.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=PRETRAIN['lr'], weight_decay=PRETRAIN['weight_decay'])
    batch_size = PRETRAIN['batch_size']
    steps_per_epoch = len(labels) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PRETRAIN['lr'], pct_start=PRETRAIN['pct_start'],
                                                    total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(PRETRAIN['seed'])
    vit.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(labels), generator=generator), 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            scores = classifier(vit(pixel_values=images[idx]).pooler_output)           # [batch, 10]
            loss = F.cross_entropy(scores, labels[idx], label_smoothing=PRETRAIN['label_smoothing'])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        log(f"ViT pretraining epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}")
    vit.eval()
    return vit, classifier


@torch.no_grad()
def vit_accuracy(vit, classifier, images, labels):
    """The pretrained ViT's own accuracy (its linear classifier on the pooled class token)."""
    return (classifier(vit(pixel_values=images).pooler_output).argmax(-1) == labels).float().mean().item()


def load_vit_classifier(out):
    """-> (transformers.ViTModel, nn.Linear) saved by build in OUT."""
    import transformers
    from safetensors.torch import load_file
    vit = transformers.ViTModel.from_pretrained(os.path.join(out, 'backbone')).eval()
    classifier = nn.Linear(vit.config.hidden_size, 10)
    classifier.load_state_dict(load_file(os.path.join(out, 'vit_classifier.safetensors')))
    return vit, classifier


def head_recipe(backbone_dir, output_dir, quick=False):
    """-> the train.py arguments of the routing head: recipes.runs('digits-vit'), on the backbone in backbone_dir,
    into output_dir (--quick: 1 epoch)."""
    from heinsen_replication import recipes
    (argv,) = recipes.runs('digits-vit', out=output_dir, seed=HEAD_SEED).values()
    argv = list(argv)
    argv[argv.index('--backbone') + 1] = backbone_dir
    argv[argv.index('--output_dir') + 1] = output_dir
    if quick:
        argv[argv.index('--n_epochs') + 1] = str(QUICK['head_epochs'])
    return argv


def build(out, overwrite=False, quick=False, log=print):
    """Pretrain the ViT, save it, train the routing head with train.py.
    -> {'vit_test_accuracy', 'head_test_accuracy'}"""
    import train
    from safetensors.torch import save_file
    targets = [os.path.join(out, name) for name in ('backbone', 'vit_classifier.safetensors', 'routing_head')]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist: pass --overwrite to replace the trained model "
                              f"there, or choose another --out")
    torch.set_num_threads(1)
    started = time.time()
    x_train, y_train = digits_tensors('train')
    x_test, y_test = digits_tensors('test')
    vit, classifier = pretrain_vit(x_train, y_train, epochs=QUICK['pretrain_epochs'] if quick else PRETRAIN['epochs'],
                                   log=log)
    vit_acc = vit_accuracy(vit, classifier, x_test, y_test)
    log(f"ViT test accuracy: {vit_acc:.4f} ({time.time() - started:.0f} s)")
    os.makedirs(out, exist_ok=True)
    backbone_dir = os.path.join(out, 'backbone')
    with tempfile.TemporaryDirectory(dir=out) as tmp:        # written whole, then moved into place
        vit.save_pretrained(os.path.join(tmp, 'backbone'), safe_serialization=True)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
                  os.path.join(tmp, 'vit_classifier.safetensors'), metadata={'vit_test_accuracy': f"{vit_acc:.6f}"})
        for name in ('routing_head', 'backbone', 'vit_classifier.safetensors'):  # (an old head fits no new backbone)
            if os.path.exists(os.path.join(out, name)):
                shutil.rmtree(os.path.join(out, name)) if os.path.isdir(os.path.join(out, name)) \
                    else os.remove(os.path.join(out, name))
            if name != 'routing_head':
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
    with tempfile.TemporaryDirectory(dir=out) as run_dir:
        head_acc = train.main(head_recipe(backbone_dir, os.path.join(run_dir, 'run'), quick))
        head_dir = os.path.join(out, 'routing_head')
        if os.path.exists(head_dir):
            shutil.rmtree(head_dir)
        os.replace(os.path.join(run_dir, 'run', 'model'), head_dir)
    log(f"routing head test accuracy: {head_acc:.4f}; built {out} in {time.time() - started:.0f} s")
    return {'vit_test_accuracy': vit_acc, 'head_test_accuracy': head_acc}




def report(out, docs, figure, command, max_deletion=None, n_random=N_RANDOM, log=print):
    """Measure the model in OUT (accuracies, deletion test), keep the figures in the record (RECORD beside docs: its
    folder of the same name) and write the docs page (render) and the figure. max_deletion: run the deletion test on
    the first test digits only (a quick check; default all), n_random: its random draws."""
    import matplotlib
    from benchmarks.common import finish_meta, measurement_meta, save_record, write_report
    matplotlib.use('Agg')
    torch.set_num_threads(1)
    meta = measurement_meta(command, 'float32', threads=1)
    started = time.time()
    for folder in {os.path.dirname(os.path.abspath(docs)), os.path.dirname(os.path.abspath(figure))}:
        os.makedirs(folder, exist_ok=True)
    x_test, y_test = digits_tensors('test')
    vit, classifier = load_vit_classifier(out)
    vit_acc = vit_accuracy(vit, classifier, x_test, y_test)
    backbone, head = load_model(out)
    head_acc = (predict(backbone, head, x_test).argmax(-1) == y_test).float().mean().item()
    recorded = read_config(os.path.join(out, 'routing_head'))['training'].get('test_accuracy')
    results = {among: deletion_test(backbone, head, x_test[:max_deletion], n_random=n_random, among=among)
               for among in ('all', 'ink')}
    idx = figure_indices(y_test)
    credit_figure(backbone, head, x_test[idx], y_test[idx], path=figure,
                  title='routing-head credit for the predicted class, per depth (red = for, blue = against)')
    side, size = patch_grid(backbone)
    record = {'meta': {**finish_meta(meta), 'seconds': round(time.time() - started, 1)}, 'out': out,
              'figure': os.path.relpath(figure, os.path.dirname(os.path.abspath(docs))),
              'vit_test_accuracy': vit_acc, 'head_test_accuracy': head_acc, 'recorded_test_accuracy': recorded,
              'n_params_vit': sum(p.numel() for p in vit.parameters()),
              'n_params_head': sum(p.numel() for p in head.parameters()),
              'side': side, 'size': size, 'd_depth': backbone.d_depth, 'deletion': results}
    save_record(record, record_path(docs))
    write_report([render(record)], docs)
    log(f"wrote {docs}, {record_path(docs)} and {figure} ({record['meta']['seconds']:.0f} s)")
    return record


def record_path(docs):
    """The record of the docs page docs (docs/vision_digits.md -> docs/vision_digits/record.json)."""
    return os.path.join(os.path.splitext(docs)[0], 'record.json')


def render(record):
    """The docs page from report's record (nothing measured)."""
    from benchmarks.common import how_measured
    from heinsen_replication import recipes
    out, side, size, d_depth = record['out'], record['side'], record['size'], record['d_depth']
    vit_acc, head_acc, results = record['vit_test_accuracy'], record['head_test_accuracy'], record['deletion']
    n_images, p_pred, n_random = (results['all'][key] for key in ('n_images', 'p_pred', 'n_random'))
    recorded = record['recorded_test_accuracy']
    return f"""# A trained vision model offline: a small ViT on real digits, its routing head, and its credit

Produced by `python -m studies.digits_vit report` (studies/digits_vit.py) from the model committed in `{out}/`, which
`python -m studies.digits_vit build --out {out}` trains (1 CPU thread; the routing head by `train.py` itself).
{how_measured(record['meta'])} The report took {record['meta']['seconds']:.0f} s.

## The model

Data: scikit-learn's real handwritten digits (`data.get_dataset_splits('digits')`: 1797 images of 8 x 8 pixels,
values 0..16 scaled to [0, 1], background 0; the fixed stratified 75/25 split of `data.DIGITS_SEED` = 0,
1347 train / 450 test). Everything is trained on the training split only (the ViT's recipe was chosen on a held-out
fifth of it); the test split only evaluates.

* **Backbone**: a transformers `ViTModel` ({VIT_CONFIG['num_hidden_layers']} layers, width
  {VIT_CONFIG['hidden_size']}, {VIT_CONFIG['num_attention_heads']} heads, {record['n_params_vit']:,} parameters) on the
  8 x 8 image at its native size in {size} x {size} patches: {side} x {side} = {side * side} patches + the class
  token, {d_depth} depths (embeddings + one per layer). Pretrained with a linear classifier on its pooled
  class token ({PRETRAIN['epochs']} epochs, AdamW, one cycle to lr {PRETRAIN['lr']}, batch {PRETRAIN['batch_size']},
  label smoothing {PRETRAIN['label_smoothing']}), then frozen. Saved as `{out}/backbone/`: it loads with
  `backbones.load_backbone('{out}/backbone')` (or `train.py --backbone {out}/backbone`).
* **Routing head**: `RoutingHead` on the frozen ViT's hidden states of all {d_depth} depths
  ({record['n_params_head']:,} parameters), trained by
  `python train.py {shlex.join(head_recipe(f'{out}/backbone', 'OUTPUT_DIR'))}`
  (`python -m heinsen_replication.recipes digits-vit`: the paper's routing-head regime for {recipes.HEAD_EPOCHS} epochs; no model selection:
  digits has no validation split). Saved as `{out}/routing_head/`.

| model | test accuracy (450 digits) |
|---|---:|
| the ViT's own linear classifier (pooled class token, last depth) | {vit_acc:.2%} |
| routing head on the frozen ViT's hidden states of all depths | {head_acc:.2%} |

(The routing head's accuracy recorded by train.py when it was trained: {float(recorded):.2%}.) The routing head on all
depths is {'above' if head_acc > vit_acc else 'below' if head_acc < vit_acc else 'level with'} the ViT's own
classifier on the last depth, by {abs(head_acc - vit_acc) * 100:.2f} points.

## Credit per depth

![credit per depth]({record['figure']})

`{os.path.basename(record['figure'])}`: the first test digit of each class 0-{FIGURE_DIGITS - 1}; for each, the routing head's
end-to-end credit (`RoutingHead.credit`) for the predicted class of each {size} x {size}-pixel patch at each depth
(one symmetric colour scale per row; red = credit for the class, blue = against; the black contour outlines the
digit's strokes), and the sum over depths (the ranking the deletion test uses).

## Patch deletion against random deletion

For each of the {n_images} test digits, the k patches (of {side * side}) ranked highest are set to the background
(0) and the image is re-encoded by the frozen ViT. Each cell: the mean drop in the predicted class's probability
(mean before deletion: {p_pred:.3f}), in brackets its ratio to random deletion's, then the share of predictions that
change. Rankings: the routing head's credit for the predicted class summed over depths; the credit of one depth
alone; the patches with the most ink (summed pixels, a baseline that needs no model); random (k patches drawn
uniformly, {n_random} draws per image, seed {RANDOM_SEED}).

**Among all {side * side} patches.** A blank patch set to the background does not change, so credit given to blank
patches (where the absence of ink may well be what tells a class) counts as nothing here:

{deletion_table(results['all'])}

**Among the patches that hold ink** (every ranking, random included, picks only patches with a pixel > 0; where an
image has fewer than k, the rest are blank: no change):

{deletion_table(results['ink'])}

{deletion_verdict(results)}"""


def render_page(path):
    """The docs page from the record file at path."""
    from benchmarks.common import load_record
    return render(load_record(path)) + '\n'


def credit_ratios(record, among='all'):
    """The summed credit's drop over random deletion's, per k, from report's record."""
    rows = record['deletion'][among]['rows']
    return [c / r for c, r in zip(rows['credit (sum over depths)']['drop'], rows['random']['drop'])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    b = sub.add_parser('build', help='pretrain the ViT and train the routing head')
    b.add_argument('--out', default='pretrained/digits_vit', help='folder of backbone/, vit_classifier.safetensors, '
                                                                  'routing_head/')
    b.add_argument('--overwrite', action='store_true', help='replace a model already in --out')
    b.add_argument('--quick', action='store_true', help='1 epoch each: the pipeline in seconds (not a result)')
    r = sub.add_parser('report', help='measure the model and write the docs page and figure')
    r.add_argument('--out', default='pretrained/digits_vit', help='the folder build wrote')
    r.add_argument('--docs', default='docs/vision_digits.md')
    r.add_argument('--figure', default=None, help='default: vision_digits.png beside --docs')
    r.add_argument('--max_deletion', type=int, default=None,
                   help='run the deletion test on the first N test digits only (a quick check; default: all 450)')
    r.add_argument('--n_random', type=int, default=N_RANDOM, help='random draws per digit in the deletion test')
    args = p.parse_args(argv)
    if args.command == 'report':
        for name in ('max_deletion', 'n_random'):
            value = getattr(args, name)
            if value is not None and value < 1:
                p.error(f"--{name} must be a positive integer, got {value}")
        args.figure = args.figure or os.path.join(os.path.dirname(args.docs), 'vision_digits.png')
        for name in ('backbone', 'vit_classifier.safetensors', 'routing_head'):
            if not os.path.exists(os.path.join(args.out, name)):
                p.error(f"--out {args.out!r} has no {name}: build the model first "
                        f"(python -m studies.digits_vit build --out {args.out})")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == 'build':
        return build(args.out, overwrite=args.overwrite, quick=args.quick)
    command = 'python -m studies.digits_vit ' + ' '.join(shlex.quote(a) for a in
                                                            (argv if argv is not None else sys.argv[1:]))
    return report(args.out, args.docs, args.figure, command, args.max_deletion, args.n_random)


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
