"""
The paper's runs at their real sizes, without the hub: roberta-large and BEiT-large ARCHITECTURES (transformers'
RobertaConfig / BeitConfig with the real sizes, random weights, saved to a local folder and passed as
`--backbone <folder>`), trained by the real train.py with the paper profile's settings (recipes.runs('paper'):
batch 50, mixup, RAdam + one cycle, evaluation every epoch, --run_test) for a few steps. It records the seconds per
step and the peak memory (host RSS; on CUDA also torch.cuda.max_memory_allocated) of each run, and the device.

    python -m benchmarks.full_scale_smoke --device cpu --steps 2 --report benchmarks/full_scale_smoke.md
    python -m benchmarks.full_scale_smoke --device cuda --steps 2 --cifar_steps 300 --report benchmarks/full_scale_smoke.md

Runs: sst5 (roberta-large; the first trees of the real SST files under --data_root/sst or $SST_DIR, so the texts
have the real lengths; the tokenizer is a byte-level BPE trained on those texts, with roberta's special tokens, as
roberta-large's own cannot be fetched offline), cifar10 (BEiT-large on random 32 x 32 images in CIFAR-10's file
format, resized to 224 and augmented as the paper's). --cifar_steps N adds a CIFAR-10 run of N steps (the GPU
check: a few hundred steps of the paper profile's CIFAR-10 run on random images). Each run is its own process
(`--child`), so its peak RSS is its own. --scale tiny builds the same architectures at toy sizes (the slow test).
The models' folders are kept under --work (default .data/full_scale) and reused.
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO_ROOT, shown_command
from heinsen_replication import recipes

# The real sizes (the hub configs of FacebookAI/roberta-large and microsoft/beit-large-patch16-224); 'tiny': the same
# classes at toy sizes, for the test of this script.
SIZES = {
    'full': dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    'tiny': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37),
}
N_IMAGES = {'train': 100, 'test': 50}          # random CIFAR-10 images (split into the 5 training batches)
N_TREES = {'train.txt': 100, 'dev.txt': 50, 'test.txt': 50}   # the first trees of each real SST file


def build_roberta(folder, scale, texts):
    """roberta-large's architecture with random weights (RobertaConfig: vocabulary 50265, 514 positions, the real
    sizes) and a byte-level BPE tokenizer trained on `texts` whose special tokens have roberta's ids."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    if os.path.isfile(os.path.join(folder, 'config.json')):
        return folder
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=8000, min_frequency=1,
                            special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'])   # ids 0..4, as roberta's
    tokenizer = transformers.RobertaTokenizerFast(tokenizer_object=bpe, bos_token='<s>', eos_token='</s>',
                                                  sep_token='</s>', cls_token='<s>', unk_token='<unk>',
                                                  pad_token='<pad>', mask_token='<mask>', model_max_length=512)
    config = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                        **SIZES[scale])
    transformers.RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_beit(folder, scale):
    """BEiT-large/16 at 224 x 224 with random weights (BeitConfig with the real sizes, relative position biases and
    layer scale as microsoft/beit-large-patch16-224)."""
    import transformers
    if os.path.isfile(os.path.join(folder, 'config.json')):
        return folder
    config = transformers.BeitConfig(image_size=224, patch_size=16, use_relative_position_bias=True,
                                     use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
                                     use_mean_pooling=True, **SIZES[scale])
    transformers.BeitModel(config).save_pretrained(folder)
    return folder


def write_cifar10(root, seed=0):
    """Random images in CIFAR-10's python batch format under root/cifar-10-batches-py/."""
    from heinsen_replication.data import write_cifar_batch
    folder = os.path.join(root, 'cifar-10-batches-py')
    if os.path.isdir(folder):
        return root
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    per_batch = N_IMAGES['train'] // 5
    for k in range(5):
        write_cifar_batch(Path(folder, f'data_batch_{k + 1}'),
                          rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8),
                          rng.integers(0, 10, per_batch).tolist(), b'labels')
    write_cifar_batch(Path(folder, 'test_batch'),
                      rng.integers(0, 256, (N_IMAGES['test'], 3, 32, 32), dtype=np.uint8),
                      rng.integers(0, 10, N_IMAGES['test']).tolist(), b'labels')
    return root


