"""
A run's model: the device (check_device), the frozen backbone on it (load_frozen_backbone), the trained module for
--model (build_model) and its initialisation from --pretrained_path (init_from_pretrained: evaluated as it is, or
fine-tuned: its last routing, last_routing).
"""
import inspect
import os

import torch

from .backbones import load_backbone
from .errors import UsageError
from .models import RoutingHead, SmallNORBClassifier, SSTClassifier
from .runs import check_provenance
from .standard_heads import FROZEN_HEADS

# The papers' backbones (2022: roberta-large, BEiT-large; 2019: gpt2-large) and their hub ids: slow on a CPU
# (benchmarks/full_scale_smoke.md), so a run with one of them never falls back to the CPU silently (check_device).
PAPER_BACKBONES = ('roberta-large', 'FacebookAI/roberta-large', 'microsoft/beit-large-patch16-224', 'gpt2-large',
                   'openai-community/gpt2-large')


def model_name(model):
    """The --model name of a loaded model."""
    frozen_heads = {cls: name for name, cls in FROZEN_HEADS.items()}
    return 'routing_head' if isinstance(model, RoutingHead) else frozen_heads.get(type(model), 'capsules2019')


# The routing head's architecture options (train.py --n_hid, --n_routings, --d_hid) and their defaults: the paper's.
HEAD_OPTIONS = {name: inspect.signature(RoutingHead).parameters[name].default
                for name in ('n_hid', 'n_routings', 'd_hid')}


def resolve_head_options(args, model, pretrained=None):
    """-> {'n_hid', 'n_routings', 'd_hid'} of --model routing_head: as given (--head_config NAME gives all three,
    RoutingHead.CONFIGURATIONS; an option given beside it must agree), else those of the --pretrained_path routing
    head (fine-tuning keeps its architecture), else the paper's (HEAD_OPTIONS); given ones must match the pretrained
    head's. Other models take none of them (all None)."""
    given = {name: getattr(args, name) for name in HEAD_OPTIONS if getattr(args, name) is not None}
    head_config = getattr(args, 'head_config', None)                  # None in the arguments of older checkpoints
    if model != 'routing_head':
        if given or head_config:
            options = [*given, *(['head_config'] if head_config else [])]
            raise UsageError(f"{', '.join('--' + name for name in options)} set the architecture of --model "
                             f"routing_head, not of --model {model}")
        return dict.fromkeys(HEAD_OPTIONS)
    if head_config:
        named = RoutingHead.CONFIGURATIONS[head_config]
        for name, value in given.items():
            if value != named[name]:
                raise UsageError(f"--{name} {value}: --head_config {head_config} has {name} {named[name]}; "
                                 f"give one or the other")
        given = named
    have = HEAD_OPTIONS if pretrained is None else {name: getattr(pretrained, name) for name in HEAD_OPTIONS}
    for name, value in given.items():
        if pretrained is not None and value != have[name]:
            raise UsageError(f"--{name} {value}: --pretrained_path {args.pretrained_path!r} is a routing head with "
                             f"{name} {have[name]}; leave --{name} out to fine-tune it")
    return {**have, **given}


def build_model(args, splits, backbone):
    """-> (the trained module, its training metadata) for --model on this dataset (backbone None: end to end), with
    --chunk_elements set; the module's own config (its constructor's arguments) is saved with it by save_pretrained."""
    head, metadata = _build_model(args, splits, backbone)
    if args.chunk_elements is not None:
        if not isinstance(head, RoutingHead):
            raise UsageError(f"--chunk_elements sets the streamed routings of --model routing_head; "
                             f"{type(head).__name__} has none")
        head.set_chunk_elements(args.chunk_elements)
    return head, metadata


def _build_model(args, splits, backbone):
    n_classes, modality = splits['n_classes'], splits['modality']
    metadata = {'model': args.model, 'dataset_name': args.dataset_name}
    if args.model == 'routing_head':
        return RoutingHead(backbone.d_depth, backbone.d_emb, n_classes, n_hid=args.n_hid, n_routings=args.n_routings,
                           d_hid=args.d_hid), metadata
    if args.model in FROZEN_HEADS:
        return FROZEN_HEADS[args.model](backbone.d_depth, backbone.d_emb, n_classes), metadata
    if modality == 'stereo':
        return SmallNORBClassifier(n_objs=n_classes, n_parts=64, d_chns=64), metadata
    if modality == 'text':
        return SSTClassifier(backbone.d_depth, backbone.d_emb, d_inp=64, d_cap=2, n_parts=64,
                                    n_classes=n_classes), metadata
    raise UsageError(f"--model capsules2019 has the 2019 paper's models for text datasets (SSTClassifier) and "
                     f"smallnorb (SmallNORBClassifier); --dataset_name {args.dataset_name!r} is {modality}")


