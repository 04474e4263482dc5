"""
What several benchmarks share: how reports show their commands and folders (shown_command, shown_path), how they
are written (write_report) and summarised (mean_std), the records reports are generated from and how a record says
the way it was measured (measurement_meta, finish_meta, how_measured, save_record, load_record), the committed
pretrained heads (PRETRAINED, publish_pretrained), minilm's SST feature store, and the deletion / insertion test of
credit assignment (removal_test, deletion_test).
"""
import json
import os
import platform
import shlex
import statistics
import subprocess
import time

import numpy as np
import torch
from tqdm import tqdm

from heinsen_replication import data
from heinsen_replication.backbones import load_backbone
from heinsen_replication.checkpoints import from_pretrained
from heinsen_replication.models import RoutingHead

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How the reports show the folders their commands were given, where these lie outside the repository: as the
# environment variables of train_all_heads.sh and the tests, or a name for what the folder holds.
PLACEHOLDERS = {'--data_root': '$DATA_ROOT', '--feature_cache': '$FEATURE_CACHE', '--sst_dir': '$SST_DIR',
                '--runs': '$OUT/frozen-heads', '--routing_head': '$ROUTING_HEAD', '--attention_head': '$ATTENTION_HEAD',
                '--out_dir': '$OUT_DIR', '--report': '$REPORT'}


def shown_path(path, placeholder):
    """A folder as a report shows it: relative to the repository when it lies inside it, else `placeholder` (say
    '$DATA_ROOT'): the folders of the machine that measured mean nothing to a reader."""
    relative = os.path.relpath(os.path.abspath(path), REPO_ROOT)
    return placeholder if relative == '..' or relative.startswith('..' + os.sep) else relative


def shown_command(module, argv, placeholders=PLACEHOLDERS):
    """'python -m MODULE ARGV' as a report shows it: the value of each flag in placeholders through shown_path.
    argv: the command line's arguments (sys.argv[1:])."""
    shown, flag = [], None
    for arg in argv:
        name, eq, value = arg.partition('=')
        if eq and name in placeholders:                          # --flag=value
            arg = f"{name}={shown_path(value, placeholders[name])}"
        elif flag in placeholders:
            arg = shown_path(arg, placeholders[flag])
        shown.append(arg)
        flag = arg
    return ' '.join(['python -m', module, *(a if '$' in a else shlex.quote(a) for a in shown)])


PRETRAINED = {'sst5': 'pretrained/sst5_minilm_routing_head',
              'sst2': 'pretrained/sst2_minilm_routing_head'}


def mean_std(values, decimals=1):
    """Accuracies (fractions) -> 'mean ± std' in %, sample std over seeds; one seed has no std: just its value."""
    if len(values) == 1:
        return f"{100 * values[0]:.{decimals}f}"
    return f"{100 * statistics.mean(values):.{decimals}f} ± {100 * statistics.stdev(values):.{decimals}f}"


def stated(accuracy):
    """An accuracy as the pretrained configs state it (4 decimals)."""
    return round(accuracy, 4)


def publish_pretrained(run_model, folder, dataset, live, cached, valid, trained_by=None):
    """Copies a train.py run's model folder into pretrained/ with the accuracies it was chosen and checked by (and
    the command that trained it, where given)."""
    model, config = from_pretrained(run_model)
    model.save_pretrained(folder, backbone=config['backbone'], backbone_revision=config['backbone_revision'], training={
        **config['training'], 'test_accuracy': stated(live), 'test_accuracy_from_float16_feature_cache': stated(cached),
        'valid_accuracy': stated(valid), **({'trained_by': trained_by} if trained_by else {}),
        'reproduce': f'python train.py --dataset_name {dataset} --backbone minilm --eval_only --pretrained_path {folder}'})


def live_test_accuracy(model_folder, dataset, data_root, output_dir):
    """The test accuracy of a saved head through the live minilm backbone (train.py --eval_only; the model as its
    config.json names it), where its training read the float16 feature cache."""
    import train
    return train.main(['--dataset_name', dataset, '--backbone', 'minilm', '--data_root', data_root, '--eval_only',
                       '--pretrained_path', model_folder, '--device', 'cpu', '--output_dir', output_dir])


def committed_valid_accuracy(dataset):
    """The dev accuracy of the committed pretrained head for dataset, as its config states it."""
    _, config = from_pretrained(PRETRAINED[dataset])
    return config['training']['valid_accuracy']


def better_on_dev(valid, committed):
    """Whether a head of dev accuracy valid replaces the committed head: only if higher at the stated precision (the
    committed head itself, rounded to 4 decimals in its config, is not better than itself)."""
    return stated(valid) > committed


