"""DiffusionNFT training from the command line: `trl nft ...` / `trl-nft nft ...` launch this script with accelerate.

    trl nft --model sd3.5-medium --reward geneval --output_dir sd35m-geneval
    trl nft --config examples/configs/tiny_sd3.yaml --max_steps 10

Every `NFTConfig` field is a flag, `--config file.yaml` sets defaults that flags override (TRL's parser), and
`--help` lists them all. The run saves the LoRA in diffusers' format with a model card, and pushes both to the Hub
with `--push_to_hub`.
"""

import argparse
import csv
import difflib
import json
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from datasets import Dataset
from trl import TrlParser

from trl_nft.embedded import EMBEDDED_MODELS, model_preset
from trl_nft.model_names import MODEL_ALIASES
from trl_nft.prompts import (
    drawbench_prompts,
    geneval_prompts,
    load_prompt_source,
    ocr_prompts,
    pickapic_prompts,
)
from trl_nft.prompts.digits import digit_prompts
from trl_nft.prompts.digits_edit import digits_edit_prompts
from trl_nft.prompts.loaders import FILE_BUILDERS
from trl_nft.rewards import get_reward, list_rewards


# The trainer, its config and the signal handling (diffusers, transformers) are imported where they are used: `trl nft`
# reads this module to check its arguments, and to answer --help, before it imports them.
if TYPE_CHECKING:
    from trl_nft import DiffusionNFTTrainer, NFTConfig


@dataclass(frozen=True)
class PromptSet:
    """A prompt set that `--dataset NAME` names."""

    #: `(split, seed, num_prompts) -> Dataset`; None for `ocr`, read from `--dataset_path`.
    build: Callable[[str, int, int | None], Dataset] | None
    #: Its columns: `trl nft` checks them against what the rewards need before it launches.
    columns: tuple[str, ...]
    #: What it is, for --help and docs/cli.md.
    description: str


def _simple_prompts(split: str, seed: int, num_prompts: int | None) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [
                f"{style} {subject}"
                for style in ["a photo of a", "a painting of a", "a sketch of a", "a close-up of a"]
                for subject in ["cat", "dog", "house", "tree", "car", "boat", "flower", "mountain"]
            ]
        }
    )


