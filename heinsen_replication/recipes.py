"""
The training recipes, each defined once: the train.py runs of every profile of train_all_heads.sh, which the
benchmarks and tests read from here too.

    python -m heinsen_replication.recipes PROFILE [--data_root .data] [--out runs] [--seed 0] [--feature_cache DIR]

prints the profile's train.py runs, one shell-quoted argument list per line, in the order they must run
(train_all_heads.sh runs each line with $LAUNCH train.py). Profiles:

    paper          the 2022 paper's six runs with its settings (one 24 GB GPU): IMDB, SST-5, SST-2 on roberta-large,
                   ImageNet-1k, CIFAR-10, CIFAR-100 on beit-large, at the paper's pinned hub revisions; batch 50
                   (IMDB 5), epochs of n iterations from a stream cycling over the training split, RAdam + one
                   cycle (max lr 1e-3, 30% warm-up), mixup with the next sample in the batch. --feature_cache
                   caches roberta-large's hidden states of every SST text (about 90 GB of disk): opt-in.
    offline        SST-5, then SST-2 from it, on minilm (all-MiniLM-L6-v2) on a CPU: one epoch of 2000 steps of 32
                   phrases each, features from the cache (docs/replication.md has its measured time); on a CPU
                   whose bfloat16 matrix products measure faster than float32's (cpu_bfloat16_is_faster), the
                   backbone encodes in bfloat16 autocast and the head's matrix products use matmul precision
                   'medium'. The choice is made on the first start and kept in OUT/offline/seed<k>/precision.txt,
                   so that a resumed run (and its feature cache) keeps it on a CPU near the threshold.
    paper-minilm   the paper's SST-5 -> SST-2 settings on minilm, with the feature cache; long on a CPU.
    frozen-heads   the standard heads on the same frozen features (train.py --model scalar_mix_mean,
                   scalar_mix_attention, token_depth_attention), each in the paper-minilm recipe (SST-2 fine-tunes
                   their final Linear); outputs OUT/frozen-heads/<head>/seed<k>/<dataset>/. --heads picks some.
    digits-vit     the routing head on the small ViT pretrained on scikit-learn's 8x8 digits (the committed
                   pretrained/digits_vit/backbone, which `python -m studies.digits_vit build` trains first and then
                   runs this recipe with): HEAD_EPOCHS epochs over the digits' training split on a CPU.
    capsules2019   the 2019 paper's capsule networks in its regime (train.py --model capsules2019): smallNORB end
                   to end for 50 epochs (GPU), SST-5 and SST-2 for 3 epochs over all subtrees on minilm (the paper
                   used gpt2-large).

Every run writes OUT/<profile>/seed<k>/<dataset>/{checkpoint.pt,metrics.jsonl,model/,epoch<k>/} and resumes when run again.
"""
import argparse
import functools
import os
import shlex

from .errors import UsageError

PROFILES = ('paper', 'offline', 'paper-minilm', 'frozen-heads', 'digits-vit', 'capsules2019')
FROZEN_HEADS = ('scalar_mix_mean', 'scalar_mix_attention', 'token_depth_attention')   # standard_heads.FROZEN_HEADS

# train.py's regime of each --model, the papers' (its options override): one-cycle max lr and warm-up fraction,
# final lr (None: OneCycleLR's default, max_lr / 25 / 1e4), batch size, mixup alpha per modality, mixed precision
# on GPU.
REGIMES = {
    'routing_head': dict(lr=1e-3, pct_start=0.3, final_lr=None, batch_sz=50,
                         mixup_alpha={'text': 0.65, 'image': 0.2}, gpu_precision='fp16'),
    'capsules2019': dict(lr=5e-4, pct_start=0.1, final_lr=1e-5, batch_sz=20,
                         mixup_alpha={'text': 0.2, 'stereo': 0.2}, gpu_precision='no'),
}
REGIMES.update({name: REGIMES['routing_head'] for name in FROZEN_HEADS})   # the standard heads: the routing head's


# The paper's backbones at the revisions it used.
ROBERTA = ['--backbone', 'roberta-large', '--revision', '5069d8a']
BEIT = ['--backbone', 'microsoft/beit-large-patch16-224', '--revision', '0bd443c', '--num_workers', '8']
# The small ViT trained on the digits (studies/digits_vit.py), and its routing head's epochs.
DIGITS_VIT = os.path.join('pretrained', 'digits_vit', 'backbone')
HEAD_EPOCHS = 60


