"""DiffusionNFT training from the command line: `trl nft ...` / `trl-nft nft ...` launch this script with accelerate.

    trl nft --model sd3.5-medium --reward geneval --output_dir sd35m-geneval
    trl nft --config examples/configs/tiny_sd3.yaml --max_steps 10

Every `NFTConfig` field is a flag, `--config file.yaml` sets defaults that flags override (TRL's parser), and
`--help` lists them all. The run saves the LoRA in diffusers' format with a model card, and pushes both to the Hub
with `--push_to_hub`.
"""

import difflib
import json
import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset
from trl import TrlParser

from trl_nft import DiffusionNFTTrainer, NFTConfig
from trl_nft.embedded import model_preset
from trl_nft.prompts import (
    drawbench_prompts,
    geneval_prompts,
    load_prompt_source,
    ocr_prompts,
    pickapic_prompts,
)
from trl_nft.prompts.digits import digit_prompts
from trl_nft.rewards import get_reward, list_rewards
from trl_nft.signals import StopNow, exit_with_launcher, stop_on_signals


#: Prompt sets by name: `(split, seed, num_prompts) -> Dataset`.
PROMPT_SETS = {
    # GenEval's generator; its test split is the official 553-prompt evaluation suite (seed 43).
    "geneval": lambda split, seed, n: (
        geneval_prompts(seed=43) if split == "test" else geneval_prompts(n or 50_000, seed)
    ),
    "pickapic": lambda split, seed, n: pickapic_prompts(split=split),
    "drawbench": lambda split, seed, n: drawbench_prompts(split=split),
    # 32 short prompts, built in: the quickstart's set.
    "simple": lambda split, seed, n: Dataset.from_dict(
        {
            "prompt": [
                f"{style} {subject}"
                for style in ["a photo of a", "a painting of a", "a sketch of a", "a close-up of a"]
                for subject in ["cat", "dog", "house", "tree", "car", "boat", "flower", "mountain"]
            ]
        }
    ),
    # The ten "a handwritten digit <name>" prompts with a `digit` column (the digits-sd3 benchmark); the test split
    # repeats each 10 times: evaluation draws one image per prompt.
    "digits": lambda split, seed, n: digit_prompts(10 if split == "test" else 1),
}
#: The prompts a reward trains on unless `--dataset` says otherwise.
DEFAULT_PROMPTS = {
    "geneval": "geneval",
    "ocr": "ocr",
    "jpeg_compressibility": "simple",
    "jpeg_incompressibility": "simple",
    "digit_accuracy": "digits",
    "digit_classifier_top1": "digits",
    "digit_judge": "digits",
}
DEFAULT_PROMPT_SET = "pickapic"  # preference rewards (PickScore, HPSv2, aesthetic, ImageReward, CLIP, VLM judges)

logger = logging.getLogger(__name__)


@dataclass
class NFTScriptArguments:
    """What to train, against what, on which prompts. Training settings are `NFTConfig`'s flags."""

    model_name_or_path: str = field(
        default="tiny-sd3",
        metadata={
            "aliases": ["--model"],
            "help": "Model: a name (sd3.5-medium, sd3.5-large, sd3-medium, sdxl, sd1.5, sd2.1, tiny-sd3, tiny-sd, "
            "tiny-sdxl), a Hub id or a local folder.",
        },
    )
    reward: list[str] = field(
        default_factory=lambda: ["jpeg_incompressibility"],
        metadata={
            "help": "Reward(s): a registered name, optionally with a weight as NAME:WEIGHT; repeat the flag or "
            "separate with commas, e.g. --reward geneval,pickscore:0.5."
        },
    )
    reward_kwargs: list[str] = field(
        default_factory=list,
        metadata={"help": """Options of a reward as NAME=JSON, e.g. 'clip_score={"checkpoint": "/ckpt/clip"}'."""},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training prompts: a name (geneval, ocr, pickapic, drawbench, simple), a local file or folder, or "
            "a Hub dataset id with a 'prompt' column. Default: the first reward's prompts (geneval -> geneval, "
            "jpeg -> simple, preference rewards -> pickapic)."
        },
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "For --dataset ocr: the prompt file (Flow-GRPO's dataset/ocr/train.txt)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the training prompts."})
    num_train_prompts: int | None = field(
        default=None, metadata={"help": "Prompts generated for --dataset geneval (default 50000)."}
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation prompts (same forms as --dataset); needed by --eval_strategy. With the geneval reward "
            "and --eval_dataset geneval, GenEval's strict per-task scores are reported."
        },
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of the evaluation prompts."})


