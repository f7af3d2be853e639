"""The learning proof's table: the held-out judge's accuracy on edits of held-out sources, DiffusionNFT with the
`digit_accuracy` reward against the shuffled-reward control, per seed and on average, from `results/` (`runs.sh`).

    python benchmarks/digits_edit/summary.py     # prints the markdown table, writes results/summary.json

The lift of a run is its judge accuracy at its last evaluation minus at its first (the base, before training).
"""

import argparse
import json
import os


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(results_dir: str, name: str) -> dict:
    with open(os.path.join(results_dir, f"{name}.json")) as file:
        return json.load(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results_dir", default=RESULTS)
    args = parser.parse_args()

    rows, lifts = [], {"nft": [], "control": []}
    for seed in args.seeds:
        runs = {arm: load(args.results_dir, f"{arm}_seed{seed}")["points"] for arm in lifts}
        for arm, points in runs.items():
            lifts[arm].append(points[-1]["judge_accuracy"] - points[0]["judge_accuracy"])
        nft, control = runs["nft"], runs["control"]
        rows.append(
            f"| {seed} | {nft[0]['judge_accuracy']:.3f} | {nft[-1]['judge_accuracy']:.3f} "
            f"({nft[-1]['classifier_accuracy']:.3f}) | {control[-1]['judge_accuracy']:.3f} "
            f"({control[-1]['classifier_accuracy']:.3f}) | {lifts['nft'][-1]:+.3f} | {lifts['control'][-1]:+.3f} "
            f"| {nft[-1]['step']} | {nft[-1]['train_seconds'] / 60:.1f} / {control[-1]['train_seconds'] / 60:.1f} |"
        )
    mean = {arm: sum(values) / len(values) for arm, values in lifts.items()}
    summary = {
        "seeds": args.seeds,
        "lift": {arm: [round(value, 3) for value in values] for arm, values in lifts.items()},
        "mean_lift": {arm: round(value, 3) for arm, value in mean.items()},
        "mean_lift_over_control": round(mean["nft"] - mean["control"], 3),
    }
    print(
        "| seed | base judge | NFT: judge (classifier) | control: judge (classifier) | NFT lift | control lift "
        "| steps | training minutes (NFT / control) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"| mean | | | | {mean['nft']:+.3f} | {mean['control']:+.3f} | | |\n\n"
        f"NFT's mean lift over the control's: {summary['mean_lift_over_control']:+.3f}"
    )
    with open(os.path.join(args.results_dir, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)


if __name__ == "__main__":
    main()