def cpuinfo(field):
    """The value of the first `field` line of Linux's /proc/cpuinfo ('flags', 'model name'), or None where that file
    or line does not exist."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.split(':', 1)[0].strip() == field), None)
    except OSError:
        return None


def cpu_has_bfloat16():
    """Whether this CPU has bfloat16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, from /proc/cpuinfo; False
    where that file does not exist)."""
    return bool({'avx512_bf16', 'amx_bf16'} & set((cpuinfo('flags') or '').split()))


def bfloat16_product_seconds(rounds=5):
    """-> {'float32': s, 'bfloat16': s}: the best of `rounds` timings (interleaved, on torch's threads) of a matrix
    product of minilm's feed-forward shape, [4096, 384] x [384, 1536], in each precision."""
    import time
    import torch
    a, b = torch.randn(4096, 384), torch.randn(384, 1536)
    best = {'float32': float('inf'), 'bfloat16': float('inf')}
    for _ in range(rounds):
        for dtype in best:
            x, w = a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype))
            start = time.perf_counter()
            x @ w
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best


@functools.cache
def cpu_bfloat16_is_faster(min_speedup=1.2):
    """Whether bfloat16 makes this CPU's matrix products at least min_speedup x faster than float32: it has the
    instructions (cpu_has_bfloat16) and bfloat16_product_seconds measures it. The instructions alone do not decide
    it: on an Intel Xeon with AVX512-BF16 and no AMX, oneDNN's bfloat16 product ran at about half the float32 one's
    speed (docs/performance.md)."""
    if not cpu_has_bfloat16():
        return False
    seconds = bfloat16_product_seconds()
    return seconds['float32'] >= min_speedup * seconds['bfloat16']


def offline_uses_bfloat16(where):
    """Whether the offline profile's runs under `where` use bfloat16 (cpu_bfloat16_is_faster): measured on their first
    start and recorded in where/precision.txt ('bfloat16' or 'float32'), read back on every later start, so that a
    resumed run never switches precision (nor feature cache) because a new timing fell on the other side of the
    threshold."""
    path = os.path.join(where, 'precision.txt')
    if os.path.exists(path):
        with open(path) as f:
            choice = f.read().strip()
        if choice not in ('bfloat16', 'float32'):
            raise UsageError(f"{path} must hold 'bfloat16' or 'float32' (the offline profile's recorded precision), "
                             f"got {choice!r}: delete it to measure again")
        return choice == 'bfloat16'
    faster = cpu_bfloat16_is_faster()
    os.makedirs(where, exist_ok=True)
    with open(path, 'w') as f:
        f.write('bfloat16\n' if faster else 'float32\n')
    return faster


