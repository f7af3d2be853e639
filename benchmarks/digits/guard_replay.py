"""The reward-hacking guard replayed on recorded runs: at which steps `RewardHackingGuardCallback` (the trainer's own)
acts with a given threshold, fed each evaluation's judge accuracy and the mean training reward logged before it (the
values it saw during the run; `run.py` records both since the guard runs of docs/benchmarks.md).

    python benchmarks/digits/guard_replay.py --runs default guard/hack_beta0.1 guard/gamed_clean --thresholds 0 0.05
"""

import argparse
import json
import logging
import os

from transformers import TrainerControl, TrainerState

from trl_nft.callbacks import RewardHackingGuardCallback


RESULTS = os.path.join(os.path.dirname(__file__), "results")
METRIC = "eval_rewards/digit_judge/mean"


def replay(points: list[dict], threshold: float, patience: int = 2) -> list[int]:
    """Steps at which the guard would have warned."""
    guard = RewardHackingGuardCallback(METRIC, patience=patience, threshold=threshold)
    for point in points:
        state, control = TrainerState(global_step=point["step"]), TrainerControl()
        if "train_reward" in point:
            guard.on_log(None, state, control, logs={"reward": point["train_reward"]})
        guard.on_evaluate(None, state, control, metrics={METRIC: point["judge_accuracy"]})
    return guard.triggered_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="result names (results/<name>.json)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.05])
    parser.add_argument("--results_dir", default=RESULTS)
    args = parser.parse_args()
    logging.getLogger("trl_nft.callbacks").setLevel(logging.ERROR)  # the steps are printed below instead
    for name in args.runs:
        with open(os.path.join(args.results_dir, f"{name}.json")) as file:
            points = json.load(file)["points"]
        steps = {threshold: replay(points, threshold) for threshold in args.thresholds}
        print(name, " ".join(f"threshold {threshold:g}: {steps[threshold] or 'silent'}" for threshold in steps))


if __name__ == "__main__":
    main()