NOT_RECORDED = 'not recorded'
# What every record's 'meta' holds: how the measurement was made. A record written before these were kept says
# NOT_RECORDED for what it lacks (or where a value was recovered later, e.g. the commit from the git history, says so).
META_FIELDS = ('command', 'commit', 'when', 'cpu_model', 'cpu_count', 'torch', 'threads', 'precision', 'load_start',
               'load_end')


def git_commit():
    """The repository's HEAD commit (short), '+changes' when the working tree differs from it; None outside git."""
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ('+changes' if dirty else '')


def measurement_meta(command, precision, threads=None):
    """The start of a record's 'meta': command, commit, time, CPU, torch, threads, precision and the load average
    (1 min) now. finish_meta adds the load at the end."""
    from heinsen_replication.recipes import cpuinfo
    return {'command': command, 'commit': git_commit() or NOT_RECORDED,
            'when': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'cpu_model': cpuinfo('model name') or platform.processor() or NOT_RECORDED, 'cpu_count': os.cpu_count(),
            'torch': torch.__version__, 'threads': threads or torch.get_num_threads(), 'precision': precision,
            'load_start': round(os.getloadavg()[0], 2)}


def finish_meta(meta):
    """meta with the load average (1 min) at the end of the measurement."""
    return {**meta, 'load_end': round(os.getloadavg()[0], 2)}


def busy(meta):
    """Whether other work shared the machine during a measurement: its record says so ('busy': true or false), or
    the load average at its start or end was a full core above the machine's cores."""
    if 'busy' in meta:
        return bool(meta['busy'])
    loads = [meta.get(k) for k in ('load_start', 'load_end')]
    loads = [v for v in loads if isinstance(v, (int, float))]
    return bool(loads) and isinstance(meta.get('cpu_count'), int) and max(loads) >= meta['cpu_count'] + 1


def how_measured(meta):
    """One sentence that says how a record was measured, from its meta; what a record lacks is 'not recorded'."""
    def get(key):
        value = meta.get(key)
        return NOT_RECORDED if value is None else value
    load = (f"load average {get('load_start')} at the start, {get('load_end')} at the end"
            if meta.get('load_start') is not None or meta.get('load_end') is not None else 'load not recorded')
    cores = f" ({meta['cpu_count']} cores)" if meta.get('cpu_count') else ''
    shared = ('; other work shared the machine, so its times are not headline figures' if busy(meta) else '')
    notes = f" {meta['notes']}" if meta.get('notes') else ''
    return (f"How it was measured: `{get('command')}`; commit {get('commit')}; {get('when')}; CPU "
            f"{get('cpu_model')}{cores}; torch {get('torch')}; threads {get('threads')}; precision "
            f"{get('precision')}; {load}{shared}.{notes}")


def save_record(record, path):
    """Writes a report's record (JSON: 'meta' and the measured figures) to path."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(record, f, indent=1)
        f.write('\n')


def load_record(path):
    with open(path) as f:
        return json.load(f)


def write_report(lines, path):
    """Prints the report (markdown lines) and writes it to path."""
    report = '\n'.join(lines) + '\n'
    print(report)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        f.write(report)


def sst_feature_store(data_root, feature_cache):
    """The FeatureStore of minilm's frozen hidden states of every SST text (computed once, then reused)."""
    store = data.FeatureStore(feature_cache, load_backbone('minilm'))
    for dataset in ('sst5', 'sst2'):
        splits = data.get_dataset_splits(dataset, data_root=data_root)
        for split in ('train', 'valid', 'test'):
            store.ensure(splits[split].texts, f'{dataset}/{split}')
    return store


def routing_credit(head, hidden, mask, pred):
    """A RoutingHead's end-to-end credit of each token (summed over depths) for the predicted class -> [batch, n_pos]."""
    credit, _ = head.credit(hidden, mask)                                        # [batch, n_pos, d_depth, n_classes]
    return credit.sum(dim=2)[torch.arange(len(pred)), :, pred]


