"""
The small ViT pretrained on scikit-learn's real 8 x 8 digits (pretrained/digits_vit/, built by `python -m
studies.digits_vit build`) and the routing head on its hidden states of all depths, as the credit_vision notebook and
studies/digits_vit.py's report use them: the digits as tensors, the model, its predictions, the per-depth patch
credit, the patch-deletion test against random deletion, and the credit figure.
"""
import os

import numpy as np
import torch

from . import data
from .backbones import load_backbone
from .models import RoutingHead

KS = (1, 2, 3, 4)        # patches deleted (of 16)
N_RANDOM = 10            # random draws of k patches per test image
RANDOM_SEED = 0
NOTEBOOK_IMAGES, NOTEBOOK_RANDOM = 100, 3   # the notebook's quicker deletion test: the first 100 test digits, 3 draws
FIGURE_DIGITS = 6        # test digits in the figure (the first test image of each of the first classes)


def digits_tensors(split):
    """-> images float [N, 1, 8, 8] in [0, 1] (pixel / 16), labels long [N] of the digits split 'train' or 'test'."""
    dataset = data.get_dataset_splits('digits')[split]
    return dataset.images.float() / dataset.max_value, torch.tensor(dataset.labels)


def load_model(out):
    """-> (backbones.ImageBackbone, models.RoutingHead) of a build in OUT (the frozen ViT, the trained head)."""
    backbone = load_backbone(os.path.join(out, 'backbone'))
    head = RoutingHead.from_pretrained(os.path.join(out, 'routing_head')).eval()
    return backbone, head


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