#: Prompt sets by name.
PROMPT_SETS = {
    "geneval": PromptSet(
        lambda split, seed, n: geneval_prompts(seed=43) if split == "test" else geneval_prompts(n or 50_000, seed),
        ("prompt", "tag", "metadata"),
        "GenEval-template prompts with their metadata (`--num_train_prompts`, default 50 000); its `test` split is "
        "the official 553-prompt suite",
    ),
    "ocr": PromptSet(
        None,
        ("prompt", "ocr_text"),
        "text-rendering prompts from `--dataset_path` (Flow-GRPO's `dataset/ocr/train.txt` format), with the text to "
        "render in `ocr_text`",
    ),
    "pickapic": PromptSet(
        lambda split, seed, n: pickapic_prompts(split=split),
        ("prompt",),
        "Pick-a-Pic v2 captions (from the Hub)",
    ),
    "drawbench": PromptSet(
        lambda split, seed, n: drawbench_prompts(split=split),
        ("prompt", "category"),
        "DrawBench's 200 prompts in 11 categories (from the Hub)",
    ),
    "simple": PromptSet(_simple_prompts, ("prompt",), "32 short built-in prompts, the quickstart's"),
    "digits": PromptSet(
        lambda split, seed, n: digit_prompts(10 if split == "test" else 1),
        ("prompt", "digit"),
        "the ten prompts of `digits-sd3`, with a `digit` column; the `test` split repeats each 10 times (one image "
        "per prompt at evaluation)",
    ),
    "digits-edit": PromptSet(
        digits_edit_prompts,
        ("prompt", "image", "digit"),
        "instructions to redraw a handwritten source digit (`image`) as another (`digit`), for `digits-edit`; the "
        "`test` split's 200 sources are held out from every digits model",
    ),
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
            "help": f"Model: a Hub checkpoint's short name ({', '.join(MODEL_ALIASES)}), an embedded model, built "
            f"offline ({', '.join(EMBEDDED_MODELS)}), a Hub id or a local folder.",
        },
    )
    reward: list[str] = field(
        default_factory=lambda: ["jpeg_incompressibility"],
        metadata={
            "help": "Reward(s): a registered name (listed below), optionally with a weight as NAME:WEIGHT; repeat the "
            "flag, or separate with commas or spaces, e.g. --reward geneval,pickscore:0.5."
        },
    )
    reward_kwargs: list[str] = field(
        default_factory=list,
        metadata={"help": """Options of a reward as NAME=JSON, e.g. 'clip_score={"checkpoint": "/ckpt/clip"}'."""},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": f"Training prompts: a prompt set ({', '.join(PROMPT_SETS)}), a local file "
            f"({', '.join(FILE_BUILDERS)}) or folder, or a Hub dataset id, with a 'prompt' column. Default: the first "
            f"reward's prompts ({', '.join(f'{reward} -> {name}' for reward, name in DEFAULT_PROMPTS.items())}, "
            f"any other -> {DEFAULT_PROMPT_SET})."
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


def merge_list_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with each list flag of `parser` (`--reward`, `--reward_kwargs`, `--lora_target_modules`, ...) given
    once, where it first appears, with the values of all its occurrences: `--reward a --reward b`, `--reward=a
    --reward=b` and `--reward a b` all become `--reward a b` (argparse keeps only the last occurrence)."""
    list_actions = {
        option: action for action in parser._actions if action.nargs in ("+", "*") for option in action.option_strings
    }
    merged, values = [], {}
    current = None  # the values of the list flag being read
    for token in argv:
        name, sep, value = token.partition("=")
        if name in list_actions:
            dest = list_actions[name].dest
            if dest not in values:
                values[dest] = []
                merged += [name, values[dest]]
            current = values[dest]
            if sep:  # `--reward=a`: that one value; what follows is not the flag's
                current.append(value)
                current = None
        elif current is not None and not is_flag(token):
            current.append(token)
        else:
            current = None
            merged.append(token)
    return [item for token in merged for item in (token if isinstance(token, list) else [token])]


def is_flag(token: str) -> bool:
    """Whether a command-line token is a flag (`--x`, `-x`), not a value (a negative number is a value)."""
    return token.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?|-\.\d+", token)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Wraps the help at spaces only, so that names such as `flux-kontext-dev` stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )


class NFTParser(TrlParser):
    """TRL's parser (dataclass fields -> flags, `--config` YAML), with the habits of a command line: every spelling of
    a repeated list flag accumulates (`merge_list_flags`), a YAML scalar for a list field is a one-item list, a YAML key
    may be a flag's alias (`model:`), flags are never abbreviated (a misspelling is an error, not another flag), and
    an error is one line, exit code 2 (argparse's usage line would list every flag)."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=_HelpFormatter, **kwargs)

    def parse_args_and_config(self, args=None, *more, **kwargs):
        args = sys.argv[1:] if args is None else args
        # TRL's parser reads `--config FILE` only: `--config=FILE` too
        args = [part for token in args for part in (token.split("=", 1) if token.startswith("--config=") else [token])]
        return super().parse_args_and_config(merge_list_flags(args, self), *more, **kwargs)

    def set_defaults_with_config(self, **config) -> list[str]:
        aliases = {
            option[2:]: action.dest
            for action in self._actions
            if not isinstance(action, argparse._StoreFalseAction)  # `--no_use_peft` is not `use_peft`
            for option in action.option_strings
            if option.startswith("--")
        }
        lists = {action.dest for action in self._actions if action.nargs in ("+", "*")}
        fields = {}
        for key, value in config.items():
            key = aliases.get(key, key)
            fields[key] = [value] if key in lists and value is not None and not isinstance(value, list) else value
        return super().set_defaults_with_config(**fields)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


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


def parse_reward_specs(specs: list[str]) -> tuple[list[str], list[float] | None]:
    """`--reward` values (`NAME[:WEIGHT]`, comma-separated or repeated) -> (names, weights or None)."""
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
    if all(weight is None for weight in weights):
        return names, None
    return names, [1.0 if weight is None else weight for weight in weights]


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
    names, weights = parse_reward_specs(specs)
    unknown = options.keys() - set(names)
    if unknown:
        raise ValueError(f"--reward_kwargs for {sorted(unknown)}, which no --reward names.")
    rewards = []
    for name in names:
        try:
            rewards.append(get_reward(name, **options.get(name, {})))
        except TypeError as error:  # an option the reward does not take
            raise ValueError(f"--reward_kwargs for {name!r}: {error}") from error
    return rewards, weights


def train_dataset_name(script_args: NFTScriptArguments) -> str:
    """`--dataset`, or the first reward's prompt set."""
    first_reward = parse_reward_specs(script_args.reward)[0][0]
    if script_args.dataset_path is not None and "ocr" not in (script_args.dataset, first_reward):
        raise ValueError("--dataset_path only applies to --dataset ocr (the OCR prompt file).")
    return script_args.dataset or DEFAULT_PROMPTS.get(first_reward, DEFAULT_PROMPT_SET)


def check_flags(script_args: NFTScriptArguments, training_args: "NFTConfig") -> None:
    """The flags that contradict each other (`trl nft` checks them before it launches)."""
    names, weights = parse_reward_specs(script_args.reward)
    if weights is not None and training_args.reward_weights is not None:
        raise ValueError(
            "Reward weights were given twice, in --reward NAME:WEIGHT and in --reward_weights; use one of them."
        )
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(names):
        raise ValueError(
            f"--reward_weights gives {len(training_args.reward_weights)} "
            f"weight{'s' if len(training_args.reward_weights) != 1 else ''} for {len(names)} rewards "
            f"({', '.join(names)}): give one weight per reward."
        )
    train_dataset_name(script_args)
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)  # an IntervalStrategy
    if script_args.eval_dataset is None and strategy != "no":
        raise ValueError(f"--eval_strategy {strategy} needs --eval_dataset (a prompt set).")


def prompt_columns(name: str, ocr_path: str | None, flag: str = "--dataset") -> tuple[str, ...] | None:
    """The columns of the prompts `load_prompts(name, ...)` loads, when they are known without loading them (a prompt
    set, a local file), else None (a folder, a Hub dataset). A `ValueError` naming `flag` when `name` is neither a
    prompt set, an existing file or folder, nor a Hub id `owner/name`."""
    if name == "ocr" and ocr_path is None:
        raise ValueError(
            f"{flag} ocr needs --dataset_path: a file of prompts with the text to render in double quotes, one per "
            "line (Flow-GRPO's dataset/ocr/train.txt format)."
        )
    if name in PROMPT_SETS:
        return PROMPT_SETS[name].columns
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return local_file_columns(path, flag)
    if os.path.isdir(path):
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"{flag} {name!r}: no such file or folder.")
    if name.count("/") == 1:
        return None
    close = difflib.get_close_matches(name, PROMPT_SETS, n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"{flag} {name!r} is not a prompt set name, a local path, or a Hub id 'owner/name'.{hint} "
        f"Prompt sets: {', '.join(PROMPT_SETS)}."
    )