def write_sst_subset(sst_dir, root):
    """The first trees of the real SST files (train/dev/test.txt) under root/sst/ -> their texts (for the BPE)."""
    folder = os.path.join(root, 'sst')
    os.makedirs(folder, exist_ok=True)
    for name, n in N_TREES.items():
        with open(os.path.join(sst_dir, name), encoding='utf-8') as f:
            lines = [line for _, line in zip(range(n), f)]
        with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
            f.writelines(lines)
    from heinsen_replication import data
    splits = data.get_dataset_splits('sst5', data_root=root)
    return [t for split in ('train', 'valid', 'test') for t in splits[split].texts]


def paper_argv(dataset, backbone, data_root, output_dir, steps, device, batch_sz):
    """The paper profile's train.py arguments for `dataset` (recipes.py, defined once there), with the local random
    backbone, `steps` steps in one epoch, and the device given explicitly."""
    argv = recipes.runs('paper', data_root=data_root, out=output_dir)[dataset]
    drop = {'--backbone', '--revision', '--output_dir', '--n_epochs', '--n_iters_per_train_epoch', '--batch_sz'}
    kept = []
    for k, a in enumerate(argv):
        if a in drop or (k and argv[k - 1] in drop) or a == '--resume':     # --overwrite instead: a fresh run
            continue
        kept.append(a)
    if device == 'cpu':                                  # the paper profile's 8 image workers, on a 2-core CPU: 2
        kept = [('2' if k and kept[k - 1] == '--num_workers' else a) for k, a in enumerate(kept)]
    return [*kept, '--backbone', backbone, '--output_dir', os.path.join(output_dir, dataset), '--n_epochs', '1',
            '--n_iters_per_train_epoch', str(steps), '--batch_sz', str(batch_sz), '--device', device, '--overwrite']


def child(argv):
    """One train.py run in this process: -> {seconds per step, peak RSS, CUDA peak, ...} as a JSON line."""
    import train
    from heinsen_replication import runs
    steps = int(argv[argv.index('--n_iters_per_train_epoch') + 1])
    started = time.time()
    step_times, step_cpu = [], []                        # wall seconds; CPU seconds of this process (all threads)
    real_step = train.train_step

    def timed_step(run, batch):
        if run.accelerator.device.type == 'cuda':
            torch.cuda.synchronize()
        t, cpu = time.time(), time.process_time()
        out = real_step(run, batch)
        if run.accelerator.device.type == 'cuda':
            torch.cuda.synchronize()
        step_times.append(time.time() - t)
        step_cpu.append(time.process_time() - cpu)
        return out

    train.train_step = timed_step
    train.main(argv)
    out = os.path.join(argv[argv.index('--output_dir') + 1])
    epochs, final = runs.read_metrics(out)
    cuda = torch.cuda.is_available() and '--device' in argv and argv[argv.index('--device') + 1] == 'cuda'
    print('RESULT ' + json.dumps({
        'steps': steps, 'step_seconds': step_times, 'step_cpu_seconds': step_cpu, 'threads': torch.get_num_threads(),
        'epoch_seconds': epochs[0]['epoch_seconds'],
        'run_seconds': time.time() - started, 'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        'cuda_peak_gib': torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        'device': final['device'], 'backbone_precision': final['backbone_precision'],
        'eval_split': epochs[0]['eval_split']}), flush=True)


