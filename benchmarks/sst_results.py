"""
Real results, offline: routing heads on the frozen all-MiniLM-L6-v2 ('minilm') over the real
Stanford Sentiment Treebank, beside conventional baselines on the same frozen features, and a
deletion test of the heads' credit assignment. Regenerates docs/sst_results.md (docs/results.md quotes it)
from scratch and, with --save_pretrained, the heads under pretrained/.

    python -m benchmarks.sst_results --data_root .data --save_pretrained

Steps (wall-clock time of each is reported):
 1. the frozen hidden states of every SST text, once (train.py's --feature_cache; reused if present);
 2. per seed: an SST-5 head (train.py, the paper's regime, all training phrases), then an SST-2 head
    fine-tuned from it (last routing only); test accuracy of each, mean +- std over seeds;
 3. baselines on the same features and training phrases: logistic regression on the mean-pooled
    states of the last layer, and of all depths concatenated (L2 penalty chosen on dev);
 4. the heads with the best dev accuracy are the pretrained heads (with --save_pretrained, if their dev accuracy
    beats the committed heads'); their test accuracy is measured again with `train.py --eval_only` on the live
    backbone (the number their metadata states);
 5. deletion test on SST-2 test: delete the k tokens with the highest end-to-end credit for the
    predicted class, or k random tokens, re-encode, and measure the drop of the predicted class's
    probability, k = 1, 3, 5.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import models
import recipes
import train
from benchmarks import shown_command

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


def publish_pretrained(run_model, folder, dataset, live, cached, valid):
    """Copies a train.py run's model folder into pretrained/ with the accuracies it was chosen and checked by."""
    model, config = models.from_pretrained(run_model)
    model.save_pretrained(folder, backbone=config['backbone'], backbone_revision=config['backbone_revision'], training={
        **config['training'], 'test_accuracy': stated(live), 'test_accuracy_from_float16_feature_cache': stated(cached),
        'valid_accuracy': stated(valid),
        'reproduce': f'python train.py --dataset_name {dataset} --backbone minilm --eval_only --pretrained_path {folder}'})


def committed_valid_accuracy(dataset):
    """The dev accuracy of the committed pretrained head for dataset, as its config states it."""
    _, config = models.from_pretrained(PRETRAINED[dataset])
    return config['training']['valid_accuracy']


def better_on_dev(valid, committed):
    """Whether a head of dev accuracy valid replaces the committed head: only if higher at the stated precision (the
    committed head itself, rounded to 4 decimals in its config, is not better than itself)."""
    return stated(valid) > committed


def write_report(lines, path):
    """Prints the report (markdown lines) and writes it to path."""
    report = '\n'.join(lines) + '\n'
    print(report)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        f.write(report)


def sst_feature_store(data_root, feature_cache):
    """The FeatureStore of minilm's frozen hidden states of every SST text (computed once, then reused)."""
    store = data.FeatureStore(feature_cache, models.load_backbone('minilm'))
    for dataset in ('sst5', 'sst2'):
        splits = data.get_dataset_splits(dataset, data_root=data_root)
        for split in ('train', 'valid', 'test'):
            store.ensure(splits[split].texts, f'{dataset}/{split}')
    return store


def train_heads(args, seed):
    """-> {dataset: (valid acc, test acc, head path)} for the SST-5 head and the SST-2 head tuned from it: the offline
    recipe (recipes.py) for this seed, with this command's epochs, batch size and steps."""
    results = {}
    recipe = recipes.runs('offline', data_root=args.data_root, out=args.out_dir, seed=seed,
                          feature_cache=args.feature_cache)
    for dataset, n_epochs in (('sst5', args.sst5_epochs), ('sst2', args.sst2_epochs)):
        argv = [*recipe[dataset], '--n_epochs', str(n_epochs), '--batch_sz', str(args.batch_sz)]
        if args.n_iters_per_train_epoch:
            argv += ['--n_iters_per_train_epoch', str(args.n_iters_per_train_epoch)]
        train.main(argv)                                 # --resume: a rerun continues (or re-evaluates) the same run
        out = train.parse_args(argv).output_dir
        final = train.read_metrics(out)[1]
        results[dataset] = (final['valid_accuracy'], final['test_accuracy'], os.path.join(out, 'model'))
    return results


