"""
Batches of a run: the training split's passes (PassSampler, SeededDraws: shuffles and augmentations drawn from
seeds alone, also after --resume), the loaders of every split (make_loaders; the feature cache's for text), the
endless training stream (training_stream), mixup with soft targets and their loss. Batches are (hidden [batch,
n_pos, d_depth, d_emb], mask [batch, n_pos] or None, labels [batch]).
"""
import logging
import os

import torch
import torch.nn.functional as F
from accelerate import skip_first_batches

from . import data
from .errors import UsageError

log = logging.getLogger(__name__)

class PassSampler(torch.utils.data.Sampler):
    """The training split's shuffled order (as RandomSampler(generator) draws it), each index paired with the pass
    it belongs to: yields (n_pass, index); training_stream sets n_pass before each pass."""

    def __init__(self, n, generator):
        self.n, self.generator, self.n_pass = n, generator, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        return ((self.n_pass, i) for i in torch.randperm(self.n, generator=self.generator).tolist())


class SeededDraws(torch.utils.data.Dataset):
    """A training split whose random transforms (the images' augmentations) draw from torch's RNG seeded with
    (seed, pass, index) alone: another --rng_seed draws other augmentations, the same seed the same ones, in any
    worker and after --resume (which starts mid-pass). The caller's RNG is left as it was (mixup's draws do not
    depend on the loading). Indexed by PassSampler's (n_pass, index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        n_pass, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, n_pass, i)) & (2 ** 63 - 1))   # ints hash the same in every process
            return self.dataset[i]


def make_loaders(args, splits, backbone, accelerator, generator):
    """-> ({split: DataLoader}, the training split's PassSampler or None); the training split is shuffled by
    `generator` alone and its random transforms are seeded by (--rng_seed, pass, index) (SeededDraws); each loader
    draws its workers' seeds from a generator of its own seeded with --rng_seed, never from torch's global RNG, so
    that mixup's draws do not depend on when a pass starts. On CUDA, batches are pinned and workers persist. With
    --feature_cache, text batches come straight from the cache."""
    loaders, sampler = {}, None
    cuda = accelerator.device.type == 'cuda'
    workers = dict(num_workers=args.num_workers, pin_memory=cuda, persistent_workers=cuda and args.num_workers > 0)
    store = None
    if args.feature_cache:
        if splits['modality'] != 'text':
            raise UsageError(f"--feature_cache is for text datasets; {args.dataset_name} is {splits['modality']} "
                             f"(its training images are augmented, so their features change every epoch)")
        store = data.FeatureStore(args.feature_cache, backbone)
        log.info(f"feature cache of {backbone.name}: {os.path.abspath(store.folder)}")
    for split in ('train', 'valid', 'test'):
        dataset = splits[split]
        if dataset is None:
            continue
        if store is None:
            if split == 'train':
                sampler, dataset = PassSampler(len(dataset), generator), SeededDraws(dataset, args.rng_seed)
            loaders[split] = torch.utils.data.DataLoader(
                dataset, batch_size=args.batch_sz, sampler=sampler if split == 'train' else None,
                generator=torch.Generator().manual_seed(args.rng_seed), **workers)
            continue
        with accelerator.main_process_first():
            dataset = store.dataset(dataset.texts, dataset.labels, desc=f"{args.dataset_name}/{split}")
        batches = data.LengthGroupedBatchSampler(dataset.lengths, args.batch_sz, shuffle=(split == 'train'),
                                                 generator=generator if split == 'train' else None)
        loaders[split] = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate_features,
                                                     generator=torch.Generator().manual_seed(args.rng_seed), **workers)
    return loaders, sampler


def features(batch, backbone, cached):
    """A loader's batch -> hidden [batch, n_pos, d_depth, d_emb], mask [batch, n_pos] | None, labels [batch];
    without a backbone (end-to-end models), the loader's inputs (smallnorb: images [batch, 2, 96, 96])."""
    if cached:
        return batch
    inputs, labels = batch
    if backbone is None:
        return inputs, None, labels
    hidden, mask = backbone.encode(inputs)
    return hidden.to(labels.device), None if mask is None else mask.to(labels.device), labels


def mixup(hidden, mask, labels, n_classes, alpha):
    """The authors' mixup: each sample (hidden states or images) is mixed with the next one in the batch (the
    last with the first), x.lerp(x[[1, ..., B-1, 0]], r) with r ~ Beta(alpha, alpha) per sample, and so are the
    one-hot targets; a position is padding in the mix only where it is padding in both. -> hidden, mask, targets."""
    targets = F.one_hot(labels, n_classes).to(hidden.dtype)                       # [batch, n_classes]
    if not alpha:
        return hidden, mask, targets
    r = torch.distributions.Beta(alpha, alpha).sample((len(labels),)).to(hidden.device, hidden.dtype)  # [batch]
    nxt = torch.arange(1, len(labels) + 1, device=hidden.device) % len(labels)   # [1, ..., B-1, 0]
    hidden = hidden.lerp(hidden[nxt], r.view(-1, *[1] * (hidden.dim() - 1)))
    targets = targets.lerp(targets[nxt], r[:, None])
    return hidden, (None if mask is None else mask & mask[nxt]), targets


def soft_cross_entropy(scores, targets):
    """The training loss: cross-entropy of class scores [batch, n_classes] against (mixed) target distributions
    [batch, n_classes], in float32, averaged over the batch."""
    return -(targets * F.log_softmax(scores.float(), dim=-1)).sum(-1).mean()


def training_stream(loader, generator, seed, start_step, sampler=None):
    """The paper's stream of training batches: passes over the training split, each shuffled anew (pass p by
    `generator` seeded with seed * 1000 + p; its augmentations seeded by (seed, p, index) through `sampler`, a
    PassSampler), cycled without end; it starts at global step start_step, so an epoch of n steps takes the next n
    batches (epochs need not align with passes), also after --resume."""
    n_pass, skip = divmod(start_step, len(loader))
    while True:
        generator.manual_seed(seed * 1000 + n_pass)
        if sampler is not None:
            sampler.n_pass = n_pass
        yield from skip_first_batches(loader, skip) if skip else loader
        n_pass, skip = n_pass + 1, 0
