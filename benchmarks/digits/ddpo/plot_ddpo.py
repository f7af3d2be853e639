"""DDPO (TRL 0.23.1) against our trainer on `digits-sd`: both curves (reward-classifier accuracy against training
wall-clock, evaluation excluded) in one figure, and the time each took to reach DDPO's best accuracy.

    python benchmarks/digits/ddpo/plot_ddpo.py --ddpo ddpo --ours nft --output docs/images/digits_ddpo.png

Left panel: evaluated at CFG 5 (DDPO's sampling CFG), right: CFG-free; solid reward classifier, dashed held-out judge.
The summary (DDPO's best, when each run first reached it, the ratio) is printed and written to
`results/ddpo/summary.json` (`--summary`), for each evaluation CFG and for each trainer at its own sampling CFG (DDPO at 5, ours
CFG-free).
"""

import argparse
import json
import os

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


RESULTS = os.path.join(os.path.dirname(__file__), "..", "results", "ddpo")


def load(name: str, results_dir: str) -> dict:
    with open(os.path.join(results_dir, f"{name}.json")) as file:
        return json.load(file)


def first_reaching(points: list[dict], key: str, target: float) -> float | None:
    """Training seconds of the first evaluation at or above `target`, or None."""
    return next((p["train_seconds"] for p in points if p[key] >= target - 1e-9), None)


def compare(ddpo: list[dict], ours: list[dict], ddpo_key: str, ours_key: str) -> dict:
    best = max(ddpo, key=lambda p: (p[ddpo_key], -p["train_seconds"]))
    ours_seconds = first_reaching(ours, ours_key, best[ddpo_key])
    return {
        "ddpo_metric": ddpo_key,
        "ours_metric": ours_key,
        "ddpo_best": best[ddpo_key],
        "ddpo_best_seconds": best["train_seconds"],
        "ddpo_base": ddpo[0][ddpo_key],
        "ours_base": ours[0][ours_key],
        "ours_best": max(p[ours_key] for p in ours),
        "ours_seconds_to_ddpo_best": ours_seconds,
        "speedup": None if not ours_seconds else round(best["train_seconds"] / ours_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ddpo", default="ddpo")
    parser.add_argument("--ours", default="nft")
    parser.add_argument("--output", default="docs/images/digits_ddpo.png")
    parser.add_argument("--results_dir", default=RESULTS)
    parser.add_argument("--summary", default="summary.json", help="file name of the summary, in --results_dir")
    args = parser.parse_args()

    ddpo, ours = (load(name, args.results_dir)["points"] for name in (args.ddpo, args.ours))
    summary = {
        "at_cfg5": compare(ddpo, ours, "classifier_accuracy_cfg5", "classifier_accuracy_cfg5"),
        "cfg_free": compare(ddpo, ours, "classifier_accuracy", "classifier_accuracy"),
        "own_sampling_cfg": compare(ddpo, ours, "classifier_accuracy_cfg5", "classifier_accuracy"),
    }
    print(json.dumps(summary, indent=1))
    with open(os.path.join(args.results_dir, args.summary), "w") as file:
        json.dump({"ddpo": args.ddpo, "ours": args.ours, **summary}, file, indent=1)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, suffix, title in ((axes[0], "_cfg5", "evaluated at CFG 5"), (axes[1], "", "evaluated CFG-free")):
        for points, label, color in (
            (ddpo, "DDPO (TRL 0.23.1; samples at CFG 5)", "tab:red"),
            (ours, "DiffusionNFT (ours; samples CFG-free)", "tab:blue"),
        ):
            minutes = [p["train_seconds"] / 60 for p in points]
            axis.plot(
                minutes, [p[f"classifier_accuracy{suffix}"] for p in points], "-o", ms=3, color=color, label=label
            )
            axis.plot(minutes, [p[f"judge_accuracy{suffix}"] for p in points], "--", color=color, alpha=0.7)
        result = summary["at_cfg5" if suffix else "cfg_free"]
        axis.axhline(result["ddpo_best"], color="gray", lw=0.8, ls=":")
        if result["speedup"]:
            axis.annotate(
                f"DDPO's best {result['ddpo_best']:.2f}: DDPO {result['ddpo_best_seconds'] / 60:.1f} min, "
                f"ours {result['ours_seconds_to_ddpo_best'] / 60:.1f} min ({result['speedup']:g}x)",
                (0.02, 0.03),
                xycoords="axes fraction",
                fontsize=8,
            )
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("training wall-clock (minutes, evaluation excluded; 1 CPU thread)")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (100 images)")
    axes[1].legend(loc="center right", fontsize=8)
    figure.suptitle("digits-sd (SD1.x UNet): DDPO vs DiffusionNFT\nsolid: reward classifier, dashed: held-out judge")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    figure.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
