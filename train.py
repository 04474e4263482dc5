"""
Trains a routing head on the hidden states of ALL depths of a frozen pretrained transformer (the 2022 paper's
regime), on CPU, one GPU or several (`accelerate launch train.py ...`); with --model capsules2019, the 2019 paper's
capsule networks in theirs. Paths are relative to the folder it is started from.

    python train.py --dataset_name sst5 --backbone minilm --n_epochs 1 --feature_cache .data/features --run_test
    python train.py --dataset_name sst2 --backbone minilm --pretrained_path runs/sst5/model ...
    python train.py --dataset_name sst2 --backbone minilm --eval_only --pretrained_path pretrained/<file>
    python train.py --model capsules2019 --dataset_name smallnorb --n_epochs 50 --run_test

The frozen backbone runs under torch.autocast at --mixed_precision (fp16 by default on a GPU, as the paper's
authors), the head in float32; a run on one of the papers' backbones stops when CUDA is not usable, unless --device
cpu is given. Only the head trains, in its model's regime (heinsen_replication.recipes.REGIMES): RAdam, one cycle,
mixup of hidden states and one-hot targets. --pretrained_path loads a model and fine-tunes only its last routing (the
paper's SST-5 -> SST-2; --finetune all trains every parameter); tensors whose shapes differ (another number of
classes) start from their initialisation. Every epoch is evaluated once: on the validation split, or on the test
split where the dataset has none ("eval_split" in metrics.jsonl). capsules2019 trains models.SSTClassifier on a text
backbone's hidden states and models.SmallNORBClassifier end to end on smallnorb.

Nothing is lost: after every epoch the model (output_dir/epoch<k>/), output_dir/checkpoint.pt and
output_dir/metrics.jsonl are written atomically, and --resume continues after the last complete epoch (refusing
other training-defining arguments, runs.RESUME_ARGS, or other data); the final model is output_dir/model/ (load it
with models.from_pretrained). A run folder is never overwritten without --resume or --overwrite. A mistake of the
user's is one line `error: ...` (exit status 2); anything else keeps its traceback.
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm import tqdm

from heinsen_replication import data
from heinsen_replication.assembly import (AUTOCAST_DTYPES, HEAD_OPTIONS, PAPER_BACKBONES, build_model, check_device,
                                          device_and_precision, init_from_pretrained, load_frozen_backbone,
                                          model_name, one_cycle, resolve_head_options)
from heinsen_replication.checkpoints import from_pretrained
from heinsen_replication.errors import UsageError, relative_to_cwd
from heinsen_replication.models import RoutingHead
from heinsen_replication.loaders import features, make_loaders, mixup, soft_cross_entropy, training_stream
from heinsen_replication.recipes import REGIMES
from heinsen_replication.reporting import (TRACKERS_DIR, TrainingLog, add_reporting_options, check_reporting_options,
                                           end_summary, log_to_file, logging_for_run, start_summary, tracker_config)
from heinsen_replication.runs import (check_output_dir, data_fingerprint, release_output_dir, remove_old_run,
                                      reproduce_command, restore, resumed_checkpoint, save_epoch, save_final)
from heinsen_replication.settings import run_settings

log = logging.getLogger('heinsen_replication.train')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the paper's options
    p.add_argument('--dataset_name', required=True, help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument('--n_epochs', type=int, default=3)
    p.add_argument('--batch_sz', type=int, default=None, help='default: 50 (routing_head), 20 (capsules2019)')
    p.add_argument('--n_iters_per_train_epoch', type=int, default=None,
                   help='optimizer steps per epoch (default: one pass over the training split)')
    p.add_argument('--run_test', action='store_true', help='evaluate the final head on the test split')
    p.add_argument('--rng_seed', type=int, default=0)
    p.add_argument('--pretrained_path', default=None,
                   help="a model to fine-tune (last routing only) or evaluate: a model folder, a .safetensors head, "
                        "a train.py checkpoint.pt, a plain state-dict .pt (the authors' published 2019 files), or the "
                        "authors' 2022 files by their names: <dataset>_head_for_<backbone>.state_dict, "
                        "<dataset>_head_for_<backbone>_epoch<k>.checkpoint")
    # ours
    p.add_argument('--model', default=None, choices=sorted(REGIMES),
                   help="routing_head: the 2022 paper's RoutingHead; capsules2019: the 2019 paper's SSTClassifier "
                        "(text) or SmallNORBClassifier (smallnorb, trained end to end), each in its paper's regime; "
                        "scalar_mix_mean, scalar_mix_attention, token_depth_attention: standard heads on the same "
                        "features (standard_heads.FROZEN_HEADS), in the routing head's regime. "
                        "Default: the model of --pretrained_path (or of the checkpoint --resume continues), "
                        "else routing_head")
    p.add_argument('--backbone', default=None,
                   help="'minilm' (offline default), 'roberta-large', 'microsoft/beit-large-patch16-224', "
                        "'timm/<name>', any transformers id or local folder. Default: the backbone --pretrained_path "
                        "names (the authors' files: the name after '_for_'), else minilm")
    p.add_argument('--revision', default=None, help='pin the backbone to a hub revision')
    p.add_argument('--data_root', default='.data')
    p.add_argument('--download', action='store_true', help='fetch the dataset from its official source')
    p.add_argument('--data_source', default='files', choices=data.DATA_SOURCES,
                   help="files (default, offline): the official files under --data_root; hub: sst5, sst2, imdb "
                        "from the Hugging Face hub with the datasets library (the same data)")
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                   help="auto: CUDA when available, else the CPU; except for the papers' backbones "
                        f"({', '.join(PAPER_BACKBONES)}), which run on a CPU only with --device cpu given")
    p.add_argument('--mixed_precision', default=None, choices=['no', 'fp16', 'bf16'],
                   help="the frozen backbone's precision: its forward runs under torch.autocast at this dtype, in "
                        "no_grad (fp16 on GPU as the paper's authors; bf16 on a CPU with bfloat16 instructions). The "
                        "head trains in float32, as the authors'. Default: no on CPU; on GPU fp16 (routing_head), "
                        "no (capsules2019)")
    p.add_argument('--matmul_precision', default='highest', choices=['highest', 'high', 'medium'],
                   help="torch.set_float32_matmul_precision. On a CPU with bfloat16 instructions (AVX512-BF16, AMX) "
                        "'medium' lets oneDNN compute float32 matrix products with bfloat16 arithmetic: on this "
                        "repository's 2-core CPU 1.5x faster head training, scores within 1e-6 and gradients within "
                        "2e-4 of float32's (python -m benchmarks.train_step); on CUDA it allows plain bfloat16")
    p.add_argument('--chunk_elements', type=int, default=None,
                   help="routing_head: the streamed routings' chunk size (EfficientVectorRouting's chunk_elements: "
                        "about this many elements of [d_emb + n_out] per input over the batch in a chunk). Default: "
                        "a fixed size per device type (3 x 2^21 float32 elements on a CPU, 3 x 2^27 on CUDA), never the "
                        "memory free. Changes speed and memory; results only in their last bits (sums in another "
                        "order: docs/library.md)")
    p.add_argument('--n_hid', type=int, default=None,
                   help="routing_head: the number of hidden vectors of its routings (default: 64, the paper's; with "
                        "--pretrained_path, that head's)")
    p.add_argument('--n_routings', type=int, default=None, choices=[2, 3],
                   help="routing_head: 3 routings (the paper's, the default; with --pretrained_path, that head's), or 2 "
                        "without the middle one")
    p.add_argument('--d_hid', type=int, default=None,
                   help="routing_head: project the hidden states from d_emb to d_hid features before routing, so that "
                        "the routings work at width d_hid (default: none, the paper's; with --pretrained_path, that "
                        "head's). benchmarks/routing_head_study.py measures these options")
    p.add_argument('--head_config', default=None, choices=list(RoutingHead.CONFIGURATIONS),
                   help="routing_head: a named configuration, its --n_hid, --n_routings and --d_hid at once: 'paper' "
                        "(the paper's head) or 'light' (docs/choosing_a_head.md)")
    p.add_argument('--output_dir', default='runs/default')
    p.add_argument('--resume', action='store_true', help='continue from output_dir/checkpoint.pt')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the run in output_dir (checkpoint.pt, model/, epoch<k>/, metrics.jsonl), '
                        'or a --pretrained_path head there; without it such a run is never overwritten')
    p.add_argument('--eval_only', action='store_true', help='evaluate --pretrained_path on the test split')
    p.add_argument('--feature_cache', default=None,
                   help='text only: a folder where the frozen hidden states of every text are stored once '
                        '(float16, memory-mapped) and read back, instead of running the backbone each step')
    p.add_argument('--lr', type=float, default=None, help='one-cycle max learning rate (default: 1e-3 routing_head, '
                                                            '5e-4 capsules2019)')
    p.add_argument('--pretrained_subset', action='store_true',
                   help="with --pretrained_path: load a head trained on hidden states of another shape (depths x "
                        "width) than --backbone gives, only the tensors whose shapes fit; the others start at their "
                        "initialisation (without it such a head is refused)")
    p.add_argument('--finetune', default='last_routing', choices=['last_routing', 'all'],
                   help="with --pretrained_path: train only the last routing (the paper's SST-2 recipe) or every "
                        "parameter (a diagnostic variant)")
    p.add_argument('--mixup_alpha', type=float, default=None,
                   help='default: 0.65 text, 0.2 images (routing_head); 0.2 (capsules2019); 0 = off')
    p.add_argument('--max_length', type=int, default=None, help="text window (default: the backbone's)")
    p.add_argument('--image_size', type=int, default=224, help="images' side after preprocessing")
    p.add_argument('--num_workers', type=int, default=0)
    p.add_argument('--threads', type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's own choice, one per core)")
    add_reporting_options(p)                              # --log_with, --log_every, --quiet, --verbose
    args = p.parse_args(argv)
    for wrong, message in (                                # the arguments' own errors: argparse's one line, exit 2
            (args.dataset_name not in data.DATASETS,
             f"unknown --dataset_name {args.dataset_name!r}; choose one of {', '.join(data.DATASETS)}"),
            (args.data_source == 'hub' and args.dataset_name not in data.HUB_DATASETS,
             f"--data_source hub offers {', '.join(data.HUB_DATASETS)} only; {args.dataset_name} is read from its "
             f"files (--data_source files)"),
            (args.eval_only and not args.pretrained_path, '--eval_only needs --pretrained_path (the head to evaluate)'),
            (args.pretrained_path and not os.path.exists(args.pretrained_path),
             f"--pretrained_path {args.pretrained_path!r}: no such folder or file"
             f"{relative_to_cwd(args.pretrained_path)} "
             f"(a model folder written by train.py or save_pretrained, an older .safetensors head, a .pt state dict, "
             f"or the authors' 2022 <dataset>_head_for_<backbone>.state_dict or ..._epoch<k>.checkpoint)"),
            *((getattr(args, n) is not None and getattr(args, n) < 1, f"--{n} must be a positive integer, got "
               f"{getattr(args, n)}") for n in ('n_epochs', 'batch_sz', 'n_iters_per_train_epoch', 'image_size',
                                                'threads', 'n_hid', 'd_hid')),
            (args.chunk_elements is not None and args.chunk_elements <= 0,
             f'--chunk_elements must be a positive int (elements per chunk), got {args.chunk_elements}'),
            (args.mixup_alpha is not None and not 0 <= args.mixup_alpha < math.inf,
             f"--mixup_alpha must be 0 (no mixup) or positive, got {args.mixup_alpha}"),
            (args.lr is not None and not 0 < args.lr < math.inf, f"--lr must be a positive number, got {args.lr}"),
            (args.max_length is not None and args.max_length < 3, f"--max_length must be at least 3 (the backbone's "
             f"special tokens and at least one token of text), got {args.max_length}"),
            (not 0 <= args.rng_seed < 2 ** 32, f"--rng_seed must be an integer in 0..2**32 - 1, got {args.rng_seed}"),
            (args.pretrained_subset and (not args.pretrained_path or args.eval_only),
             "--pretrained_subset loads part of a --pretrained_path head to fine-tune it (not with --eval_only)"),
            (args.finetune != 'last_routing' and not args.pretrained_path,
             f"--finetune {args.finetune} fine-tunes a pretrained model: pass --pretrained_path too"),
            (args.resume and args.overwrite,
             '--resume continues the run in --output_dir; --overwrite replaces it: pass one of them')):
        if wrong:
            p.error(message)
    check_reporting_options(p, args, argv)
    return args


def resolve_args(args, pretrained=None, pretrained_config=None, checkpoint=None):
    """-> (a copy of args with what they leave open resolved, the model's regime): --model given, else the
    pretrained model's or the resumed checkpoint's, else routing_head; --backbone given, else the one the pretrained
    model names, else minilm; --lr and --batch_sz given, else the regime's; the routing head's --n_hid, --n_routings,
    --d_hid (resolve_head_options). (A resumed checkpoint of another model: check_resume_args.)"""
    trained = None if pretrained is None else model_name(pretrained)
    if trained is not None and args.model not in (None, trained):
        raise UsageError(f"--pretrained_path was trained with model {trained!r}, not --model {args.model!r}")
    model = args.model or trained or (checkpoint['metadata'] if checkpoint else {}).get('model', 'routing_head')
    regime = REGIMES[model]
    backbone = args.backbone or (pretrained_config or {}).get('backbone') or 'minilm'
    return argparse.Namespace(**{**vars(args), 'model': model, 'backbone': backbone,
                                 'lr': regime['lr'] if args.lr is None else args.lr,
                                 'batch_sz': regime['batch_sz'] if args.batch_sz is None else args.batch_sz,
                                 **resolve_head_options(args, model, pretrained)}), regime


def class_scores(head, inputs, mask):
    """-> [batch, n_classes]: a head's output, or a_out of the 2019 capsule models' (a_out, mu_out, sig2_out)."""
    out = head(inputs) if mask is None else head(inputs, mask)
    return out[0] if isinstance(out, tuple) else out


# -------------------------------------------------------------------------------------------------
# The stages of a run: build it, train one step / one epoch, validate, save; main composes them
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything a run trains and evaluates with (build_run makes it; the other stages read and update it)."""
    args: argparse.Namespace              # the arguments resolved (resolve_args): model, backbone, lr, batch_sz set
    regime: dict
    accelerator: Accelerator
    splits: dict
    backbone: object                      # backbones.FrozenBackbone, or None (end-to-end models)
    head: torch.nn.Module
    metadata: dict                        # the model and dataset, saved with every model
    eval_loaders: dict                    # {'valid', 'test': prepared DataLoader} (those the dataset has)
    cached: bool                          # batches come from the feature cache
    checkpoint_path: str
    metrics_path: str
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    batches: object = None                # the training stream (training_stream)
    steps_per_epoch: int = 0
    mixup_alpha: float = 0.0
    history: list = dataclasses.field(default_factory=list)   # one metrics record per completed epoch
    data_fingerprint: dict = None         # {split: data.split_fingerprint}, saved in every checkpoint
    tracking: TrainingLog = None          # steps.jsonl and the trackers

    @property
    def n_classes(self):
        return self.splits['n_classes']


def build_run(args):
    """Parsed arguments -> a Run: the device, the data, the frozen backbone, the head (initialised from
    --pretrained_path), and, unless --eval_only, the optimizer, the schedule and the training stream, restored
    from output_dir/checkpoint.pt with --resume. args is left as it is: the Run holds its resolved copy. (The
    process-global settings, seeds included, are main's: run_settings.)"""
    pretrained, pretrained_config = from_pretrained(args.pretrained_path) if args.pretrained_path else (None, None)
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pt')
    checkpoint = resumed_checkpoint(checkpoint_path) if args.resume else None
    given, (args, regime) = args, resolve_args(args, pretrained, pretrained_config, checkpoint)
    use_cpu = check_device(args)
    if not args.eval_only:
        check_output_dir(args)                            # before minutes of loading and encoding
        log_to_file(args.output_dir, args.command)
    # the head trains in float32 (as the authors'): no autocast, no GradScaler; the backbone runs under autocast
    trackers = None if args.eval_only or not args.log_with else args.log_with.split(',')
    accelerator = Accelerator(cpu=use_cpu, mixed_precision='no', log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=os.path.join(args.output_dir, TRACKERS_DIR)),
                              dataloader_config=DataLoaderConfiguration(non_blocking=not use_cpu))
    precision = args.mixed_precision or ('no' if use_cpu else regime['gpu_precision'])

    splits = data.get_dataset_splits(args.dataset_name, data_root=args.data_root, download=args.download,
                                     image_size=args.image_size, source=args.data_source)
    for split in (('test',) if args.eval_only else ('train', 'valid') + (('test',) if args.run_test else ())):
        if splits[split] is not None and len(splits[split]) == 0:
            raise UsageError(f"--dataset_name {args.dataset_name}: the {split} split is empty (in {args.data_root})")
    backbone = load_frozen_backbone(args, splits, accelerator, AUTOCAST_DTYPES[precision])
    head, metadata = build_model(args, splits, backbone)
    metadata.update(device_and_precision(accelerator, backbone, args))
    if pretrained is not None:
        init_from_pretrained(head, pretrained, pretrained_config, args, backbone, log.info,
                             backbone_given=given.backbone is not None)

    shuffle = torch.Generator()                           # shuffles the training passes (training_stream)
    loaders, train_sampler = make_loaders(args, splits, backbone, accelerator, shuffle)
    run = Run(args=args, regime=regime, accelerator=accelerator, splits=splits, backbone=backbone, head=head,
              metadata=metadata, eval_loaders={}, cached=bool(args.feature_cache), checkpoint_path=checkpoint_path,
              metrics_path=os.path.join(args.output_dir, 'metrics.jsonl'),
              data_fingerprint=None if args.eval_only else data_fingerprint(splits))
    if args.eval_only:
        run.head, run.eval_loaders['test'] = accelerator.prepare(head, loaders['test'])
        return run

    optimizer = torch.optim.RAdam([p for p in head.parameters() if p.requires_grad], lr=args.lr)
    run.head, run.optimizer, train_loader = accelerator.prepare(head, optimizer, loaders['train'])
    run.steps_per_epoch = args.n_iters_per_train_epoch or len(train_loader)     # per process, when several
    run.scheduler = one_cycle(run.optimizer, args.lr, regime, total_steps=args.n_epochs * run.steps_per_epoch)
    run.eval_loaders = {k: accelerator.prepare(loaders[k]) for k in ('valid', 'test') if k in loaders}
    run.mixup_alpha = regime['mixup_alpha'][splits['modality']] if args.mixup_alpha is None else args.mixup_alpha
    if args.overwrite:
        remove_old_run(accelerator, args.output_dir)
    if checkpoint is not None:
        defaults = vars(parse_args(['--dataset_name', args.dataset_name]))   # for arguments newer than checkpoint's
        if (checkpoint.get('args') or {}).get('model') == 'routing_head':
            defaults.update(HEAD_OPTIONS)                 # a checkpoint older than --n_hid etc.: the paper's head
        restore(run, checkpoint, defaults)
    elif args.resume:
        log.info(f"--resume: no {checkpoint_path} yet, starting from scratch")
    start_step = len(run.history) * run.steps_per_epoch
    run.batches = training_stream(train_loader, shuffle, args.rng_seed, start_step=start_step, sampler=train_sampler)
    log.info(start_summary(args, metadata, splits, run.steps_per_epoch, start_step, accelerator.log_with))
    run.tracking = TrainingLog(accelerator, args.output_dir, start_step, tracker_config(args, metadata))
    return run


