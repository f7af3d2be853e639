"""Plots of `benchmarks/digits/results/*.json` (written by `run.py`): accuracy against training wall-clock and
against steps, one line per run, reward classifier solid and held-out judge dashed.

    pip install -e ".[bench]"   # matplotlib
    python benchmarks/digits/plot.py --runs default control --output docs/images/digits_learning.png

`--max_step` cuts longer runs to the steps of shorter ones; `--train_reward` adds each run's mean training reward
between evaluations (dotted) and marks the steps at which the reward-hacking guard warned (vertical lines).
"""

import argparse
import json
import os

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="result names (results/<name>.json)")
    parser.add_argument("--labels", nargs="*", help="legend labels, one per run (default: the names)")
    parser.add_argument("--title", default="digits-sd3")
    parser.add_argument("--output", required=True)
    parser.add_argument("--results_dir", default=RESULTS)
    parser.add_argument("--max_step", type=int, default=None, help="plot evaluations up to this step")
    parser.add_argument("--train_reward", action="store_true", help="add the training reward and the guard's warnings")
    args = parser.parse_args()

    labels = args.labels or args.runs
    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, label, color in zip(args.runs, labels, plt.cm.tab10.colors, strict=False):
        with open(os.path.join(args.results_dir, f"{name}.json")) as file:
            result = json.load(file)
        points = [p for p in result["points"] if args.max_step is None or p["step"] <= args.max_step]
        for axis, x in ((by_time, "train_seconds"), (by_step, "step")):
            xs = [p[x] / (60 if x == "train_seconds" else 1) for p in points]
            axis.plot(xs, [p["classifier_accuracy"] for p in points], "-o", ms=3, color=color, label=f"{label}")
            axis.plot(xs, [p["judge_accuracy"] for p in points], "--", color=color, alpha=0.8)
            if args.train_reward:
                trained = [(x_value, p) for x_value, p in zip(xs, points, strict=True) if "train_reward" in p]
                axis.plot(
                    [x_value for x_value, _ in trained], [p["train_reward"] for _, p in trained], ":", color=color
                )
        if args.train_reward:
            for step in result.get("guard_triggered_steps", []):
                by_step.axvline(step, color=color, lw=0.8, alpha=0.6)
    by_time.set_xlabel("training wall-clock (minutes, evaluation excluded)")
    by_step.set_xlabel("optimizer steps")
    by_time.set_ylabel("CFG-free accuracy")
    for axis in (by_time, by_step):
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    by_step.legend(loc="lower right", fontsize=8)
    extra = ", dotted: training reward, vertical lines: guard warnings" if args.train_reward else ""
    figure.suptitle(f"{args.title}\nsolid: reward classifier accuracy, dashed: held-out judge accuracy{extra}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    figure.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