def merge_repeated_flags(argv: list[str], flags: tuple[str, ...] = ("--reward", "--reward_kwargs")) -> list[str]:
    """`--reward a --reward b` -> `--reward a b`: argparse keeps only the last occurrence of a list flag."""
    merged, values = [], {flag: [] for flag in flags}
    current = None
    for token in argv:
        if token in values:
            current = token
            if not values[token]:
                merged.append(token)  # the flag stays where it first appeared; its values are collected
                merged.append(values[token])
        elif current is not None and not token.startswith("--"):
            values[current].append(token)
        else:
            current = None
            merged.append(token)
    return [item for token in merged for item in (token if isinstance(token, list) else [token])]


def with_model_preset(argv: list[str]) -> list[str]:
    """`argv` starting from the named model's preset (`--config`, `models.MODEL_PRESETS`) when it has one and no
    `--config` is given: `trl nft --model digits-sd3` is then a run that learns, and flags still override."""
    if any(token == "--config" or token.startswith("--config=") for token in argv):
        return argv
    model = None
    for index, token in enumerate(argv):
        name, sep, value = token.partition("=")
        if name in ("--model", "--model_name_or_path"):
            model = value if sep else (argv[index + 1] if index + 1 < len(argv) else None)
    preset = model_preset(model) if model else None
    if preset is None:
        return argv
    logger.info(f"--model {model}: training settings from its preset {preset} (flags override; --config replaces it).")
    return ["--config", preset, *argv]


def parse_rewards(specs: list[str], reward_kwargs: list[str]) -> tuple[list, list[float] | None]:
    """`--reward` values (`NAME[:WEIGHT]`, comma-separated or repeated) -> (reward functions, weights or None)."""
    options = {}
    for text in reward_kwargs:
        name, sep, value = text.partition("=")
        try:
            options[name] = json.loads(value) if sep else None
        except json.JSONDecodeError as error:
            raise ValueError(f"--reward_kwargs {text!r}: the options are not valid JSON ({error}).") from error
        if not isinstance(options[name], dict):
            raise ValueError(f"--reward_kwargs {text!r}: expected NAME='{{\"option\": value}}' (a JSON object).")
    names, weights = [], []
    for spec in (part.strip() for text in specs for part in text.split(",") if part.strip()):
        name, sep, weight = spec.partition(":")
        try:
            weights.append(float(weight) if sep else None)
        except ValueError as error:
            raise ValueError(f"--reward {spec!r}: the weight after ':' must be a number.") from error
        names.append(name)
    if not names:
        raise ValueError("--reward is empty: name at least one reward, e.g. --reward geneval.")
    unknown = options.keys() - set(names)
    if unknown:
        raise ValueError(f"--reward_kwargs for {sorted(unknown)}, which no --reward names.")
    rewards = [get_reward(name, **options.get(name, {})) for name in names]
    if all(weight is None for weight in weights):
        return rewards, None
    return rewards, [1.0 if weight is None else weight for weight in weights]


def load_prompts(name: str, split: str, seed: int, num_prompts: int | None, ocr_path: str | None) -> Dataset:
    """A prompt set by name (`PROMPT_SETS`, or `ocr` from `ocr_path`), else a local path or Hub id."""
    if name == "ocr":
        if ocr_path is None:
            raise ValueError(
                "--dataset ocr needs --dataset_path: a file of prompts with the text to render in double quotes, one "
                "per line (Flow-GRPO's dataset/ocr/train.txt format)."
            )
        return ocr_prompts(ocr_path, split=split)
    if name in PROMPT_SETS:
        return PROMPT_SETS[name](split, seed, num_prompts)
    if os.path.exists(name) or name.count("/") == 1:
        return load_prompt_source(name, split=split)
    known = [*PROMPT_SETS, "ocr"]
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"--dataset {name!r} is not a prompt set name, a local path, or a Hub id 'owner/name'.{hint} "
        f"Prompt sets: {', '.join(known)}."
    )