def run_child(argv, log):
    """A child process running train.py with argv -> its RESULT record."""
    cmd = [sys.executable, '-m', 'benchmarks.full_scale_smoke', '--child', *argv]
    env = {**os.environ, 'TOKENIZERS_PARALLELISM': 'false'}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log, 'a') as f:
        f.write(f"$ {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed (exit {proc.returncode}); see {log}:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('RESULT '))[len('RESULT '):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--batch_sz', type=int, default=50)
    p.add_argument('--cifar_steps', type=int, default=0, help='a further CIFAR-10 run of this many steps (GPU check)')
    p.add_argument('--runs', nargs='+', default=['sst5', 'cifar10'], choices=['sst5', 'cifar10'])
    p.add_argument('--scale', default='full', choices=sorted(SIZES))
    p.add_argument('--work', default='.data/full_scale', help='models, data and runs (kept and reused)')
    p.add_argument('--sst_dir', default=os.environ.get('SST_DIR', '.data/sst'), help='the real SST tree files')
    p.add_argument('--report', default=None, help="add the results as a section of this benchmark log's record (benchmarks/full_scale_smoke.md)")
    p.add_argument('--child', nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return child(args.child)

    work = os.path.join(args.work, args.scale)
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, 'runs.log')
    from benchmarks.common import finish_meta, measurement_meta
    command = shown_command('benchmarks.full_scale_smoke', argv if argv is not None else sys.argv[1:])
    meta = measurement_meta(command, 'backbone under fp16 autocast, head float32' if args.device == 'cuda' else
                            'float32')
    rows = []
    for dataset in args.runs + (['cifar10'] if args.cifar_steps else []):
        steps = args.cifar_steps if len(rows) == len(args.runs) else args.steps
        t = time.time()
        if dataset == 'sst5':
            data_root = os.path.join(work, 'data_sst')
            backbone = build_roberta(os.path.join(work, 'roberta-large-random'), args.scale,
                                     write_sst_subset(args.sst_dir, data_root))
        else:
            data_root = write_cifar10(os.path.join(work, 'data_cifar'))
            backbone = build_beit(os.path.join(work, 'beit-large-random'), args.scale)
        build_seconds = time.time() - t
        train_argv = paper_argv(dataset, backbone, data_root, os.path.join(work, 'runs'), steps, args.device,
                                args.batch_sz)
        result = run_child(train_argv, log)
        result.update(dataset=dataset, argv=train_argv, build_seconds=build_seconds)
        rows.append(result)
        print(json.dumps(result), flush=True)
    if args.report:
        from benchmarks.reports import add_section
        lines = ['| run | device | backbone precision | steps | s/step, wall (each) | CPU s/step (each; torch threads) | '
                 'epoch s (with loader start) | peak RSS GiB | CUDA peak GiB |', '|---|---|---|---|---|---|---|---|---|']
        for r in rows:
            lines.append(f"| {r['dataset']} | {r['device']} | {r['backbone_precision']} | {r['steps']} | "
                         f"{', '.join(f'{s:.1f}' for s in r['step_seconds'][:5])}"
                         f"{' ...' if len(r['step_seconds']) > 5 else ''} (mean of the last "
                         f"{max(1, len(r['step_seconds']) - 1)}: "
                         f"{np.mean(r['step_seconds'][1:] or r['step_seconds']):.2f}) | "
                         f"{', '.join(f'{s:.1f}' for s in r['step_cpu_seconds'][:5])} ({r['threads']}) | "
                         f"{r['epoch_seconds']:.1f} | "
                         f"{r['peak_rss_gib']:.2f} | "
                         f"{'-' if r['cuda_peak_gib'] is None else format(r['cuda_peak_gib'], '.2f')} |")
        lines.append('\ntrain.py arguments: ' + '; '.join(f"{r['dataset']}: `{shlex.join(r['argv'])}`" for r in rows))
        add_section(os.path.relpath(os.path.abspath(args.report), REPO_ROOT),
                    f"{args.device.upper() if args.device == 'cuda' else 'CPU'}, {args.steps} steps of each run",
                    finish_meta(meta), '\n'.join(lines))
    return rows


if __name__ == '__main__':
    main()