def pooled_features(store, split):
    """-> last-layer mean [n, d_emb], all-depths mean concatenated [n, d_depth * d_emb], labels [n]."""
    dataset = store.dataset(split.texts, split.labels)
    means = torch.stack([dataset[k][0].mean(dim=0) for k in range(len(dataset))])  # [n, d_depth, d_emb]
    return means[:, -1], means.flatten(1), torch.tensor(split.labels)


def logistic_regression(train_x, train_y, l2, n_classes, max_iter=100):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS on standardised features.
    -> predict(x) -> labels"""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mean) / std
    W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=max_iter, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, train_y) + l2 * W.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda test_x: (((test_x - mean) / std) @ W + b).argmax(-1)


def baselines(args, store, dataset):
    """Logistic regression on mean-pooled frozen states of all training phrases; L2 chosen on dev.
    -> {features: (dev acc, l2, test acc)}"""
    splits = data.get_dataset_splits(dataset, data_root=args.data_root)
    feats = {k: pooled_features(store, splits[k]) for k in ('train', 'valid', 'test')}
    results = {}
    for j, name in enumerate(('last layer, mean-pooled', 'all depths, mean-pooled, concatenated')):
        best = None
        for l2 in (1e-5, 1e-4, 1e-3):
            predict = logistic_regression(feats['train'][j], feats['train'][2], l2, splits['n_classes'])
            with torch.no_grad():
                valid, test = ((predict(feats[k][j]) == feats[k][2]).float().mean().item() for k in ('valid', 'test'))
            if best is None or valid > best[0]:
                best = (valid, l2, test)
        results[name] = best
    return results


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
    backbone = models.load_backbone('minilm')
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
    head = models.RoutingHead.from_pretrained(head_path).eval()
    drops, _, _ = removal_test({'routing': (head, {'credit': routing_credit})}, args.data_root, ks, seed)
    routing = drops['routing']
    return {k: (float(np.mean(routing['credit']['delete'][k])), float(np.mean(routing['random']['delete'][k])),
                len(routing['credit']['delete'][k])) for k in ks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data', help='folder holding sst/{train,dev,test}.txt')
    p.add_argument('--feature_cache', default='.data/features')
    p.add_argument('--out_dir', default='runs/sst_results')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--sst5_epochs', type=int, default=1)
    p.add_argument('--sst2_epochs', type=int, default=1)
    p.add_argument('--batch_sz', type=int, default=32)
    p.add_argument('--n_iters_per_train_epoch', type=int, default=None,
                   help="steps per epoch (default: the offline recipe's 2000)")
    p.add_argument('--save_pretrained', action='store_true', help='copy the best-dev heads to pretrained/')
    p.add_argument('--report', default='docs/sst_results.md')
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    timings, lines = {}, []
    started = time.time()

    # 1. features, once
    t = time.time()
    store = sst_feature_store(args.data_root, args.feature_cache)
    timings['frozen features (all SST texts, once)'] = time.time() - t

    # 2. routing heads
    runs = []
    for seed in args.seeds:
        t = time.time()
        runs.append(train_heads(args, seed))
        timings[f'routing heads, seed {seed} (SST-5, then SST-2 from it)'] = time.time() - t

    # 3. baselines
    t = time.time()
    base = {dataset: baselines(args, store, dataset) for dataset in ('sst5', 'sst2')}
    timings['baselines (logistic regression, 3 L2 penalties, both datasets)'] = time.time() - t

    # 4. pretrained heads: best dev accuracy; test accuracy on the live backbone
    pretrained = {}
    for dataset in ('sst5', 'sst2'):
        valid, test, path = max((r[dataset] for r in runs), key=lambda r: r[0])
        t = time.time()
        live = train.main(['--dataset_name', dataset, '--backbone', 'minilm', '--data_root', args.data_root,
                           '--eval_only', '--pretrained_path', path, '--device', 'cpu', '--output_dir', args.out_dir])
        timings[f'{dataset}: eval_only of the chosen head on the live backbone'] = time.time() - t
        published = args.save_pretrained and better_on_dev(valid, committed_valid_accuracy(dataset))     # dev decides
        if published:
            publish_pretrained(path, PRETRAINED[dataset], dataset, live, test, valid)
        pretrained[dataset] = (valid, test, live, path, published)

    # 5. deletion test with the chosen SST-2 head
    t = time.time()
    deletion = deletion_test(args, pretrained['sst2'][3])
    timings['deletion test (SST-2 test)'] = time.time() - t
    timings['total'] = time.time() - started

    lines += ['| model (frozen all-MiniLM-L6-v2 features) | SST-5 test acc. (%) | SST-2 test acc. (%) |', '|---|---|---|']
    lines.append(f"| routing head (2022), mean ± std over seeds {args.seeds} | "
                 f"{mean_std([r['sst5'][1] for r in runs])} | {mean_std([r['sst2'][1] for r in runs])} |")
    for name in base['sst5']:
        (v5, c5, t5), (v2, c2, t2) = base['sst5'][name], base['sst2'][name]
        lines.append(f"| logistic regression, {name} (L2 {c5:g} / {c2:g} by dev) | {100 * t5:.1f} | {100 * t2:.1f} |")
    lines += ['', 'Per seed (the offline profile, `bash train_all_heads.sh offline`, is seed 0), accuracies in %:', '',
              '| seed | SST-5 dev | SST-5 test | SST-2 dev | SST-2 test |', '|---|---|---|---|---|']
    lines += [f"| {seed} | " + ' | '.join(f"{100 * r[d][k]:.2f}" for d in ('sst5', 'sst2') for k in (0, 1)) + ' |'
              for seed, r in zip(args.seeds, runs)]
    lines += ['', 'Chosen (best dev) heads, test accuracy by `train.py --eval_only` on the live float32 backbone:', '']
    for dataset, (valid, test, live, path, published) in pretrained.items():
        lines.append(f"- {dataset}: dev {100 * valid:.2f}%, test {100 * live:.2f}% (from the float16 feature cache: "
                     f"{100 * test:.2f}%){' -> ' + PRETRAINED[dataset] if published else ''}")
    lines += ['', 'Deletion test (SST-2 test, chosen head): mean drop of the predicted class probability after '
              'deleting k tokens and re-encoding', '', '| k | highest-credit tokens deleted | random tokens deleted | sentences |',
              '|---|---|---|---|']
    lines += [f"| {k} | {top:.3f} | {rand:.3f} | {n} |" for k, (top, rand, n) in deletion.items()]
    lines += ['', f"Wall-clock on this machine ({os.cpu_count()} CPU cores, torch {torch.__version__}):", '']
    lines += [f"- {name}: {seconds / 60:.1f} min" for name, seconds in timings.items()]
    steps = f" of at most {args.n_iters_per_train_epoch} steps" if args.n_iters_per_train_epoch else ''
    lines += ['', f"Settings: SST-5 {args.sst5_epochs} epoch(s){steps} over shuffled training phrases (all subtrees), "
              f"SST-2 {args.sst2_epochs} epoch(s){steps} fine-tuning the last routing, batch {args.batch_sz}, RAdam, "
              f"one-cycle max lr 1e-3, mixup Beta(0.65, 0.65). Command: `"
              + shown_command('benchmarks.sst_results', argv if argv is not None else sys.argv[1:]) + '`']
    write_report(lines, args.report)
    return runs, base, pretrained, deletion


if __name__ == '__main__':
    main()
