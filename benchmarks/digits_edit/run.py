"""One DiffusionNFT run on `digits-edit` (the tiny FLUX.1 Kontext digit editor): accuracy of the reward classifier and
of the held-out judge on edits of held-out source digits against optimizer steps and training wall-clock (evaluation
excluded), written as JSON.

    python benchmarks/digits_edit/run.py --name nft_seed0 --seed 0
    python benchmarks/digits_edit/run.py --name control_seed0 --seed 0 --shuffle_rewards  # rewards permuted per rollout
    python benchmarks/digits_edit/run.py --name lr3e-3 --set learning_rate=3e-3           # any NFTConfig field

Training rows: (instruction, training source digit, asked-for digit); evaluation: the `digits-edit` test split (200
held-out sources, one edit each, fixed noise), the trainer's `evaluate()`. Settings: the `digits-edit` preset's
(`trl_nft/presets/digits_edit.yaml`), `--set` overrides any of them. The recording (and its image instruments,
sharpness and diversity, with a grid of the latest evaluation's edits beside the JSON) is `benchmarks/digits/run.py`'s.
"""

import argparse
import os
import sys

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "digits"))
from run import (  # noqa: E402  (../digits/run.py)
    RecordEvaluations,
    digit_accuracy_reward,
    diversity,
    parse_value,
    preset_settings,
    run_config,
    run_record,
    sharpness,
)

from trl_nft import DiffusionNFTTrainer  # noqa: E402
from trl_nft.prompts.digits_edit import digits_edit_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--eval_every", type=int, default=80)
    parser.add_argument("--shuffle_rewards", action="store_true", help="control: permute rewards within each rollout")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="NFTConfig overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()

    overrides = dict(item.split("=", 1) for item in args.set)
    settings = {**preset_settings("digits-edit"), **{key: parse_value(value) for key, value in overrides.items()}}
    torch.manual_seed(args.seed)
    digit_accuracy = digit_accuracy_reward(args.shuffle_rewards, args.seed)
    config = run_config("digits-edit-benchmark", args, settings)
    os.makedirs(args.results_dir, exist_ok=True)
    result = run_record(args, "digits-edit", settings)
    evaluation = RecordEvaluations(os.path.join(args.results_dir, f"{args.name}.json"), result)
    trainer = DiffusionNFTTrainer(
        "digits-edit",
        digit_accuracy,
        args=config,
        train_dataset=digits_edit_prompts("train", seed=args.seed),
        eval_dataset=digits_edit_prompts("test"),
        eval_reward_funcs=["digit_classifier_top1", "digit_judge", sharpness, diversity],
        callbacks=[evaluation],
    )
    evaluation.on_train_begin(config, trainer.state, trainer.control)
    trainer.evaluate()  # the base model
    trainer.train()


if __name__ == "__main__":
    main()