def removal_test(heads, data_root, ks=(1, 3, 5), seed=0, modes=('delete',), batch_sz=64, sentences=None):
    """Deletion (and insertion) tests on the SST-2 test sentences, re-encoding with the live minilm.

    heads: {name: (head, {method: attribute})}: a head on minilm's hidden states (hidden [b, n_pos, d_depth, d_emb],
    mask [b, n_pos] -> class scores [b, n_classes]) and its attribution methods, attribute(head, hidden, mask, pred)
    -> [b, n_pos] token scores (higher = more for the predicted class pred [b]). 'random' is added to every head.
    For each sentence with more than k content (non-special) tokens, its k highest-scored content tokens are deleted
    ('delete') or are the only ones kept ('insert'; the special tokens stay), the result is re-encoded, and the drop
    of the predicted class's probability is recorded. The random tokens are drawn once per sentence and k, for every
    head and both tests. -> ({head: {method: {mode: {k: [drops]}}}}, {head: {method: attribution seconds}},
    {'encode': seconds of the first encoding, 'n_sentences': n}). sentences: indices of the test sentences to use, in
    this order (default: all, in file order)."""
    backbone = load_backbone('minilm')
    tokenizer, model = backbone.tokenizer, backbone.model
    test = data.get_dataset_splits('sst2', data_root=data_root)['test']
    texts = test.texts if sentences is None else [test.texts[i] for i in sentences]
    special = set(tokenizer.all_special_ids)
    rng = np.random.default_rng(seed)

    @torch.no_grad()
    def encode(id_lists):
        """token id lists -> hidden [n, n_pos, d_depth, d_emb], mask [n, n_pos] (True = padding)"""
        n_pos = max(len(ids) for ids in id_lists)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (n_pos - len(ids)) for ids in id_lists])
        attention = torch.tensor([[1] * len(ids) + [0] * (n_pos - len(ids)) for ids in id_lists])
        out = model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=-2), attention == 0

    @torch.no_grad()
    def probabilities(head, id_lists, encoded=None):
        hidden, mask = encoded or encode(id_lists)
        return head(hidden, mask).softmax(-1)                                    # [n, n_classes]

    drops = {h: {m: {mode: {k: [] for k in ks} for mode in modes} for m in [*methods, 'random']}
             for h, (_, methods) in heads.items()}
    seconds = {h: {m: 0.0 for m in methods} for h, (_, methods) in heads.items()}
    encode_seconds = 0.0
    for s in tqdm(range(0, len(texts), batch_sz), desc='deletion / insertion test', unit='batch'):
        ids = [tokenizer(t)['input_ids'] for t in texts[s:s + batch_sz]]
        t = time.perf_counter()
        encoded = encode(ids)
        encode_seconds += time.perf_counter() - t
        ranked, probs, preds = {}, {}, {}                      # per head: {method: [b, n_pos] scores}, [b, n_cls], [b]
        for h, (head, methods) in heads.items():
            probs[h] = probabilities(head, ids, encoded)
            preds[h] = probs[h].argmax(-1)
            ranked[h] = {}
            for m, attribute in methods.items():
                t = time.perf_counter()
                ranked[h][m] = attribute(head, *encoded, preds[h]).detach()
                seconds[h][m] += time.perf_counter() - t
        for k in ks:
            jobs = []                                          # (head, method, mode, sentence, token ids after)
            for b, seq in enumerate(ids):
                content = [i for i, tok in enumerate(seq) if tok not in special]
                if len(content) <= k:
                    continue
                rand = set(rng.choice(content, size=k, replace=False).tolist())
                for h in heads:
                    chosen = {m: set(sorted(content, key=lambda i: -scores[b, i].item())[:k])
                              for m, scores in ranked[h].items()}
                    for m, top in [*chosen.items(), ('random', rand)]:
                        for mode in modes:
                            kept = [tok for i, tok in enumerate(seq)
                                    if (i not in top) == (mode == 'delete') or tok in special]
                            jobs.append((h, m, mode, b, tuple(kept)))
            unique = sorted({job[-1] for job in jobs}, key=len)  # each distinct variant encoded once, for every head
            after = {h: {} for h in heads}
            for u in range(0, len(unique), batch_sz):
                chunk = unique[u:u + batch_sz]
                encoded = encode([list(v) for v in chunk])
                for h, (head, _) in heads.items():
                    after[h].update(zip(chunk, probabilities(head, None, encoded)))
            for h, m, mode, b, kept in jobs:
                p = probs[h][b, preds[h][b]].item()
                drops[h][m][mode][k].append(p - after[h][kept][preds[h][b]].item())
    return drops, seconds, {'encode': encode_seconds, 'n_sentences': len(texts)}


def deletion_test(args, head_path, ks=(1, 3, 5), seed=0):
    """-> {k: (mean drop deleting top-credit tokens, mean drop deleting random tokens, n sentences)}"""
    head = RoutingHead.from_pretrained(head_path).eval()
    drops, _, _ = removal_test({'routing': (head, {'credit': routing_credit})}, args.data_root, ks, seed)
    routing = drops['routing']
    return {k: (float(np.mean(routing['credit']['delete'][k])), float(np.mean(routing['random']['delete'][k])),
                len(routing['credit']['delete'][k])) for k in ks}
