#!/usr/bin/env bash
# The learning proof of docs/benchmarks.md: the digits-edit preset against its shuffled-reward control, seeds 0-2,
# one run at a time on one thread (on a shared machine, more threads spin more than they compute), then the summary
# table.
# Results: results/{nft,control}_seed<S>.json and .log, results/summary.json.
#   benchmarks/digits_edit/runs.sh            # MAX_STEPS=400 EVAL_EVERY=80 SEEDS="0 1 2" by default
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--max_steps "${MAX_STEPS:-400}" --eval_every "${EVAL_EVERY:-80}")
mkdir -p results
for seed in ${SEEDS:-0 1 2}; do
  python run.py --name "nft_seed$seed" --seed "$seed" "${COMMON[@]}" > "results/nft_seed$seed.log" 2>&1
  python run.py --name "control_seed$seed" --seed "$seed" --shuffle_rewards "${COMMON[@]}" \
    > "results/control_seed$seed.log" 2>&1
done
python summary.py
