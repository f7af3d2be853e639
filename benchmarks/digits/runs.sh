#!/usr/bin/env bash
# Groups of run.py runs from docs/benchmarks.md, each from the preset's settings with one setting (or one extra reward
# term) changed; two at a time, one thread each (the default JOBS=2). Results: results/<group>/<name>.json and .log.
#   benchmarks/digits/runs.sh ablations   # 320 steps each, evaluated every 80: about 8 minutes per pair on 2 cores
#   benchmarks/digits/runs.sh guard       # evaluated every 40, for the reward-hacking guard: about 35 minutes in all;
#                                         # then `python guard_replay.py --runs guard/<name> ...`
#   benchmarks/digits/runs.sh norm        # the velocity-norm penalty on digits-sd3 (honest and gamed reward, with and
#                                         # without it; kl_coef 1e-4 so that the ratio is to the base): about 15 minutes
#   benchmarks/digits/runs.sh turbo       # NFT on the step-distilled digits-sd3-turbo: its preset (the distilled
#                                         # recipe), parts of it, digits-sd3's settings; 3-5 minutes a run
# (The preset itself and its shuffled-reward control are run.py's `default` and `control` runs, whose first 320
# steps are the ablations' reference.)
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
JOBS=${JOBS:-2}
GROUP=${1:?"name a group: ablations or guard"}
case "$GROUP" in
  ablations)
    COMMON=(--max_steps 320 --eval_every 80)
    RUNS=(
      "no_negative --set negative_loss=false"
      "beta0.1 --set nft_beta=0.1"
      "on_policy --set old_policy_decay_schedule=on_policy"
      "constant0.9 --set old_policy_decay_schedule=constant old_policy_decay_max=0.9"
      "dpm2 --set sampler=DPMSolverMultistepScheduler"
      "sde --set sampler=DPMSolverMultistepScheduler sampler_kwargs={\"algorithm_type\":\"sde-dpmsolver++\"}"
      "x0_adaptive --set loss_type=x0_adaptive"
      "full_ft --set use_peft=false"
    )
    ;;
  guard)
    COMMON=(--eval_every 40)
    RUNS=(
      "gamed_clean --max_steps 320 --add_reward jpeg_compressibility:100"
      "hack_beta0.1 --max_steps 800 --set nft_beta=0.1"
      "gamed_jpeg --max_steps 320 --add_reward jpeg_incompressibility:100"
      "hack_lr3e-3 --max_steps 640 --set learning_rate=3e-3"
    )
    ;;
  norm)
    # kl_coef 1e-4 (the library default) so that the norm ratio is taken against the base model
    COMMON=()
    RUNS=(
      "honest --max_steps 240 --eval_every 80 --set kl_coef=1e-4"
      "honest_penalty --max_steps 240 --eval_every 80 --set kl_coef=1e-4 velocity_norm_penalty=10"
      "gamed --max_steps 120 --eval_every 40 --add_reward jpeg_compressibility:100 --set kl_coef=1e-4"
      "gamed_penalty --max_steps 120 --eval_every 40 --add_reward jpeg_compressibility:100 --set kl_coef=1e-4 velocity_norm_penalty=10"
    )
    ;;
  turbo)
    # The preset is the distilled recipe (kl_coef 0.1, velocity_norm_penalty 10, train_timestep_fraction 1.0): the
    # other runs set what they change from it. `defaults` are digits-sd3's preset settings.
    COMMON=(--model digits-sd3-turbo --max_steps 640 --eval_every 80)
    RUNS=(
      "kl0.1_penalty"
      "kl0.1 --set velocity_norm_penalty=0"
      "kl1 --set kl_coef=1 velocity_norm_penalty=0"
      "defaults --set kl_coef=0 velocity_norm_penalty=0 train_timestep_fraction=0.4"
      "defaults_lr3e-3 --set kl_coef=0 velocity_norm_penalty=0 train_timestep_fraction=0.4 learning_rate=3e-3"
      "kl0.1_lr3e-3 --set velocity_norm_penalty=0 learning_rate=3e-3"
    )
    ;;
  *) echo "unknown group $GROUP: ablations, guard, norm or turbo" >&2; exit 2 ;;
esac
mkdir -p "results/$GROUP"
for spec in "${RUNS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  read -r -a words <<< "$spec"
  python run.py --name "${words[0]}" "${COMMON[@]}" --results_dir "results/$GROUP" "${words[@]:1}" \
    > "results/$GROUP/${words[0]}.log" 2>&1 &
done
wait
