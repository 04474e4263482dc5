"""
Faithfulness of credit on the SST-2 test set: are the routing head's end-to-end credits more faithful than the
attributions people already use? One command:

    python -m benchmarks.faithfulness --data_root .data --runs runs/frozen_heads

For each head and attribution method, each test sentence's tokens are ranked by the method's score for the predicted
class, and (benchmarks.sst_results.removal_test, the deletion test of the README)
  - deletion: the k highest-ranked tokens are deleted, the rest re-encoded by the live minilm, and the drop of the
    predicted class's probability recorded (a faithful ranking makes it LARGE);
  - insertion: only the k highest-ranked tokens are kept (with [CLS] and [SEP]), re-encoded, and the drop recorded
    (a faithful ranking makes it SMALL); k = 1, 3, 5, sentences with more than k tokens.
Heads and methods:
  - the committed SST-2 routing head (pretrained/sst2_minilm_routing_head): its end-to-end routing credit (summed
    over depths), Integrated Gradients and gradient x input (Captum) on its inputs, the hidden states of all depths,
    summed per token (over depths and features), and random tokens;
  - the SST-2 head (b), standard_heads.ScalarMixAttentionHead (the run of best dev accuracy under --runs, or
    --attention_head): its attention pooling weights, Integrated Gradients, gradient x input, random.
Integrated Gradients: all-zero hidden states as the baseline, --ig_steps steps (Gauss-Legendre, Captum's default
method), of the predicted class's probability; gradient x input of the same probability. Cost per sentence: the
attribution's own time (the forward pass the prediction needs is not counted); the encoding of the sentence, common
to all methods, is reported once.
--n_sentences N uses N test sentences drawn at random (--seed), for a machine too busy for all 1821.
Writes docs/faithfulness.md and docs/faithfulness.png.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch

from benchmarks.common import (PLACEHOLDERS, PRETRAINED, finish_meta, how_measured, measurement_meta, removal_test,
                               routing_credit, shown_command, shown_path, write_report)
from heinsen_replication import checkpoints, data, models, standard_heads

MODES = {'delete': 'deletion: drop when the top-k tokens are deleted (higher = more faithful)',
         'insert': 'insertion: drop when only the top-k tokens are kept (lower = more faithful)'}
KS = (1, 3, 5)


def probabilities(hidden, mask, head):
    """The function Captum attributes: hidden [b, n_pos, d_depth, d_emb] -> class probabilities [b, n_classes]
    (the mask and the head travel as forward arguments, which Captum expands with the scaled copies of hidden)."""
    return head(hidden, mask).softmax(-1)


def integrated_gradients(n_steps, internal_batch_size):
    """-> attribute(head, hidden, mask, pred) -> [b, n_pos]; attribute.gaps collects, per sentence, (|the sum of the
    attributions - (p(x) - p(0))|, |p(x) - p(0)|): how far n_steps are from IG's completeness."""
    def attribute(head, hidden, mask, pred):
        from captum.attr import IntegratedGradients
        attributions, delta = IntegratedGradients(probabilities).attribute(
            hidden, baselines=torch.zeros_like(hidden), target=pred, n_steps=n_steps,
            additional_forward_args=(mask, head), internal_batch_size=internal_batch_size,
            return_convergence_delta=True)                                       # delta: sum - (p(x) - p(0)), [b]
        total = attributions.sum(dim=(-3, -2, -1))
        attribute.gaps += list(zip(delta.abs().tolist(), (total - delta).abs().tolist()))
        return attributions.sum(dim=(-2, -1))                                    # [b, n_pos]
    attribute.gaps = []
    return attribute


def gradient_x_input(head, hidden, mask, pred):
    from captum.attr import InputXGradient
    attributions = InputXGradient(probabilities).attribute(
        hidden.clone().requires_grad_(), target=pred, additional_forward_args=(mask, head))
    return attributions.sum(dim=(-2, -1))                                        # [b, n_pos]


def attention_weights(head, hidden, mask, pred):
    return head.attention_weights(hidden, mask)[0]                               # [b, n_pos]