def local_file_columns(path: str, flag: str = "--dataset") -> tuple[str, ...] | None:
    """The columns `load_prompts` gives for the prompt file `path`, read from its header or first rows (None for a
    JSON file too large to read whole)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_BUILDERS:
        raise ValueError(f"{flag} {path!r}: cannot read prompts from it; use one of {', '.join(FILE_BUILDERS)}.")
    if extension == ".txt":
        return ("prompt",)  # one prompt per line
    if extension == ".csv":
        with open(path, newline="") as file:
            return tuple(next(csv.reader(file), []))
    if extension == ".parquet":
        import pyarrow.parquet

        return tuple(pyarrow.parquet.read_schema(path).names)
    if extension == ".jsonl" or os.path.getsize(path) > 100_000_000:
        rows = []
        with open(path) as file:
            for line in file:
                if line.strip():
                    rows.append(_json_value(line, path, flag))
                if len(rows) == 100:
                    break
    else:
        with open(path) as file:
            rows = _json_value(file.read(), path, flag)
    if isinstance(rows, dict):  # {column: [values]}
        return tuple(rows)
    if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
        return tuple(dict.fromkeys(key for row in rows for key in row))
    return None


def _json_value(text: str, path: str, flag: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:  # a large JSON file read line by line: not JSON Lines
        raise ValueError(f"{flag} {path!r} is not valid JSON ({error}).") from error


def load_prompts(name: str, split: str, seed: int, num_prompts: int | None, ocr_path: str | None) -> Dataset:
    """A prompt set by name (`PROMPT_SETS`; `ocr` from `ocr_path`), else a local file or folder or a Hub dataset."""
    prompt_columns(name, ocr_path)  # a ValueError for a name that is none of these
    if name == "ocr":
        return ocr_prompts(ocr_path, split=split)
    if name in PROMPT_SETS:
        return PROMPT_SETS[name].build(split, seed, num_prompts)
    dataset = load_prompt_source(name, split=split)
    if os.path.splitext(name)[1].lower() == ".txt":  # `datasets` reads each line as `text`: here, a prompt
        dataset = dataset.rename_column("text", "prompt")
    return dataset


def main(script_args: NFTScriptArguments, training_args: "NFTConfig") -> "DiffusionNFTTrainer":
    from trl_nft import DiffusionNFTTrainer
    from trl_nft.console import saved_files_summary
    from trl_nft.signals import stop_on_signals

    check_flags(script_args, training_args)
    rewards, weights = parse_rewards(script_args.reward, script_args.reward_kwargs)
    if weights is not None:
        training_args.reward_weights = weights
    dataset_name = train_dataset_name(script_args)
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
        print(saved_files_summary(training_args.output_dir))
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


def make_parser(prog: str | None = None) -> NFTParser:
    """The parser of every flag: the script's (`NFTScriptArguments`) and `NFTConfig`'s."""
    from trl_nft import NFTConfig

    parser = NFTParser((NFTScriptArguments, NFTConfig), prog=prog)
    parser.epilog = f"Registered rewards: {', '.join(list_rewards())}."
    return parser


if __name__ == "__main__":
    import signal

    from trl_nft.signals import StopNow, exit_with_launcher

    exit_with_launcher()
    try:
        main(*make_parser().parse_args_and_config(with_model_preset(sys.argv[1:])))
    except KeyboardInterrupt as interrupt:  # a second stop signal, or a SIGINT before training: no traceback
        signum = interrupt.signum if isinstance(interrupt, StopNow) else signal.SIGINT
        print(f"{signal.Signals(signum).name}: stopped at once.", file=sys.stderr)
        sys.exit(128 + signum)
