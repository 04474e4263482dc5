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

Deletion test (deletion_test): for every test image, the k patches ranked highest are set to the background (0)
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from heinsen_replication import backbones, data, models
from heinsen_replication.pretrained import read_config

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

KS = (1, 2, 3, 4)        # patches deleted (of 16)
N_RANDOM = 10            # random draws of k patches per test image
RANDOM_SEED = 0
NOTEBOOK_IMAGES, NOTEBOOK_RANDOM = 100, 3   # the notebook's quicker deletion test: the first 100 test digits, 3 draws
FIGURE_DIGITS = 6        # test digits in the figure (the first test image of each of the first classes)


def digits_tensors(split):
    """-> images float [N, 1, 8, 8] in [0, 1] (pixel / 16), labels long [N] of the digits split 'train' or 'test'."""
    dataset = data.get_dataset_splits('digits')[split]
    return dataset.images.float() / dataset.max_value, torch.tensor(dataset.labels)


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


def load_model(out):
    """-> (backbones.ImageBackbone, models.RoutingHead) of a build in OUT (the frozen ViT, the trained head)."""
    backbone = backbones.load_backbone(os.path.join(out, 'backbone'))
    head = models.RoutingHead.from_pretrained(os.path.join(out, 'routing_head')).eval()
    return backbone, head


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


# -------------------------------------------------------------------------------------------------
# Credit and the deletion test
# -------------------------------------------------------------------------------------------------

def patch_grid(backbone):
    """-> (patches per side, patch size in pixels) of the ViT backbone."""
    config = backbone.model.config
    return config.image_size // config.patch_size, config.patch_size


@torch.no_grad()
def predict(backbone, head, images):
    """-> class probabilities [N, n_classes] of the frozen ViT + routing head for images [N, 1, 8, 8]."""
    hidden, mask = backbone.encode(images)                                     # [N, n_pos, d_depth, d_emb]
    return head(hidden, mask).softmax(-1)


@torch.no_grad()
def patch_credit(backbone, head, images):
    """-> credit [N, n_patches, d_depth] of each patch at each depth for the predicted class (the class token
    dropped; patches in raster order), probabilities [N, n_classes], predicted classes [N]."""
    hidden, mask = backbone.encode(images)                                     # [N, 1 + n_patches, d_depth, d_emb]
    credit, scores = head.credit(hidden, mask)                                 # [N, 1 + n_patches, d_depth, n_classes]
    pred = scores.argmax(-1)                                                   # [N]
    index = pred[:, None, None, None].expand(*credit.shape[:3], 1)
    return credit.gather(-1, index)[..., 0][:, 1:], scores.softmax(-1), pred  # [N, n_patches, d_depth], ...


def delete_patches(images, patches, side, size, value=0.0):
    """images [N, C, H, W] with the patches [N, k] (raster indices in a side x side grid of size x size pixels)
    set to value (the background)."""
    keep = torch.ones(len(images), side * side, dtype=torch.bool)
    keep[torch.arange(len(images))[:, None], patches] = False                  # [N, n_patches]
    keep = keep.view(-1, 1, side, side).repeat_interleave(size, -2).repeat_interleave(size, -1)   # [N, 1, H, W]
    return torch.where(keep, images, torch.full_like(images, value))


def patch_ink(images, side, size):
    """-> the summed pixels of each patch [N, side * side] (raster order) of images [N, C, side * size, side * size]."""
    n, c = images.shape[:2]
    return images.reshape(n, c, side, size, side, size).sum((1, 3, 5)).flatten(1)


def rank_patches(score, allowed):
    """-> patch indices [N, P] by descending score [N, P], the patches not allowed [N, P] (bool) last."""
    return torch.sort(score.masked_fill(~allowed, float('-inf')), dim=-1, descending=True, stable=True).indices


@torch.no_grad()
def deletion_test(backbone, head, images, ks=KS, n_random=N_RANDOM, seed=RANDOM_SEED, among='all', per_depth=True):
    """The drop in the predicted class's probability when the k top-ranked patches of each image are set to the
    background (0), for these rankings: the routing head's credit for the predicted class summed over depths; the
    credit of each depth alone (per_depth); the patches with the most ink (their summed pixels: a baseline that
    needs no model); random (n_random draws per image). among: 'all' patches, or 'ink', only the patches that hold
    ink (a pixel > 0) for every ranking: a blank patch set to the background does not change, so deletion cannot
    test the credit of blank patches (the rest of the k, if an image has fewer inked patches, are blank: no change).
    -> {'ks', 'n_images', 'p_pred' (mean probability of the predicted class before deletion), 'n_random', 'among',
    'rows': {ranking: {'drop': mean drop [len(ks)], 'flipped': share of changed predictions [len(ks)]}}}."""
    if among not in ('all', 'ink'):
        raise ValueError(f"among must be 'all' or 'ink', got {among!r}")
    side, size = patch_grid(backbone)
    credit, probs, pred = patch_credit(backbone, head, images)                 # [N, P, D], [N, C], [N]
    p0 = probs.gather(1, pred[:, None])[:, 0]                                  # [N]
    ink = patch_ink(images, side, size)                                        # [N, P]
    allowed = ink > 0 if among == 'ink' else torch.ones_like(ink, dtype=torch.bool)
    rankings = {'credit (sum over depths)': rank_patches(credit.sum(-1), allowed)}
    if per_depth:
        for d in range(credit.shape[-1]):
            rankings[f'credit of depth {d} alone'] = rank_patches(credit[..., d], allowed)
    rankings['most ink (no model)'] = rank_patches(ink, allowed)

    def drop_of(patches):                                                      # patches [N, k]
        p = predict(backbone, head, delete_patches(images, patches, side, size))
        return (p0 - p.gather(1, pred[:, None])[:, 0]), (p.argmax(-1) != pred)

    results = {'ks': list(ks), 'n_images': len(images), 'p_pred': p0.mean().item(), 'n_random': n_random,
               'among': among, 'rows': {}}
    for name, order in rankings.items():
        drops = [drop_of(order[:, :k]) for k in ks]
        results['rows'][name] = {'drop': [d.mean().item() for d, _ in drops],
                                 'flipped': [f.float().mean().item() for _, f in drops]}
    generator = torch.Generator().manual_seed(seed)
    random_drop, random_flip = [], []
    for k in ks:
        d_sum = f_sum = 0.0
        for _ in range(n_random):
            order = rank_patches(torch.rand(ink.shape, generator=generator), allowed)
            d, f = drop_of(order[:, :k])
            d_sum, f_sum = d_sum + d.mean().item(), f_sum + f.float().mean().item()
        random_drop.append(d_sum / n_random)
        random_flip.append(f_sum / n_random)
    results['rows']['random'] = {'drop': random_drop, 'flipped': random_flip}
    return results