def best_attention_head(runs):
    """The finished SST-2 run of head (b) with the best dev accuracy under runs -> (model folder, seed) or None."""
    best = None
    for path in sorted(glob.glob(os.path.join(runs, 'scalar_mix_attention', 'seed*', 'sst2', 'metrics.jsonl'))):
        with open(path) as f:
            finals = [r['final'] for r in map(json.loads, filter(str.strip, f)) if 'final' in r]
        if finals and (best is None or finals[-1]['valid_accuracy'] > best[0]):
            best = (finals[-1]['valid_accuracy'], os.path.join(os.path.dirname(path), 'model'),
                    os.path.basename(os.path.dirname(os.path.dirname(path))))
    return best and best[1:]


def mean_se(values):
    values = np.asarray(values)
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0


def plot(drops, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, mode in zip(axes, MODES):
        for h, (head_name, methods) in enumerate(drops.items()):
            for m, (method, by_mode) in enumerate(methods.items()):
                means, ses = zip(*(mean_se(by_mode[mode][k]) for k in KS))
                ax.errorbar(KS, means, yerr=ses, marker='os'[h], linestyle='-:'[h], color=f'C{m}' if h == 0 else
                            f'C{m + 4}', capsize=3, label=f"{head_name}: {method}")
        ax.set(title=MODES[mode].split(' (')[0], xlabel='k tokens', xticks=KS,
               ylabel="drop of the predicted class's probability")
        ax.axhline(0, color='grey', linewidth=0.5)
    axes[1].legend(fontsize=7)
    fig.suptitle('Faithfulness on SST-2 test (frozen all-MiniLM-L6-v2); bars: one standard error')
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(drops):
    """Sentences saying, per head, test and k, which method is best, and whether its lead over the runner-up is
    larger than two standard errors of their paired difference (the same sentences)."""
    lines = []
    for head_name, methods in drops.items():
        for mode in MODES:
            sign = 1 if mode == 'delete' else -1
            for k in KS:
                ranked = sorted(methods, key=lambda m: -sign * np.mean(methods[m][mode][k]))
                first, second = ranked[:2]
                diff = sign * (np.asarray(methods[first][mode][k]) - np.asarray(methods[second][mode][k]))
                mean, se = mean_se(diff)
                clear = 'clearly (by more than 2 standard errors)' if mean > 2 * se else 'not clearly (within 2 ' \
                                                                                          'standard errors)'
                lines.append(f"{head_name}, {mode.replace('delete', 'deletion').replace('insert', 'insertion')}, "
                             f"k = {k}: best {first}, ahead of {second} {clear}")
    return lines


def the(head_name):
    return f"the {head_name}" if head_name == 'routing head' else head_name


def paired(a, b, sign):
    """'better' | 'worse' | 'tied': a against b on the same sentences, beyond two standard errors of the paired
    difference (sign: +1 when higher drops are more faithful, -1 when lower are)."""
    mean, se = mean_se(sign * (np.asarray(a) - np.asarray(b)))
    return 'better' if mean > 2 * se else 'worse' if mean < -2 * se else 'tied'


def summary(drops, seconds):
    """The paragraph: per head, its own credit (the first method: routing credit, attention weights) against every
    other method over the 2 tests x 3 values of k, and the costs."""
    sentences = []
    for head_name, methods in drops.items():
        own, others = list(methods)[0], list(methods)[1:]
        parts = []
        for other in others:
            counts = {'better': 0, 'worse': 0, 'tied': 0}
            for mode in MODES:
                for k in KS:
                    counts[paired(methods[own][mode][k], methods[other][mode][k], 1 if mode == 'delete' else -1)] += 1
            parts.append(f"more faithful than {other} in {counts['better']}, less faithful in {counts['worse']} and "
                         f"not clearly different in {counts['tied']}")
        n_cells = len(MODES) * len(KS)
        sentences.append(f"On {the(head_name)}, {own} is, of the {n_cells} cells (deletion and insertion, k = "
                         f"{', '.join(map(str, KS))}; a difference counts beyond two standard errors of the paired "
                         f"difference), " + '; '.join(parts) + '.')
        worse = [other for other in others if other != 'random' and sum(
            paired(methods[own][mode][k], methods[other][mode][k], 1 if mode == 'delete' else -1) == 'worse'
            for mode in MODES for k in KS) > n_cells / 2]
        if worse:
            sentences.append(f"So {own} LOSES to {' and '.join(worse)} on this test: "
                             f"{'they pick' if len(worse) > 1 else 'it picks'} the tokens that move this head's "
                             f"prediction more often than {own} does.")
        costs = ', '.join(f"{m} {1000 * t:.0f} ms" for m, t in seconds[head_name].items())
        sentences.append(f"Cost per sentence on {the(head_name)}: {costs}.")
    return ' '.join(sentences)


def render(result, report):
    """The markdown report and the figure from the saved result (main's JSON)."""
    plot(decoded_drops(result), os.path.splitext(report)[0] + '.png')
    write_report([render_text(result, os.path.basename(os.path.splitext(report)[0]))], report)
    return decoded_drops(result)


def render_page(result_path):
    """The report's text from its record (main's JSON); nothing is measured, no figure drawn."""
    with open(result_path) as f:
        return render_text(json.load(f), os.path.basename(os.path.splitext(result_path)[0])) + '\n'


def decoded_drops(result):
    return {h: {m: {mode: {int(k): v for k, v in by_k.items()} for mode, by_k in by_mode.items()}
                for m, by_mode in methods.items()} for h, methods in result['drops'].items()}


def seconds_per_sentence(result):
    """{head: {method: seconds per sentence}} of a saved result."""
    n = result['meta']['n_sentences']
    return {h: {m: t / n for m, t in methods.items()} for h, methods in result['seconds'].items()}


def findings(result):
    """The paragraph of what the numbers support (summary), from a saved result."""
    return summary(decoded_drops(result), seconds_per_sentence(result))


def render_text(result, name):
    """The markdown report from the saved result; name: the report's (and figure's, record's) base name."""
    drops = decoded_drops(result)
    meta, n = result['meta'], result['meta']['n_sentences']
    per_sentence = seconds_per_sentence(result)
    counts = ', '.join(f"k = {k}: {len(next(iter(drops.values()))['random']['delete'][k])}" for k in KS)
    subset = '' if n == meta['n_test'] else f", drawn at random with seed {meta['seed']}"
    lines = [f"Faithfulness of credit on SST-2 test ({n} of {meta['n_test']} sentences{subset}): mean drop of the "
             f"predicted class's probability (± one standard error) after deleting the k highest-ranked tokens "
             f"(higher = more faithful) or keeping only them (lower = more faithful), re-encoded by the live minilm. "
             f"Sentences with more than k tokens: {counts}.", '',
             '| head | method | ' + ' | '.join(f'deletion k={k}' for k in KS) + ' | '
             + ' | '.join(f'insertion k={k}' for k in KS) + ' | ms / sentence |',
             '|---|---|' + '---|' * (2 * len(KS) + 1)]
    for head_name, methods in drops.items():
        for method, by_mode in methods.items():
            cells = ['%.3f ± %.3f' % mean_se(by_mode[mode][k]) for mode in MODES for k in KS]
            cost = 1000 * per_sentence[head_name].get(method, 0.0)
            lines.append(f"| {head_name} | {method} | {' | '.join(cells)} | {cost:.1f} |")
    lines += ['', f"**What the numbers support.** {findings(result)}", '',
              f"Encoding a sentence (minilm, all depths; common to every method, not in the costs above): "
              f"{1000 * meta['encode_seconds'] / n:.1f} ms. Integrated Gradients: {meta['ig_steps']} steps from "
              f"all-zero hidden states, of the predicted class's probability; gradient x input of the same; "
              f"{meta['minutes']:.0f} min in all. " + how_measured(meta['how']), '']
    for head_name, gaps in result['ig_gaps'].items():
        gaps = np.asarray(gaps)                                                  # [n, 2]
        lines += [f"Integrated Gradients on {the(head_name)}, completeness after {meta['ig_steps']} steps: the token "
                  f"attributions' sum misses p(x) - p(0) by {gaps[:, 0].mean():.3f} on average (median "
                  f"{np.median(gaps[:, 0]):.3f}), against a mean |p(x) - p(0)| of {gaps[:, 1].mean():.3f}.", '']
    routing_head = meta.get('routing_head', PRETRAINED['sst2'])             # records before it was named: the default
    lines += [f"The routing head: `{routing_head}`. " + meta['head_b'], '', f"![faithfulness]({name}.png)", '',
              'Per head, test and k, the best method (the paired difference with the runner-up is over the same '
              'sentences):', '']
    lines += [f"- {line}" for line in verdict(drops)]
    lines += ['', f"The per-sentence drops are in [{name}.json]({name}.json)."]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data', help='folder holding sst/{train,dev,test}.txt')
    p.add_argument('--routing_head', default=PRETRAINED['sst2'])
    p.add_argument('--runs', default='runs/frozen-heads', help="benchmarks.frozen_heads' runs (head (b)'s SST-2 runs)")
    p.add_argument('--attention_head', default=None, help='an SST-2 ScalarMixAttentionHead folder (default: from --runs)')
    p.add_argument('--n_sentences', type=int, default=None, help='random subset of the test set (default: all)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--ig_steps', type=int, default=50)
    p.add_argument('--batch_sz', type=int, default=64)
    p.add_argument('--report', default='docs/faithfulness.md', help='also <report>.png and <report>.json (the result)')
    p.add_argument('--render_only', action='store_true', help="rewrite the report from <report>.json, measuring nothing")
    args = p.parse_args(argv)
    result_path = os.path.splitext(args.report)[0] + '.json'
    if args.render_only:
        with open(result_path) as f:
            return render(json.load(f), args.report)
    command = shown_command('benchmarks.faithfulness', sys.argv[1:] if argv is None else argv)
    routing = models.RoutingHead.from_pretrained(args.routing_head).eval()
    ig = {h: integrated_gradients(args.ig_steps, internal_batch_size=args.batch_sz) for h in ('routing head', 'head (b)')}
    heads = {'routing head': (routing, {'routing credit': routing_credit, 'integrated gradients': ig['routing head'],
                                        'gradient x input': gradient_x_input})}
    found = (args.attention_head, 'given') if args.attention_head else best_attention_head(args.runs)
    if found:
        attention, _ = checkpoints.from_pretrained(found[0])
        if not isinstance(attention, standard_heads.ScalarMixAttentionHead):
            raise ValueError(f"--attention_head {found[0]!r} holds a {type(attention).__name__}, not a "
                             f"ScalarMixAttentionHead")
        heads['head (b)'] = (attention.eval(), {'attention weights': attention_weights,
                                                'integrated gradients': ig['head (b)'],
                                                'gradient x input': gradient_x_input})
        why = 'given by --attention_head' if found[1] == 'given' else \
            f'the best dev accuracy of the finished SST-2 runs, {found[1]}'
        shown = shown_path(found[0], os.path.join(PLACEHOLDERS['--runs'], os.path.relpath(found[0], args.runs)))
        head_b = f"Head (b), standard_heads.ScalarMixAttentionHead: {shown} ({why})."
    else:
        head_b = (f"Head (b) (standard_heads.ScalarMixAttentionHead) is not in this report: no finished SST-2 run of it under "
                  f"{shown_path(args.runs, PLACEHOLDERS['--runs'])} (and no --attention_head) when this ran.")
    test = data.get_dataset_splits('sst2', data_root=args.data_root)['test']
    order = np.random.default_rng(args.seed).permutation(len(test))[:args.n_sentences]
    order = sorted(order.tolist(), key=lambda i: len(test.texts[i]))          # similar lengths batched together
    how = measurement_meta(command, 'float32')
    started = time.time()
    drops, seconds, shared = removal_test(heads, args.data_root, KS, args.seed, modes=tuple(MODES),
                                          batch_sz=args.batch_sz, sentences=order)
    result = {'drops': drops, 'seconds': seconds, 'ig_gaps': {h: ig[h].gaps for h in heads},
              'meta': {'n_sentences': shared['n_sentences'], 'n_test': len(test), 'seed': args.seed,
                       'ig_steps': args.ig_steps, 'encode_seconds': shared['encode'],
                       'minutes': (time.time() - started) / 60, 'head_b': head_b, 'how': finish_meta(how),
                       'routing_head': shown_path(args.routing_head, PLACEHOLDERS['--routing_head'])}}
    os.makedirs(os.path.dirname(result_path) or '.', exist_ok=True)
    with open(result_path, 'w') as f:
        json.dump(result, f)
    render(json.loads(json.dumps(result)), args.report)
    return drops, seconds, shared


if __name__ == '__main__':
    main()
