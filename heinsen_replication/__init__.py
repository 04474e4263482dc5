"""
The replication harness of heinsen_routing: the machinery behind train.py, models.py, train_all_heads.sh and the
notebooks, one room per concern. The rooms, bottom first (no module imports one above it):

    errors          UsageError: a user's mistake (reported as one line), as opposed to our bugs
    recipes         the training recipes of every profile of train_all_heads.sh (python -m heinsen_replication.recipes)
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
    reporting       what a run and a job tell the people who watch them: logging, steps.jsonl, trackers, summaries
"""