def depths_hint(state, backbone):
    """Why a state dict may not fit: the depths x size of hidden states it was trained on, against the backbone's."""
    for key in ('depth_emb', 'W'):                        # SSTClassifier, RoutingHead: [d_depth, d_emb]
        shape = tuple(state[key].shape) if key in state else ()
        if backbone is not None and len(shape) == 2 and shape != (backbone.d_depth, backbone.d_emb):
            return (f" (it was trained on hidden states of {shape[0]} depths x {shape[1]}, e.g. gpt2-large's 37 x "
                    f"1280 for the published 2019 SST models; --backbone {backbone.name} gives "
                    f"{backbone.d_depth} x {backbone.d_emb})")
    return ''


def last_routing(head):
    """The parameter-name prefix of the model's last routing (the one fine-tuned from a pretrained model); for the
    standard heads (FROZEN_HEADS) its analogue, their final Linear (LAST_STAGE)."""
    if hasattr(head, 'LAST_STAGE'):
        return head.LAST_STAGE
    name = 'route' if isinstance(head, RoutingHead) else 'routings'
    return f"{name}.{len(getattr(head, name)) - 1}."


AUTOCAST_DTYPES = {'no': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}   # --mixed_precision -> the backbone's


def check_device(args):
    """-> whether the run is on the CPU. --device cuda needs CUDA; --device auto falls back to the CPU, except for a
    backbone of the papers (PAPER_BACKBONES): that stops unless --device cpu is given."""
    cuda = torch.cuda.is_available()
    why = (f"torch.cuda.is_available() is False: no GPU, or its driver is older than this torch build (CUDA "
           f"{torch.version.cuda or 'none: a CPU-only build'}) needs")
    if args.device == 'cuda' and not cuda:
        raise UsageError(f"--device cuda: no CUDA device is usable ({why})")
    if args.device == 'auto' and not cuda and args.backbone in PAPER_BACKBONES:
        raise UsageError(f"--backbone {args.backbone} is one of the papers' backbones, meant for a GPU, and no CUDA "
                           f"device is usable ({why}); on a CPU its steps are slow (benchmarks/full_scale_smoke.md). "
                           f"Pass --device cpu to run it on the CPU anyway")
    return args.device == 'cpu' or not cuda


