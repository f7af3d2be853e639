"""Checking what a user passes to `DiffusionNFTTrainer` before any long work: the prompt datasets, the reward
functions and the dataset columns they need, and prompts the text encoders will truncate. Each problem is a clear
error naming the argument and the fix (or, for long prompts, one warning with the count)."""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from datasets import Dataset
from transformers.utils import logging

from .conditions import CONDITION_COLUMN, CONDITION_IMAGES_KEYWORD, check_condition_images, check_image_conditioning
from .rewards import RewardFunc, get_reward, needs_condition_images, required_columns, reward_name
from .rewards.base import RESERVED_KEYWORDS


# `trl nft` runs the column checks before it launches, on the columns alone, without importing the model families.
if TYPE_CHECKING:
    from .models import DiffusionAdapter
    from .nft_config import NFTConfig


logger = logging.get_logger(__name__)


def check_prompt_dataset(dataset: Dataset | None, name: str, min_rows: int) -> None:
    if dataset is None:
        raise ValueError(f"{name} is required: a datasets.Dataset with a 'prompt' column.")
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "__len__"):
        raise ValueError(f"{name} must be a datasets.Dataset with a 'prompt' column, got {type(dataset).__name__}.")
    check_prompt_columns(dataset.column_names, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: it needs at least one prompt.")
    if len(dataset) < min_rows:
        raise ValueError(
            f"{name} has {len(dataset)} prompts but one optimizer step needs {min_rows} (images per step / "
            "num_generations); add prompts or lower per_device_train_batch_size or gradient_accumulation_steps."
        )


def check_prompt_columns(column_names: Sequence[str], name: str) -> None:
    """A `ValueError` naming `name` when a prompt dataset with these columns has no `prompt` column or a column named
    like a keyword the rewards receive."""
    reserved = [column for column in column_names if column in RESERVED_KEYWORDS]
    if reserved:
        raise ValueError(
            f"{name} has a column named {reserved[0]!r}, a name the reward functions already receive as a keyword "
            f"(reserved: {', '.join(RESERVED_KEYWORDS)}); rename the column, e.g. dataset.rename_column({reserved[0]!r}, "
            f"'{reserved[0]}_column')."
        )
    if "prompt" not in column_names:
        raise ValueError(f"{name} has no 'prompt' column (columns: {list(column_names)}); rename the prompt column.")


def check_reward_columns(dataset: Dataset, dataset_name: str, funcs: list[RewardFunc], names: list[str]) -> None:
    """A `ValueError` naming the reward and the columns when `dataset` lacks a column a reward needs."""
    for func, name in zip(funcs, names, strict=True):
        if needs_condition_images(func) and CONDITION_COLUMN not in dataset.column_names:
            raise ValueError(
                f"The reward {name!r} scores an edit against its source ({CONDITION_IMAGES_KEYWORD}), but {dataset_name} "
                f"has no '{CONDITION_COLUMN}' column of condition images (its columns: {dataset.column_names}). Use it "
                "with an image-conditioned model and a dataset of source images (docs/editing.md)."
            )
        missing = [column for column in required_columns(func) if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The reward {name!r} needs the dataset column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}, "
                f"which {dataset_name} lacks (its columns: {dataset.column_names}). Add it, or use a prompt set that "
                "has it (docs/rewards.md lists what each reward needs, e.g. GenEval's prompts: trl_nft.geneval_prompts)."
            )


def resolve_reward_funcs(reward_funcs) -> tuple[list[Callable], list[str]]:
    funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty: give at least one reward function or registered reward name.")
    resolved, names = [], []
    for func in funcs:
        if isinstance(func, str):
            func = get_reward(func)
        elif not callable(func):
            raise TypeError(f"reward_funcs entries must be callables or registered names, got {type(func).__name__}.")
        resolved.append(func)
        names.append(reward_name(func))
    return resolved, names


class ResolvedRewards(NamedTuple):
    funcs: list[RewardFunc]  # the reward functions trained on, names resolved to registered rewards
    names: list[str]
    eval_funcs: list[RewardFunc]  # the held-out ones, scored only by evaluation
    eval_names: list[str]
    weights: torch.Tensor  # one per trained function


def check_inputs_before_loading(
    args: "NFTConfig", train_dataset: Dataset, eval_dataset: Dataset | None, reward_funcs, eval_reward_funcs
) -> ResolvedRewards:
    """What `DiffusionNFTTrainer` checks before it loads the model: the prompt datasets (enough rows for a rollout,
    their condition images), the reward functions (resolved from names), the columns they need, that no two share a
    name (their metrics would mix) and one weight per function."""
    check_prompt_dataset(train_dataset, "train_dataset", args.prompts_per_rollout)
    if eval_dataset is not None:
        check_prompt_dataset(eval_dataset, "eval_dataset", 1)
    for name, dataset in {"train_dataset": train_dataset, "eval_dataset": eval_dataset}.items():
        if dataset is not None:
            check_condition_images(dataset, name)
    funcs, names = resolve_reward_funcs(reward_funcs)
    eval_funcs, eval_names = resolve_reward_funcs(eval_reward_funcs) if eval_reward_funcs is not None else ([], [])
    check_reward_columns(train_dataset, "train_dataset", funcs, names)
    if eval_dataset is not None:
        check_reward_columns(eval_dataset, "eval_dataset", funcs + eval_funcs, names + eval_names)
    if len(set(names + eval_names)) < len(names + eval_names):
        raise ValueError(
            f"Two reward functions share a name ({', '.join(names + eval_names)}), so their metrics would mix; give "
            "each a distinct name (its `__name__`, or the `name` attribute of a reward object)."
        )
    if args.reward_weights is None:
        weights = torch.ones(len(funcs))
    elif len(args.reward_weights) != len(funcs):
        raise ValueError(
            f"reward_weights has {len(args.reward_weights)} values for {len(funcs)} reward functions "
            f"({', '.join(names)}); give one weight per function."
        )
    else:
        weights = torch.tensor(args.reward_weights, dtype=torch.float32)
    return ResolvedRewards(funcs, names, eval_funcs, eval_names, weights)


def check_inputs_for_model(adapter: "DiffusionAdapter", train_dataset: Dataset, eval_dataset: Dataset | None) -> None:
    """What `DiffusionNFTTrainer` checks once it knows the model family: condition images where the family needs them
    (and none where it takes none), and one warning for the prompts its text encoders will truncate."""
    for name, dataset in {"train_dataset": train_dataset, "eval_dataset": eval_dataset}.items():
        if dataset is not None:
            check_image_conditioning(
                dataset,
                name,
                adapter.image_conditioning,
                adapter.max_condition_images,
                type(adapter.pipeline).__name__,
            )
    warn_about_long_prompts(adapter, train_dataset)


def warn_about_long_prompts(adapter: "DiffusionAdapter", dataset: Dataset, most: int = 20_000) -> None:
    """One warning for the prompts of `dataset` that `adapter`'s text encoders will truncate (the pipeline's own warnings, one per encoding
    call, are silenced), counted over the first `most` distinct prompts."""
    prompts = list(dict.fromkeys(dataset["prompt"][:most]))
    truncated, limits = adapter.count_truncated_prompts(prompts)
    if truncated:
        scanned = f"the first {len(prompts)} distinct" if len(dataset) > most else f"the {len(prompts)} distinct"
        logger.warning(
            f"{truncated} of {scanned} training prompts are longer than the text encoders take ({', '.join(limits)}) "
            "and are truncated: shorten them, or raise max_sequence_length where the long encoder allows it."
        )