def main(script_args: NFTScriptArguments, training_args: NFTConfig) -> DiffusionNFTTrainer:
    rewards, weights = parse_rewards(script_args.reward, script_args.reward_kwargs)
    if weights is not None:
        if training_args.reward_weights is not None:
            raise ValueError(
                "Reward weights were given twice, in --reward NAME:WEIGHT and in --reward_weights; use one of them."
            )
        training_args.reward_weights = weights
    first_reward = script_args.reward[0].split(",")[0].split(":")[0].strip()
    if script_args.dataset_path is not None and "ocr" not in (script_args.dataset, first_reward):
        raise ValueError("--dataset_path only applies to --dataset ocr (the OCR prompt file).")
    dataset_name = script_args.dataset or DEFAULT_PROMPTS.get(first_reward, DEFAULT_PROMPT_SET)
    train_dataset = load_prompts(
        dataset_name,
        script_args.dataset_split,
        training_args.seed,
        script_args.num_train_prompts,
        script_args.dataset_path,
    )
    eval_dataset = eval_rewards = None
    if script_args.eval_dataset is not None:
        eval_dataset = load_prompts(
            script_args.eval_dataset,
            script_args.eval_dataset_split,
            training_args.seed,
            None,
            script_args.dataset_path,
        )
        names = [getattr(reward, "name", None) for reward in rewards]
        if "geneval" in names and "metadata" in eval_dataset.column_names:
            eval_rewards = get_reward("geneval", strict=True)
        elif "digit_accuracy" in names and "digit" in eval_dataset.column_names:
            # The reward classifier's accuracy and the held-out judge of the digits benchmark.
            eval_rewards = [get_reward("digit_classifier_top1"), get_reward("digit_judge")]
    elif training_args.eval_strategy != "no":
        raise ValueError(f"--eval_strategy {training_args.eval_strategy} needs --eval_dataset (a prompt set).")
    trainer = DiffusionNFTTrainer(
        model=script_args.model_name_or_path,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        eval_reward_funcs=eval_rewards,
    )
    with stop_on_signals(trainer) as stop:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stop.signum is not None:  # stopped on SIGINT/SIGTERM: the run is unfinished, so neither saved nor pushed
        raise SystemExit(128 + stop.signum)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    if trainer.is_world_process_zero():
        summary = evaluation_summary(trainer.state.log_history)
        print(f"{summary}\n" if summary else "", end="")
        print(f"The LoRA (or weights), its model card and the sample grids are in {training_args.output_dir}.")
    return trainer


def evaluation_summary(log_history: list[dict]) -> str | None:
    """The first and the last evaluation side by side, one line per reward metric (None with fewer than two)."""
    evaluations = [entry for entry in log_history if "eval_reward" in entry]
    if len(evaluations) < 2:
        return None
    first, last = evaluations[0], evaluations[-1]
    names = [key for key in last if key.startswith("eval_reward") and key in first]
    width = max(map(len, names))
    lines = [f"Evaluation, step {first['step']} -> {last['step']}:"]
    lines += [f"  {name:<{width}}  {first[name]:.3f} -> {last[name]:.3f}" for name in names]
    return "\n".join(lines)


def make_parser(prog: str | None = None) -> TrlParser:
    parser = TrlParser((NFTScriptArguments, NFTConfig), prog=prog)
    parser.epilog = f"Registered rewards: {', '.join(list_rewards())}."
    return parser


if __name__ == "__main__":
    import signal
    import sys

    exit_with_launcher()
    try:
        main(*make_parser().parse_args_and_config(with_model_preset(merge_repeated_flags(sys.argv[1:]))))
    except KeyboardInterrupt as interrupt:  # a second stop signal, or a SIGINT before training: no traceback
        signum = interrupt.signum if isinstance(interrupt, StopNow) else signal.SIGINT
        print(f"{signal.Signals(signum).name}: stopped at once.", file=sys.stderr)
        sys.exit(128 + signum)
