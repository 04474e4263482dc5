"""
The frozen backbone in bfloat16 autocast (train.py --mixed_precision bf16, FrozenBackbone.autocast_dtype) against
float32, on the real SST and the offline backbone 'minilm', as benchmarks/train_step.py measures
--matmul_precision for the head:

  features   the hidden states of every dev and test sentence, as the feature cache stores them (float16), under
             bfloat16 autocast against float32: relative error ||a - b|| / ||b|| over all tokens, per depth and in
             all, and the largest |a - b| / max|b|.
  accuracy   the committed heads (pretrained/sst5_minilm_routing_head, pretrained/sst2_minilm_routing_head, trained
             on float32 features) scoring the dev and test sentences from either precision's features: accuracy,
             and the number of sentences whose predicted class changes.
  speed      tokens encoded per CPU-second (one thread, so that other processes on the machine change it least) by
             TextBackbone.encode_rows (equal-length batches, no padding) in float32 and in bfloat16 autocast, and by
             the earlier path (batches of 128 texts padded to the longest, 64 per forward, per-text re-joining),
             on a sample of --speed_texts training phrases.

    python -m benchmarks.backbone_precision --data_root .data [--report benchmarks/backbone_precision.md]
"""
import argparse
import os
import random
import sys
import time

import torch

from heinsen_replication import backbones, data, models, recipes

HEADS = {'sst5': 'pretrained/sst5_minilm_routing_head', 'sst2': 'pretrained/sst2_minilm_routing_head'}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def features(backbone, texts, autocast_dtype):
    """-> rows [n_tokens, d_depth, d_emb] float16 (as the cache stores them), lengths."""
    backbone.autocast_dtype = autocast_dtype
    return backbone.encode_rows(texts, dtype=torch.float16)


def padded_path_seconds(backbone, texts):
    """CPU seconds of the earlier encoder: batches of 128 texts padded to the longest, 64 chunks per forward, each
    text's states picked out of the padded batch one by one."""
    start = time.process_time()
    for s in range(0, len(texts), 128):
        tokens = backbone.tokenizer(texts[s:s + 128], max_length=backbone.max_length, truncation=True, padding=True,
                                    return_overflowing_tokens=True, return_tensors='pt')
        sample_of_chunk, chunk_mask = tokens['overflow_to_sample_mapping'], tokens['attention_mask'].bool()
        states = []
        for c in range(0, len(sample_of_chunk), 64):
            inputs = {k: tokens[k][c:c + 64] for k in ('input_ids', 'attention_mask', 'token_type_ids') if k in tokens}
            out = backbone.model(**inputs, output_hidden_states=True)
            states.append(torch.stack(out.hidden_states, dim=-2).float())
        states = torch.cat(states)
        per_text = [states[sample_of_chunk == b][chunk_mask[sample_of_chunk == b]] for b in range(len(texts[s:s + 128]))]
        data.pad_positions(per_text)[0].to(torch.float16)
    return time.process_time() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='.data')
    p.add_argument('--speed_texts', type=int, default=2000)
    p.add_argument('--report', default=None, help="add the tables as a section of this benchmark log's record "
                                                   "(benchmarks/backbone_precision.md)")
    p.add_argument('--label', default='Measurement', help='heading of the added section')
    args = p.parse_args(argv)
    from benchmarks.common import finish_meta, measurement_meta, shown_command
    meta = measurement_meta(shown_command('benchmarks.backbone_precision', argv if argv is not None else sys.argv[1:]),
                            'bfloat16 autocast against float32', threads=1)
    torch.set_num_threads(1)
    backbone = backbones.load_backbone('minilm')
    lines = [f"`python -m benchmarks.backbone_precision` on {os.cpu_count()} CPU cores (one thread used), torch "
             f"{torch.__version__}, load average at the start {os.getloadavg()[0]:.2f}.", '']
    # features and accuracy
    lines += ['| dataset | split | sentences | tokens | feature rel. error (all depths) | largest per depth | '
              'max abs error / max abs | accuracy float32 | accuracy bfloat16 | predictions changed |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for dataset, head_path in HEADS.items():
        head = models.RoutingHead.from_pretrained(os.path.join(REPO_ROOT, head_path)).eval()
        splits = data.get_dataset_splits(dataset, data_root=args.data_root)
        for split in ('valid', 'test'):
            texts, labels = splits[split].texts, torch.tensor(splits[split].labels)
            f32, lengths = features(backbone, texts, None)
            bf16, _ = features(backbone, texts, torch.bfloat16)
            a, b = bf16.double(), f32.double()
            rel = ((a - b).norm() / b.norm()).item()
            per_depth = ((a - b).norm(dim=(0, 2)) / b.norm(dim=(0, 2))).max().item()
            worst = ((a - b).abs().max() / b.abs().max()).item()
            predictions = []
            for rows in (f32, bf16):
                hidden, mask = data.pad_positions(list(rows.float().split(lengths)))
                with torch.no_grad():
                    predictions.append(torch.cat([head(hidden[s:s + 64], mask[s:s + 64]).argmax(-1)
                                                  for s in range(0, len(texts), 64)]))
            acc = [(pred == labels).double().mean().item() for pred in predictions]
            changed = int((predictions[0] != predictions[1]).sum())
            lines.append(f"| {dataset} | {split} | {len(texts)} | {sum(lengths)} | {rel:.1e} | {per_depth:.1e} | "
                         f"{worst:.1e} | {acc[0]:.4f} | {acc[1]:.4f} | {changed} |")
            print(lines[-1], flush=True)
    # speed
    sst5 = data.get_dataset_splits('sst5', data_root=args.data_root)['train']
    texts = random.Random(0).sample(sorted(set(sst5.texts)), args.speed_texts)
    n_tokens = sum(backbone.token_counts(texts))
    lines += ['', f"Encoding {len(texts)} random SST-5 training phrases ({n_tokens} tokens), one thread:", '',
              '| encoder | CPU s | tokens per CPU-second | speed-up over the padded float32 path |', '|---|---|---|---|']
    backbone.autocast_dtype = None
    padded = padded_path_seconds(backbone, texts)
    timings = [('padded batches, float32 (before)', padded)]
    for name, dtype in (('encode_rows, float32', None), ('encode_rows, bfloat16 autocast', torch.bfloat16)):
        start = time.process_time()
        features(backbone, texts, dtype)
        timings.append((name, time.process_time() - start))
    for name, seconds in timings:
        lines.append(f"| {name} | {seconds:.1f} | {n_tokens / seconds:,.0f} | {padded / seconds:.2f} |")
        print(lines[-1], flush=True)
    product = recipes.bfloat16_product_seconds()
    gflops = {dtype: 2 * 4096 * 384 * 1536 / seconds / 1e9 for dtype, seconds in product.items()}
    lines += ['', f"The `[4096, 384] x [384, 1536]` product that `recipes.cpu_bfloat16_is_faster` times, one thread: "
              f"float32 {gflops['float32']:.0f} GFLOP/s, bfloat16 {gflops['bfloat16']:.0f} GFLOP/s "
              f"({gflops['bfloat16'] / gflops['float32']:.2f}x); CPU flags with bfloat16 instructions: "
              f"{'yes' if recipes.cpu_has_bfloat16() else 'no'}."]
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.report:
        from benchmarks.reports import add_section
        add_section(os.path.relpath(os.path.abspath(args.report), REPO_ROOT), args.label, finish_meta(meta), text)


if __name__ == '__main__':
    main()