def train_step(run, batch):
    """One optimizer step on a batch of the training stream (mixup, forward, loss, backward, step).
    -> (loss [], number of correct argmax predictions against the mixed targets' argmax []), on the device."""
    hidden, mask, labels = features(batch, run.backbone, run.cached)
    hidden, mask, targets = mixup(hidden, mask, labels, run.n_classes, run.mixup_alpha)
    scores = class_scores(run.head, hidden, mask)                               # [batch, n_classes]
    loss = soft_cross_entropy(scores, targets)
    run.optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach(), (scores.argmax(-1) == targets.argmax(-1)).sum()


def train_one_epoch(run, epoch):
    """Trains run.steps_per_epoch steps. The loss and accuracy add up on the device and are read every --log_every
    steps (no host sync per step), when the interval's figures go to steps.jsonl and the trackers (run.tracking).
    -> the epoch's metrics record {epoch, train_loss, train_acc, epoch_seconds}."""
    args = run.args
    set_seed(args.rng_seed * 1000 + epoch)            # each epoch's mixup is reproducible
    run.head.train()
    started, n_seen = run.tracking.start_epoch(epoch * run.steps_per_epoch), 0
    total_loss = n_correct = torch.zeros((), device=run.accelerator.device)
    progress = tqdm(range(run.steps_per_epoch), desc=f"{args.dataset_name} train, epoch {epoch + 1}/{args.n_epochs}",
                    disable=args.quiet or not run.accelerator.is_local_main_process)
    for step in progress:
        batch = next(run.batches)
        loss, correct = train_step(run, batch)
        n_batch = len(batch[-1])
        total_loss, n_correct, n_seen = total_loss + loss.float() * n_batch, n_correct + correct, n_seen + n_batch
        if (step + 1) % args.log_every == 0 or step + 1 == run.steps_per_epoch:
            mean_loss = total_loss.item() / n_seen
            if not math.isfinite(mean_loss):
                raise UsageError(f"the training loss is {mean_loss} in epoch {epoch + 1} (by step {step + 1}); "
                                 f"the last checkpoint ({run.checkpoint_path}) is intact")
            run.tracking.interval(epoch * run.steps_per_epoch + step + 1, epoch + 1, total_loss.item(),
                                  n_correct.item(), n_seen, run.scheduler.get_last_lr()[0])
            progress.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{n_correct.item() / n_seen:.4f}",
                                 lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    return {'epoch': epoch + 1, 'train_loss': total_loss.item() / n_seen, 'train_acc': n_correct.item() / n_seen,
            'epoch_seconds': time.time() - started}


