"""
The replication harness of heinsen_routing: the machinery behind train.py, models.py, train_all_heads.sh and the
notebooks, one room per concern. The rooms, bottom first (no module imports one above it):

    errors          UsageError: a user's mistake (reported as one line), as opposed to our bugs
    settings        a run's process-global settings (matmul precision, threads, seeds), set and restored
    recipes         each --model's regime and every profile's runs (python -m heinsen_replication.recipes)
    data            the datasets (a package of its own: python -m heinsen_replication.data)
    pretrained      the Pretrained mixin (save_pretrained / from_pretrained) and the checks of model files
    runs            a run's folder: lock, overwrite and resume checks, atomic checkpoints, metrics.jsonl
    backbones       frozen pretrained transformers: hidden states of all depths
    models          RoutingHead (2022), SSTClassifier and SmallNORBClassifier (2019)
    standard_heads  ScalarMix and the three standard heads on the same features
    checkpoints     from_pretrained: any model of this repository, and the authors' older files
    classifier      MultiModalClassifier: a frozen backbone + a RoutingHead
    loaders         samplers, seeded draws, loaders, the training stream, mixup
    assembly        a run's device, backbone and model, initialised from a pretrained model
    vision_digits   the small ViT on the digits and its routing head: predictions, patch credit, deletion test
    reporting       what a run and a job tell the people who watch them: logging, steps.jsonl, trackers, summaries
"""
import importlib

# The names a user's script needs most, here too (`from heinsen_replication import from_pretrained`), imported when
# first used: `import heinsen_replication.data` loads the data layer alone.
PUBLIC = {'from_pretrained': 'checkpoints', 'RoutingHead': 'models', 'SSTClassifier': 'models',
          'SmallNORBClassifier': 'models', 'MultiModalClassifier': 'classifier', 'load_backbone': 'backbones',
          'UsageError': 'errors'}
__all__ = sorted(PUBLIC)


def __getattr__(name):
    if name in PUBLIC:
        return getattr(importlib.import_module(f'{__name__}.{PUBLIC[name]}'), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