def device_and_precision(accelerator, backbone, args):
    """What the run computes on, for the log and the saved model's config.json (training metadata)."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    autocast = backbone is not None and backbone.autocast_dtype
    return {'device': f'{device.type} ({name})',
            'backbone_precision': 'none' if backbone is None else
            (f"{str(autocast).replace('torch.', '')} autocast" if autocast else 'float32'),
            'head_precision': 'float32', 'matmul_precision': args.matmul_precision}


def load_frozen_backbone(args, splits, accelerator, autocast_dtype=None):
    """The frozen backbone --backbone on the accelerator's device, its forward under autocast at autocast_dtype
    (None: float32), or None for end-to-end models (smallnorb)."""
    if splits['modality'] == 'stereo':                    # smallnorb: the 2019 network learns from the pixels
        if args.model != 'capsules2019':
            raise UsageError(f"--dataset_name {args.dataset_name!r} (stereo pairs) has no frozen backbone; it trains "
                             f"the 2019 paper's SmallNORBClassifier end to end: pass --model capsules2019")
        return None
    if args.revision and os.path.isdir(os.path.expanduser(args.backbone)):
        raise UsageError(f"--revision {args.revision} pins a hub revision, but --backbone {args.backbone!r} is a local "
                         f"folder, which has none: leave --revision out")
    backbone = load_backbone(args.backbone, revision=args.revision, max_length=args.max_length,
                                    autocast_dtype=autocast_dtype)
    if backbone.modality != splits['modality']:
        raise UsageError(f"--backbone {args.backbone!r} is a {backbone.modality} model but --dataset_name "
                         f"{args.dataset_name!r} is {splits['modality']}")
    return backbone.to(accelerator.device)


def init_from_pretrained(head, pretrained, pretrained_config, args, backbone, log, backbone_given=True):
    """--pretrained_path: with --eval_only the head is the pretrained one (every tensor must fit); otherwise it is
    fine-tuned: every tensor that fits is loaded and only the last routing trains (the paper's SST-5 -> SST-2
    recipe; --finetune all trains every parameter). The backbone must be the one the file names; the authors' files
    name theirs only in the file name, so a --backbone given explicitly (e.g. a local copy) is taken as theirs."""
    state = pretrained.state_dict()
    trained_on, using = pretrained_config.get('backbone'), backbone and backbone.name
    authors = pretrained_config.get('training', {}).get('source') == 'authors_2022'
    if authors and backbone_given and trained_on not in (None, using):
        log(f"--pretrained_path {args.pretrained_path} is named for backbone {trained_on!r}; using --backbone {using!r}")
    elif trained_on not in (None, using):
        raise UsageError(f"--pretrained_path {args.pretrained_path!r} was trained with backbone "
                         f"{trained_on!r}, not --backbone {using!r}")
    revision, now = pretrained_config.get('backbone_revision'), backbone and backbone.revision
    if trained_on is not None and revision != now:
        raise UsageError(f"--pretrained_path {args.pretrained_path!r} was trained with backbone {trained_on!r} at "
                         f"revision {revision!r}, not --revision {now!r}: pass --revision {revision}"
                         if revision else f"--pretrained_path {args.pretrained_path!r} was trained with backbone "
                         f"{trained_on!r} at no pinned revision, not --revision {now!r}: leave --revision out")
    check_provenance(pretrained_config.get('backbone_fingerprint'), backbone,
                     f"--pretrained_path {args.pretrained_path}")
    own = head.state_dict()
    trained_shape = (getattr(pretrained, 'd_depth', None), getattr(pretrained, 'd_emb', None))
    contradicts = backbone is not None and None not in trained_shape and trained_shape != (backbone.d_depth,
                                                                                            backbone.d_emb)
    if args.eval_only:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k} {tuple(state[k].shape)} (this run's {tuple(own[k].shape)})"
                 for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise UsageError(f"--pretrained_path {args.pretrained_path!r} does not fit a {args.model} model for "
                             f"{args.dataset_name} on {args.backbone}{depths_hint(state, backbone)}: " + '; '.join(
                                 filter(None, [missing and f"missing {', '.join(missing[:3])}",
                                               unexpected and f"unexpected {', '.join(unexpected[:3])}",
                                               wrong and f"shapes {', '.join(wrong[:3])}"])))
        head.load_state_dict(state, strict=True)
        return
    if contradicts and not args.pretrained_subset:
        raise UsageError(f"--pretrained_path {args.pretrained_path!r} routes hidden states of {trained_shape[0]} "
                         f"depths x {trained_shape[1]}, but --backbone {backbone.name} gives {backbone.d_depth} x "
                         f"{backbone.d_emb}: it was trained on another backbone"
                         f"{' (' + repr(trained_on) + ')' if trained_on else ''}; "
                         f"pass that backbone, or --pretrained_subset to load only the tensors whose shapes fit (the "
                         f"others start at their initialisation)")
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    head.load_state_dict(fits, strict=False)
    for name, p in head.named_parameters():
        p.requires_grad_(args.finetune == 'all' or name.startswith(last_routing(head)))
    trained = 'every parameter' if args.finetune == 'all' else f"only the last routing ({last_routing(head)[:-1]})"
    log(f"fine-tuning {args.pretrained_path} on {args.dataset_name}, training {trained}: loaded {len(fits)} of the "
        f"head's {len(own)} tensors; left at initialisation (other shapes, e.g. another number of classes): "
        f"{', '.join(sorted(set(own) - set(fits))) or 'none'}"
        + (f" (--pretrained_subset: the head was trained on {trained_shape[0]} depths x {trained_shape[1]}, this "
           f"backbone gives {backbone.d_depth} x {backbone.d_emb}: only a subset loaded)" if contradicts else ''))



def one_cycle(optimizer, lr, regime, total_steps):
    """The regime's single cycle: lr rises from lr / 25 to lr over the first pct_start of the steps, then
    anneals (cosine) to final_lr; Adam's beta1 cycles the other way (0.95 -> 0.85 -> 0.95)."""
    warmup_end = float(regime['pct_start'] * total_steps) - 1             # as OneCycleLR computes it
    if warmup_end == 0 or total_steps - 1 == warmup_end:                  # a phase of no length: 0 / 0 inside it
        raise UsageError(f"{total_steps} optimizer steps in all (--n_epochs x steps per epoch) make a one-cycle "
                         f"schedule with a {regime['pct_start']:.0%} warm-up of a single step, which OneCycleLR "
                         f"cannot schedule: use more steps (--n_epochs, --n_iters_per_train_epoch) or fewer")
    final_div_factor = 1e4 if regime['final_lr'] is None else lr / 25 / regime['final_lr']
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, pct_start=regime['pct_start'],
                                               final_div_factor=final_div_factor, cycle_momentum=True,
                                               total_steps=total_steps)