@torch.no_grad()
def validate(run, split):
    """Accuracy of run.head on `split` ('valid' or 'test'), from its prepared loader."""
    head, accelerator = run.head, run.accelerator
    head.eval()
    n_correct = n_not_finite = n_total = 0                # tensors on the device, read once at the end
    for batch in tqdm(run.eval_loaders[split], desc=f"{run.args.dataset_name} {split}", leave=False,
                      disable=run.args.quiet or not accelerator.is_local_main_process):
        hidden, mask, labels = features(batch, run.backbone, run.cached)
        scores = class_scores(head, hidden, mask)
        finite = torch.isfinite(scores).all(dim=-1)                               # [batch]
        preds, labels, finite = accelerator.gather_for_metrics((scores.argmax(-1), labels, finite))
        n_correct = n_correct + (preds == labels).sum()
        n_not_finite = n_not_finite + (~finite).sum()
        n_total += len(labels)
    if n_total == 0:
        raise UsageError(f"the {split} split has no examples: an accuracy over nothing is no result")
    if int(n_not_finite):                                 # (gathered: every process stops, none waits)
        raise UsageError(f"the {split} scores of {int(n_not_finite)} of {n_total} examples are not finite (NaN/Inf): "
                         f"refusing to report an accuracy; the head or its input features are damaged")
    return int(n_correct) / n_total


