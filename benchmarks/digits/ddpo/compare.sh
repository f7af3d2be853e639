#!/usr/bin/env bash
# DDPO (TRL 0.23.1's real DDPOTrainer, in its own venv) against our DiffusionNFTTrainer on digits-sd, side by side on
# the same machine at the same time, one CPU thread each (on 2 cores, each has a core: both see the same machine
# load); then both curves in docs/images/digits_ddpo.png and the time each took to reach DDPO's best accuracy
# (benchmarks/digits/results/ddpo/summary.json).
# Run it with the main virtual environment active (`python` is ours; DDPO's is benchmarks/digits/ddpo/.venv):
#   bash benchmarks/digits/ddpo/compare.sh                  # ~15 min of DDPO training, 7.5 min of ours
#   DDPO_SECONDS=120 NFT_SECONDS=120 bash benchmarks/digits/ddpo/compare.sh   # a quick look
#   SEED=1 bash benchmarks/digits/ddpo/compare.sh     # another training seed: results named ddpo_seed1, nft_seed1, ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
HERE=benchmarks/digits/ddpo
RESULTS=benchmarks/digits/results/ddpo
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SEED=${SEED:-0}
SUFFIX=$([ "$SEED" = 0 ] && echo "" || echo "_seed$SEED")  # seed 0 keeps the plain names the docs show
PLOT=$([ "$SEED" = 0 ] && echo docs/images/digits_ddpo.png || echo "$RESULTS/digits_ddpo$SUFFIX.png")
mkdir -p "$RESULTS"
bash "$HERE/setup_venv.sh"

# DDPO: full fine-tuning (on this 0.36 M-parameter UNet, its default LoRA (rank 4) did not move in 11 epochs),
# DDPO's learning rate 3e-4; the rest in run_ddpo.py.
"$HERE/.venv/bin/python" "$HERE/run_ddpo.py" --max_seconds "${DDPO_SECONDS:-900}" --eval_every 5 --use_lora 0 \
  --seed "$SEED" --output "$RESULTS/ddpo$SUFFIX.json" > "$RESULTS/ddpo$SUFFIX.log" 2>&1 &
ddpo=$!

# Ours: the settings pinned in run_nft_sd.py (full fine-tuning, lr 3e-4, DDIM rollouts, CFG-free).
python "$HERE/run_nft_sd.py" --name "nft$SUFFIX" --seed "$SEED" --max_seconds "${NFT_SECONDS:-450}" --eval_every 16 \
  > "$RESULTS/nft$SUFFIX.log" 2>&1 &
nft=$!
wait "$ddpo"  # set -e: stop here if either run failed
wait "$nft"
grep -h "^EVAL" "$RESULTS/ddpo$SUFFIX.log" "$RESULTS/nft$SUFFIX.log" | tail -n 4

python "$HERE/plot_ddpo.py" --ddpo "ddpo$SUFFIX" --ours "nft$SUFFIX" --output "$PLOT" --summary "summary$SUFFIX.json"
