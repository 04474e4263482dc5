#!/usr/bin/env bash
# Trains the routing heads of "An Algorithm for Routing Vectors in Sequences" (Heinsen, 2022): the runs of a profile
# of heinsen_replication/recipes.py (where every profile is defined, once), each as `$LAUNCH train.py ...`.
#
#   bash train_all_heads.sh                 # paper: the paper's six runs with its settings on one 24 GB GPU
#   bash train_all_heads.sh offline         # SST-5 then SST-2 on minilm (all-MiniLM-L6-v2), on a CPU
#   bash train_all_heads.sh paper-minilm    # the paper's SST-5 -> SST-2 settings on minilm (long on a CPU)
#   bash train_all_heads.sh capsules2019    # the 2019 paper's capsule networks (smallNORB on a GPU; SST on minilm)
#   bash train_all_heads.sh frozen-heads    # standard heads on minilm's features, paper-minilm recipe (HEADS=a,b picks)
#
# Environment: DATA_ROOT (datasets, default .data), OUT (runs, default runs), SEED (default 0), FEATURE_CACHE (the
# paper profile's opt-in SST feature cache, about 90 GB; the minilm profiles cache in $DATA_ROOT/features),
# LAUNCH (default python; "accelerate launch" for several GPUs; echo prints the runs instead).
# Every run writes $OUT/<profile>/seed<k>/<dataset>/{checkpoint.pt,metrics.jsonl,steps.jsonl,train.log,model/,epoch<k>/};
# rerunning resumes. The job says first what it will run and what it should cost, and last where the heads are.
set -euo pipefail
cd "$(dirname "$0")"
PROFILE="${1:-paper}"
LAUNCH="${LAUNCH:-python}"
OPTIONS=("$PROFILE" --data_root "${DATA_ROOT:-.data}" --out "${OUT:-runs}" --seed "${SEED:-0}"
         --feature_cache "${FEATURE_CACHE:-}" --heads "${HEADS:-}")
RUNS="$(python -m heinsen_replication.recipes "${OPTIONS[@]}")"
python -m heinsen_replication.reporting start "${OPTIONS[@]}"     # what the job will do, its estimated cost (stderr)
while IFS= read -r run; do
  eval "$LAUNCH train.py $run" </dev/null     # $run is shell-quoted by heinsen_replication.recipes
done <<< "$RUNS"
python -m heinsen_replication.reporting end "${OPTIONS[@]}"       # where the heads are, their figures, how to use them