def main(argv=None):
    """train.py's run, as a function call (tests and benchmarks call it too): the process-global settings are the
    run's while it runs and the caller's after it (run_settings). -> the test accuracy (or None without --run_test
    / --eval_only)."""
    args = parse_args(argv)
    with run_settings(args), logging_for_run(args.verbosity, is_main_process=os.environ.get('RANK', '0') == '0'):
        try:
            return train_and_evaluate(args, reproduce_command(sys.argv[1:] if argv is None else argv))
        finally:
            release_output_dir(args.output_dir)          # held since check_output_dir (not with --eval_only)


def train_and_evaluate(args, reproduce=None):
    """The run main composes from the stages; reproduce: the command that trains it again, saved with the head."""
    run = build_run(args)
    args = run.args
    if args.eval_only:
        acc = validate(run, 'test')
        print(f"test accuracy: {acc:.4f}")                # the command's result: shown with --quiet too
        return acc
    try:
        return train_epochs(run, reproduce)
    finally:
        run.tracking.close()


def train_epochs(run, reproduce):
    """The epochs still to train, then the final model and its evaluation; -> the test accuracy or None."""
    args = run.args

    # every epoch is evaluated once, as the authors did: on the validation split, or on the test split where the
    # dataset has none (imdb, imagenet-1k, cifar10, cifar100; recorded as "eval_split": "test"; nothing is selected
    # on it: the final head is the last epoch's)
    eval_split = 'valid' if 'valid' in run.eval_loaders else 'test'
    for epoch in range(len(run.history), args.n_epochs):
        record = train_one_epoch(run, epoch)
        record['eval_split'] = eval_split
        record[f'{eval_split}_acc'] = validate(run, eval_split)
        log.info(json.dumps(record))
        run.tracking.epoch((epoch + 1) * run.steps_per_epoch, record)
        save_epoch(run, record)

    final = {**run.metadata, 'n_epochs': args.n_epochs, 'rng_seed': args.rng_seed, 'reproduce': reproduce}
    if eval_split == 'valid':                             # the final head is the last epoch's: evaluated once
        final['valid_accuracy'] = run.history[-1]['valid_acc']
    if args.run_test:
        final['test_accuracy'] = (run.history[-1]['test_acc'] if eval_split == 'test'
                                  and 'test_acc' in run.history[-1] else validate(run, 'test'))
    save_final(run, final)
    run.tracking.final(len(run.history) * run.steps_per_epoch, final)
    log.info(end_summary(os.path.join(args.output_dir, 'model'), final, run.history, vars(args)))
    return final.get('test_accuracy')


def cli(argv=None):
    """The command line: a mistake of the user's (UsageError: a wrong argument, a missing or damaged file, a full
    disk) is one line `error: ...` and exit status 2; anything else (our bugs, CUDA out of memory, a kernel's error)
    keeps its traceback."""
    try:
        return main(argv)
    except UsageError as e:
        message = str(e).strip()
        if 'Original Traceback' in message:              # re-raised from a DataLoader worker: its last line tells
            message = message.splitlines()[-1].split(': ', 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    cli()
