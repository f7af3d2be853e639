#!/usr/bin/env bash
# The ablations of docs/benchmarks.md: each a 320-step run (40 rollouts) of run.py from the preset's settings with
# one setting changed (the preset itself and its shuffled-reward control are run.py's `default` and `control` runs,
# whose first 320 steps are the same runs). On 2 cores run two at a time, one thread each (the default JOBS=2):
# about 8 minutes per pair. Results: results/ablations/<name>.json and .log.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
JOBS=${JOBS:-2}
RUNS=(
  "no_negative --set negative_loss=false"
  "beta0.1 --set beta=0.1"
  "on_policy --set old_policy_decay_schedule=on_policy"
  "constant0.9 --set old_policy_decay_schedule=constant old_policy_decay_max=0.9"
  "dpm2 --set sampler=DPMSolverMultistepScheduler"
  "sde --set sampler=DPMSolverMultistepScheduler sampler_kwargs={\"algorithm_type\":\"sde-dpmsolver++\"}"
  "x0_adaptive --set loss_type=x0_adaptive"
  "full_ft --set use_peft=false"
)
for spec in "${RUNS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  read -r -a words <<< "$spec"
  python run.py --name "${words[0]}" --max_steps 320 --eval_every 80 --results_dir results/ablations "${words[@]:1}" \
    > "results/ablations/${words[0]}.log" 2>&1 &
done
wait
