#!/usr/bin/env bash
# Trains the routing heads of "An Algorithm for Routing Vectors in Sequences" (Heinsen, 2022).
#
#   bash train_all_heads.sh            # the paper's six runs with its settings: one GPU (24 GB), datasets under
#                                      # $DATA_ROOT, roberta-large / beit-large at the paper's pinned hub revisions
#   LAUNCH=echo bash train_all_heads.sh   # print the runs instead of running them
#   bash train_all_heads.sh offline    # offline profile: minilm (all-MiniLM-L6-v2), SST-5 then SST-2 from it,
#                                      # on a 2-core CPU (see README for the measured time and resources)
#   bash train_all_heads.sh paper-minilm   # the paper's SST-5 -> SST-2 settings on minilm (SEED=k; long on a CPU)
#   bash train_all_heads.sh capsules2019   # the 2019 paper's capsule networks (train.py --model capsules2019):
#                                      # smallNORB end to end (GPU), SST-5 and SST-2 on minilm (CPU is fine)
#
# Every run writes runs/<name>/{checkpoint.pt,metrics.jsonl,model/,epoch<k>/}; rerunning resumes.
# Multi-GPU: LAUNCH="accelerate launch" bash train_all_heads.sh
set -euo pipefail
cd "$(dirname "$0")"
DATA_ROOT="${DATA_ROOT:-.data}"
OUT="${OUT:-runs}"
LAUNCH="${LAUNCH:-python}"
run() { $LAUNCH train.py --data_root "$DATA_ROOT" --run_test --resume "$@"; }

case "${1:-paper}" in
  offline)
    # the settings of benchmarks/sst_results.py (seed 0): one epoch of at most 2000 steps of 32 phrases each.
    # --download: the SST is fetched (and verified) into $DATA_ROOT/sst if it is not there yet
    CACHE="$DATA_ROOT/features"
    run --download --dataset_name sst5 --backbone minilm --feature_cache "$CACHE" --n_epochs 1 --n_iters_per_train_epoch 2000 \
        --batch_sz 32 --output_dir "$OUT/offline/sst5" --device cpu
    run --dataset_name sst2 --backbone minilm --feature_cache "$CACHE" --n_epochs 1 --n_iters_per_train_epoch 2000 \
        --batch_sz 32 --pretrained_path "$OUT/offline/sst5/model" --output_dir "$OUT/offline/sst2" --device cpu
    ;;
  paper-minilm)
    # The paper's SST-5 -> SST-2 settings (as in the paper profile below) on the offline backbone, with the feature
    # cache; SEED=k for another seed. Long on a 2-core CPU: it resumes where it stopped when run again. Float32 matrix
    # products use the CPU's bfloat16 units where it has them (--matmul_precision medium; see README, Performance).
    # Two seeds side by side: OMP_NUM_THREADS=1 SEED=0 bash train_all_heads.sh paper-minilm & (and SEED=1).
    SEED="${SEED:-0}"
    DIR="$OUT/paper-minilm/seed$SEED"
    MINILM=(--backbone minilm --feature_cache "$DATA_ROOT/features" --rng_seed "$SEED" --batch_sz 50
            --matmul_precision medium)
    run --download --dataset_name sst5 "${MINILM[@]}" --n_epochs 10 --n_iters_per_train_epoch 2000 --output_dir "$DIR/sst5"
    run --dataset_name sst2 "${MINILM[@]}" --n_epochs 3 --n_iters_per_train_epoch 2000 \
        --pretrained_path "$DIR/sst5/model" --output_dir "$DIR/sst2"
    ;;
  paper)
    # The 2022 paper's six runs with its settings (../shared/spec/paper2022.md in CI; README "The paper's runs"):
    # pinned backbone revisions, batch 50 (IMDB 5), epochs of n iterations from a stream cycling over the training
    # split, RAdam + one cycle (max lr 1e-3, 30% warm-up), mixup with the next sample in the batch.
    # FEATURE_CACHE=DIR caches roberta-large's hidden states of every SST text (about 90 GB of disk).
    TEXT=(--backbone roberta-large --revision 5069d8a)
    IMAGES=(--backbone microsoft/beit-large-patch16-224 --revision 0bd443c --num_workers 8)
    SST_CACHE=(); [ -n "${FEATURE_CACHE:-}" ] && SST_CACHE=(--feature_cache "$FEATURE_CACHE")
    run --dataset_name imdb "${TEXT[@]}" --batch_sz 5 --n_epochs 10 --n_iters_per_train_epoch 10000 \
        --output_dir "$OUT/imdb"
    run --dataset_name sst5 "${TEXT[@]}" "${SST_CACHE[@]}" --batch_sz 50 --n_epochs 10 --n_iters_per_train_epoch 2000 \
        --output_dir "$OUT/sst5"
    # SST-2 from the SST-5 head after its last (10th) epoch; only the last routing trains
    run --dataset_name sst2 "${TEXT[@]}" "${SST_CACHE[@]}" --batch_sz 50 --n_epochs 3 --n_iters_per_train_epoch 2000 \
        --pretrained_path "$OUT/sst5/model" --output_dir "$OUT/sst2"
    run --dataset_name imagenet-1k "${IMAGES[@]}" --batch_sz 50 --n_epochs 10 --output_dir "$OUT/imagenet-1k"
    run --dataset_name cifar10 "${IMAGES[@]}" --batch_sz 50 --n_epochs 10 --n_iters_per_train_epoch 2000 \
        --output_dir "$OUT/cifar10"
    run --dataset_name cifar100 "${IMAGES[@]}" --batch_sz 50 --n_epochs 10 --n_iters_per_train_epoch 2000 \
        --output_dir "$OUT/cifar100"
    ;;
  capsules2019)
    # "An Algorithm for Routing Capsules in All Domains" (2019), its regime: batch 20, lr 5e-4 one cycle,
    # mixup Beta(0.2, 0.2). smallNORB: 50 epochs, random crops of the edge-padded training images.
    # SST: 3 epochs over all subtrees, each dataset from scratch, on minilm (the paper used GPT-2-large).
    run --model capsules2019 --dataset_name smallnorb --n_epochs 50 --output_dir "$OUT/smallnorb_capsules2019" \
        --num_workers 4
    for dataset in sst5 sst2; do
      run --model capsules2019 --dataset_name "$dataset" --backbone minilm --feature_cache "$DATA_ROOT/features" \
          --n_epochs 3 --output_dir "$OUT/${dataset}_capsules2019"
    done
    ;;
  *)
    echo "usage: bash train_all_heads.sh [paper|offline|paper-minilm|capsules2019]" >&2
    exit 2
    ;;
esac
