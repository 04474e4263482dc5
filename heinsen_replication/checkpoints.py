"""
Loading any model of this repository without naming its class (from_pretrained): our folders (save_pretrained,
train.py), older single-file heads, plain state dicts (the authors' published 2019 files), and the authors' 2022
files by their names.
"""
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .backbones import BACKBONES
from .errors import UsageError
from .models import RoutingHead, SmallNORBClassifier, SSTClassifier
from .pretrained import STATE_FILE_SUFFIXES, check_finite, check_local_path, read_config, torch_load_safely
from .standard_heads import FROZEN_HEADS


def from_pretrained(path_or_id, backbone=None, **kwargs):
    """Any model of this repository -> (model, config dict), config as save_pretrained writes it:
      - a folder (or hub id) written by save_pretrained or train.py: the class named by its model_type;
      - a single-file head of earlier versions (.safetensors with string metadata), or a plain state dict (.pt,
        e.g. the authors' published 2019 files; loaded with weights_only=True): rebuilt from its tensors' shapes;
      - the authors' 2022 files by their names (authors_2022_file): a head's plain state dict
        `pretrained_<dataset>_head_for_<backbone>.state_dict` or a training checkpoint
        `<dataset>_head_for_<backbone>_epoch<k>.checkpoint` (its 'weights'), loaded with weights_only=True.
    backbone: the backbone of a single file, given (e.g. a local copy of the one it names), else the one the file
    names (the authors' files: the name after `_for_`, when it is one of BACKBONES), else None. The weights load
    strictly and must be finite."""
    path = str(path_or_id)
    check_local_path(path)
    if path.endswith(STATE_FILE_SUFFIXES):
        state, training = _read_state_file(path)
        model = _model_of_state_dict(state, path)
        check_finite(state, repr(path))
        model.load_state_dict(state, strict=True)
        named = training.pop('backbone', None)
        named = None if named == 'none' or isinstance(model, SmallNORBClassifier) else named   # end to end: none
        config = {**model._hub_mixin_config, 'model_type': type(model).__name__, 'training': training,
                  'backbone': backbone or named, 'backbone_revision': training.pop('revision', None)}
        return model, config
    config = read_config(path, revision=kwargs.get('revision'))
    if config.get('model_type') not in MODEL_TYPES:
        raise UsageError(f"{path!r}: config.json names model_type {config.get('model_type')!r}, not one of "
                         f"{sorted(MODEL_TYPES)}")
    return MODEL_TYPES[config['model_type']].from_pretrained(path, **kwargs), config


# The authors' 2022 file names: pretrained_sst5_head_for_roberta-large.state_dict (a plain state dict of the head),
# sst5_head_for_roberta-large_epoch10.checkpoint (a dict whose 'weights' is the head's state dict).
_AUTHORS_2022_NAME = re.compile(r'(?:pretrained_)?(?P<dataset>.+?)_head_for_(?P<backbone>.+?)'
                                r'(?:_epoch(?P<epoch>\d+))?\.(?:state_dict|checkpoint)')


def authors_2022_file(path):
    """The authors' 2022 head file's name -> {'dataset_name', 'backbone' (a BACKBONES key, or None where the name
    after `_for_` is none of them), 'epoch' (int, .checkpoint files) or None}; None for any other name."""
    match = _AUTHORS_2022_NAME.fullmatch(Path(path).name)
    if match is None:
        return None
    name = match['backbone']
    keys = [k for k in BACKBONES if name in (k, k.split('/')[-1], k.replace('/', '_'), k.replace('/', '--'))]
    return {'dataset_name': match['dataset'], 'backbone': keys[0] if len(keys) == 1 else None,
            'epoch': None if match['epoch'] is None else int(match['epoch'])}


def _read_state_file(path):
    """-> (state dict, metadata dict) of a .safetensors file, of a .pt/.pth/.state_dict state dict (or a train.py
    checkpoint), or of the authors' .checkpoint (its 'weights')."""
    if path.endswith('.safetensors'):
        try:
            with safe_open(path, 'pt') as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        except Exception as e:
            raise UsageError(f"{path!r} is not a readable safetensors file: {e}") from e
    try:
        loaded = torch_load_safely(path)
    except UsageError as e:
        if path.endswith('.checkpoint') and 'refusing to load' in str(e):
            raise UsageError(
                f"{e}\nIf {path!r} is the authors' training checkpoint and you trust it, extract its head once: "
                f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False)['weights'], "
                f"'{path[:-len('.checkpoint')]}.state_dict')\" and load the .state_dict file") from None
        raise
    metadata = {}
    if isinstance(loaded, dict) and isinstance(loaded.get('head'), dict):               # a train.py checkpoint
        metadata = dict(loaded.get('metadata', {}))
        # the backbone it trained on: recorded by train.py since it checkpoints it, else its --backbone, --revision
        args = loaded.get('args') if isinstance(loaded.get('args'), dict) else {}
        metadata['backbone'] = loaded.get('backbone', args.get('backbone'))
        metadata['revision'] = loaded.get('backbone_revision', args.get('revision'))
        loaded = loaded['head']
    elif path.endswith('.checkpoint'):                                                  # the authors' checkpoint
        if not isinstance(loaded, dict) or not isinstance(loaded.get('weights'), dict):
            raise UsageError(f"{path!r} is not the authors' training checkpoint: it holds no 'weights' (the "
                               f"head's state dict); its keys: {sorted(loaded) if isinstance(loaded, dict) else '-'}")
        loaded = loaded['weights']
    authors = authors_2022_file(path)
    if authors is not None:
        metadata = {k: v for k, v in {'backbone': authors['backbone'], 'dataset_name': authors['dataset_name'],
                                      'epoch': authors['epoch'], 'source': 'authors_2022'}.items() if v is not None}
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise UsageError(f"{path!r} holds neither a state dict of tensors nor a train.py checkpoint")
    return loaded, metadata


def _model_of_state_dict(state, path):
    """The model whose state dict this is, built from its tensors' shapes (RoutingHead: route.*; SSTClassifier:
    depth_emb; SmallNORBClassifier: convolve.*)."""
    shape = lambda key: tuple(state[key].shape)
    try:
        if 'route.0.W_F1' in state:
            return RoutingHead(*shape('W'), n_classes=shape('route.2.W_F1')[0], n_hid=shape('route.0.W_F1')[0])
        if 'depth_emb' in state:
            n_parts, n_classes, d_cap, _ = shape('routings.1.W')
            return SSTClassifier(*shape('depth_emb'), d_inp=shape('detect_parts.0.weight')[0], d_cap=d_cap,
                                 n_parts=n_parts, n_classes=n_classes)
        if 'convolve.1.weight' in state:
            n_parts, n_objs = shape('routings.1.W')[:2]
            return SmallNORBClassifier(n_objs=n_objs, n_parts=n_parts, d_chns=shape('convolve.1.weight')[0])
    except KeyError as e:
        raise UsageError(f"{path!r}: its state dict lacks {e}, which its model needs") from None
    raise UsageError(f"{path!r}: its keys ({', '.join(list(state)[:4])}, ...) are not those of a RoutingHead "
                       f"(route.*), an SSTClassifier (depth_emb, ...) or a SmallNORBClassifier (convolve.*)")


# config.json's model_type -> class
MODEL_TYPES = {cls.__name__: cls for cls in (RoutingHead, SSTClassifier, SmallNORBClassifier, *FROZEN_HEADS.values())}