def deletion_table(results):
    """Markdown: mean drop in the predicted class's probability (and predictions changed) per ranking and k."""
    ks = results['ks']
    random = results['rows']['random']['drop']
    lines = ['| patches deleted by | ' + ' | '.join(f'k = {k}' for k in ks) + ' |',
             '|---|' + '---:|' * len(ks)]
    for name, row in results['rows'].items():
        cells = []
        for i in range(len(ks)):
            ratio = '' if name == 'random' else f" ({row['drop'][i] / random[i]:.1f}x)"
            cells.append(f"{row['drop'][i]:.3f}{ratio}; {row['flipped'][i]:.0%}")
        lines.append(f"| {name} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def deletion_verdict(results):
    """What the deletion tables {'all': ..., 'ink': ...} say about the credit, in words drawn from their numbers."""
    lines = []
    for among, where in (('all', 'among all patches'), ('ink', 'among the inked patches')):
        rows, ks = results[among]['rows'], results[among]['ks']
        credit, random, ink = (rows[name]['drop'] for name in ('credit (sum over depths)', 'random',
                                                                'most ink (no model)'))
        wins = [k for k, c, r in zip(ks, credit, random) if c > r]
        versus = ('beats random deletion at every k' if len(wins) == len(ks) else
                  'loses to random deletion at every k' if not wins else
                  f"beats random deletion only at k = {', '.join(map(str, wins))}")
        ratios = ', '.join(f'{c / r:.2f}' for c, r in zip(credit, random))
        depths = [name for name in rows if name.startswith('credit of depth')]
        best_depth = (f"; of the single depths, {max(depths, key=lambda n: sum(rows[n]['drop']))} ranks best (largest "
                      f"total drop)") if depths else ''
        ink_vs = 'above' if all(i > c for i, c in zip(ink, credit)) else 'not always above'
        lines.append(f"* {where.capitalize()}: the summed credit {versus} (ratios {ratios} for k = "
                     f"{', '.join(map(str, ks))}){best_depth}; deleting the patches with the most ink is {ink_vs} "
                     f"the credit's drop.")
    return "What the numbers say (written from them by the report):\n\n" + '\n'.join(lines)


def figure_indices(labels, n=FIGURE_DIGITS):
    """The first test image of each of the classes 0 .. n-1."""
    return [int((labels == c).nonzero()[0]) for c in range(n)]


def credit_figure(backbone, head, images, labels, path=None, title=None):
    """One row per image: the digit, then its patch credit for the predicted class at each depth (one colour scale
    per row, red = for, blue = against), then the sum over depths. -> the matplotlib figure (saved to path if given)."""
    import matplotlib.pyplot as plt
    side, _ = patch_grid(backbone)
    credit, probs, pred = patch_credit(backbone, head, images)                 # [N, P, D], [N, C], [N]
    n, _, n_depth = credit.shape
    fig, axes = plt.subplots(n, n_depth + 2, figsize=(1.6 * (n_depth + 2), 1.7 * n), squeeze=False,
                             layout='constrained')
    for i in range(n):
        maps = credit[i].T.reshape(n_depth, side, side).numpy()                 # [D, side, side]
        total = maps.sum(0)
        axes[i, 0].imshow(images[i, 0].numpy(), cmap='gray_r', vmin=0, vmax=1, extent=(0, 8, 8, 0))
        axes[i, 0].set_title(f"label {int(labels[i])}, pred {int(pred[i])}\np = {probs[i, pred[i]]:.2f}", fontsize=8)
        vmax = float(np.abs(maps).max()) or 1.0
        for d in range(n_depth):
            axes[i, d + 1].imshow(maps[d], cmap='RdBu_r', vmin=-vmax, vmax=vmax, extent=(0, 8, 8, 0))
            axes[i, d + 1].contour(np.linspace(0.5, 7.5, 8), np.linspace(0.5, 7.5, 8), images[i, 0].numpy(),
                                   levels=[0.4], colors='k', linewidths=0.6)
            if i == 0:
                axes[i, d + 1].set_title(f"depth {d}" + (' (embeddings)' if d == 0 else ''), fontsize=8)
        vmax = float(np.abs(total).max()) or 1.0
        axes[i, -1].imshow(total, cmap='RdBu_r', vmin=-vmax, vmax=vmax, extent=(0, 8, 8, 0))
        axes[i, -1].contour(np.linspace(0.5, 7.5, 8), np.linspace(0.5, 7.5, 8), images[i, 0].numpy(),
                            levels=[0.4], colors='k', linewidths=0.6)
        if i == 0:
            axes[i, -1].set_title('sum over depths', fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


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
