#!/usr/bin/env bash
# The ablations of docs/benchmarks.md: each a 320-step run (40 rollouts) of run.py from the preset's settings with
# one setting changed. They ran 12 at a time, one thread each, on a 16-core machine; on 2 cores run two at a time
# (the default JOBS=2), about 10 minutes per pair. Results: results/ablations/<name>.json and .log.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
JOBS=${JOBS:-2}
RUNS=(
  "default"
  "control --shuffle_rewards"
  "beta0.1 --set beta=0.1"
  "aclip5 --set advantage_clip=5"
  "constant0.9 --set old_policy_decay_schedule=constant old_policy_decay_max=0.9"
  "dpm2 --set sampler=DPMSolverMultistepScheduler"
  "allt --set train_timestep_fraction=0.99"
  "lora --set use_peft=true lora_r=8 lora_alpha=16 learning_rate=3e-3"
  "no_negative --set negative_loss=false"
)
for spec in "${RUNS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  read -r -a words <<< "$spec"
  python run.py --name "${words[0]}" --max_steps 320 --eval_every 80 --results_dir results/ablations "${words[@]:1}" \
    > "results/ablations/${words[0]}.log" 2>&1 &
done
wait