def runs(profile, data_root='.data', out='runs', seed=0, feature_cache=None, heads=FROZEN_HEADS):
    """-> {stage: train.py arguments} of a profile, in the order the stages run (a stage may start from an earlier
    stage's model). feature_cache: the minilm profiles' cache (default <data_root>/features); the paper profile
    caches only when it is given. heads: the frozen-heads profile's heads (stages '<head>/sst5', '<head>/sst2')."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    common = ['--data_root', data_root, '--run_test', '--resume', '--rng_seed', str(seed)]
    cache = ['--feature_cache', feature_cache or os.path.join(data_root, 'features')]
    where = os.path.join(out, profile, f'seed{seed}')

    def stage(dataset, *args, where=where):
        return ['--dataset_name', dataset, *args, '--output_dir', os.path.join(where, dataset), *common]

    if profile == 'paper':
        sst_cache = ['--feature_cache', feature_cache] if feature_cache else []
        return {
            'imdb': stage('imdb', *ROBERTA, '--batch_sz', '5', '--n_epochs', '10', '--n_iters_per_train_epoch', '10000'),
            'sst5': stage('sst5', *ROBERTA, *sst_cache, '--batch_sz', '50', '--n_epochs', '10',
                          '--n_iters_per_train_epoch', '2000'),
            # SST-2 from the SST-5 head after its last (10th) epoch; only the last routing trains
            'sst2': stage('sst2', *ROBERTA, *sst_cache, '--batch_sz', '50', '--n_epochs', '3',
                          '--n_iters_per_train_epoch', '2000', '--pretrained_path', os.path.join(where, 'sst5', 'model')),
            'imagenet-1k': stage('imagenet-1k', *BEIT, '--batch_sz', '50', '--n_epochs', '10'),
            'cifar10': stage('cifar10', *BEIT, '--batch_sz', '50', '--n_epochs', '10', '--n_iters_per_train_epoch', '2000'),
            'cifar100': stage('cifar100', *BEIT, '--batch_sz', '50', '--n_epochs', '10', '--n_iters_per_train_epoch',
                              '2000'),
        }
    if profile == 'offline':
        # where bfloat16 products are faster on this CPU, the frozen backbone encodes under bfloat16 autocast and the
        # head's float32 matrix products use bfloat16 units too (docs/performance.md measures both against float32)
        fast = ['--mixed_precision', 'bf16', '--matmul_precision', 'medium'] if offline_uses_bfloat16(where) else []
        minilm = ['--backbone', 'minilm', *cache, '--n_epochs', '1', '--n_iters_per_train_epoch', '2000',
                  '--batch_sz', '32', '--device', 'cpu', *fast]
        return {'sst5': stage('sst5', '--download', *minilm),
                'sst2': stage('sst2', *minilm, '--pretrained_path', os.path.join(where, 'sst5', 'model'))}
    def paper_minilm(where, *model):
        # float32 matrix products on the CPU's bfloat16 units where it has them (docs/performance.md)
        minilm = [*model, '--backbone', 'minilm', *cache, '--batch_sz', '50', '--matmul_precision', 'medium']
        return {'sst5': stage('sst5', '--download', *minilm, '--n_epochs', '10', '--n_iters_per_train_epoch', '2000',
                              where=where),
                'sst2': stage('sst2', *minilm, '--n_epochs', '3', '--n_iters_per_train_epoch', '2000',
                              '--pretrained_path', os.path.join(where, 'sst5', 'model'), where=where)}

    if profile == 'paper-minilm':
        return paper_minilm(where)
    if profile == 'frozen-heads':
        # the paper-minilm recipe for each head; SST-2 fine-tunes the final Linear (train.last_routing)
        unknown = sorted(set(heads) - set(FROZEN_HEADS))
        if unknown:
            raise UsageError(f"unknown heads {unknown}: choose among {', '.join(FROZEN_HEADS)}")
        return {f'{head}/{dataset}': argv for head in heads
                for dataset, argv in paper_minilm(os.path.join(out, profile, head, f'seed{seed}'),
                                                  '--model', head).items()}
    if profile == 'digits-vit':
        return {'digits': stage('digits', '--backbone', DIGITS_VIT, '--n_epochs', str(HEAD_EPOCHS), '--device', 'cpu')}
    # capsules2019: the 2019 paper's regime (batch 20, lr 5e-4 one cycle, mixup Beta(0.2, 0.2)); smallNORB: random
    # crops of the edge-padded training images; SST: each dataset from scratch over all subtrees
    capsules = ['--model', 'capsules2019']
    return {'smallnorb': stage('smallnorb', *capsules, '--n_epochs', '50', '--num_workers', '4'),
            **{dataset: stage(dataset, *capsules, '--backbone', 'minilm', *cache, '--n_epochs', '3')
               for dataset in ('sst5', 'sst2')}}


def add_profile_options(p):
    """The options that pick a profile's runs (train_all_heads.sh passes the same to recipes and reporting)."""
    p.add_argument('profile', choices=PROFILES)
    p.add_argument('--data_root', default='.data')
    p.add_argument('--out', default='runs')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--feature_cache', default=None)
    p.add_argument('--heads', default='', help=f"frozen-heads: comma-separated, among {','.join(FROZEN_HEADS)} "
                                               f"(default: all)")


def profile_runs(args):
    """The runs (see runs) of the options add_profile_options parsed."""
    heads = tuple(h for h in args.heads.split(',') if h) or FROZEN_HEADS
    return runs(args.profile, args.data_root, args.out, args.seed, args.feature_cache or None, heads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_options(p)
    for argv_ in profile_runs(p.parse_args(argv)).values():
        print(shlex.join(argv_))


if __name__ == '__main__':
    main()
