"""Reward functions: a registry of named rewards and the built-ins.

A reward function has the signature `f(images, prompts, **kwargs) -> list[float | None]`:

- `images`: a list of `PIL.Image.Image` (RGB), one per generated image. The trainer decodes each image to PIL once
  and every reward gets the same list; `to_tensor` turns it into a float tensor `[B, 3, H, W]` in [0, 1];
- `prompts`: the list of prompts, one per image;
- `kwargs`: every other column of the training dataset as a list with one value per image (TRL's GRPO convention),
  so accept `**kwargs` even if you use none of them; in image-conditioned runs (editing, image-to-video) also
  `condition_images`, each sample's source image (RGB PIL; a list of them for a multi-image row);
- the return value holds one float per image, or `None` where the reward does not apply to that image (it is then
  left out of the weighted sum, e.g. an OCR reward on a prompt with no quoted text). NaN is an error.

Model-backed rewards subclass `RewardModel` (lazy loading once per process, device/dtype, batching). Register a
function or a `RewardModel` class under a name with `@register_reward("name")`; `get_reward("name", **options)`
returns the function, or an instance of the class built with the options (e.g. `checkpoint=...`).
"""

import difflib
import inspect
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .base import RewardModel, load_once, resolve_checkpoint, resolve_file


RewardFunc = Callable[..., list[float | None]]

_REGISTRY: dict[str, RewardFunc | type[RewardModel]] = {}


def register_reward(name: str) -> Callable:
    """Decorator that makes a reward function or `RewardModel` class available under `name`."""

    def decorator(reward):
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered.")
        if isinstance(reward, type):
            if not issubclass(reward, RewardModel):
                raise TypeError(f"register_reward({name!r}): a registered class must subclass RewardModel.")
            reward.name = name
        _REGISTRY[name] = reward
        return reward

    return decorator


def get_reward(name: str, **options) -> RewardFunc:
    """The reward registered as `name`: the function itself, or an instance of the `RewardModel` class built with
    `options` (e.g. `get_reward("clip_score", checkpoint="path/to/clip")`)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown reward {name!r}.{hint} Known rewards: {', '.join(list_rewards())}.")
    reward = _REGISTRY[name]
    if isinstance(reward, type):
        return reward(**options)
    if options:
        raise TypeError(f"The reward {name!r} takes no options, got {', '.join(options)}.")
    return reward


def list_rewards(builtin: bool = False) -> list[str]:
    """The names of all registered rewards, sorted; with `builtin`, only trl-nft's own."""
    return sorted(name for name, reward in _REGISTRY.items() if not builtin or reward.__module__.startswith(__name__))


def reward_name(reward: RewardFunc) -> str:
    """The name a reward is logged under: its registered name, or its function/class name."""
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def required_columns(reward: RewardFunc) -> tuple[str, ...]:
    """The dataset columns `reward` cannot score without: its `required_columns` attribute when it has one, else the
    parameters of the function (or of a `RewardModel`'s `score`) that have no default, beyond the samples, the prompts
    and `condition_images` (which the trainer passes in image-conditioned runs, not a column)."""
    declared = getattr(reward, "required_columns", None)
    if declared is not None:
        return tuple(declared)
    return tuple(name for name in _required_parameters(reward) if name != "condition_images")


def needs_condition_images(reward: RewardFunc) -> bool:
    """Whether `reward` scores a sample against its condition images: it takes `condition_images` without a default."""
    return "condition_images" in _required_parameters(reward)


def _required_parameters(reward: RewardFunc) -> tuple[str, ...]:
    function, skipped = (type(reward).score, 4) if isinstance(reward, RewardModel) else (reward, 0)
    try:  # `score(self, models, images, prompts, ...)`, `f(images, prompts, ...)`
        parameters = list(inspect.signature(function).parameters.values())[skipped:]
    except (TypeError, ValueError):  # a builtin or an object without a signature: nothing to read
        return ()
    return tuple(
        parameter.name
        for parameter in parameters
        if parameter.name not in ("images", "prompts", "videos")
        and parameter.default is inspect.Parameter.empty
        and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size, in any mode (converted to RGB), as a float tensor `[B, 3, H, W]` in [0, 1]."""
    sizes = sorted({image.size for image in images})
    if len(sizes) > 1:
        raise ValueError(
            f"to_tensor needs images of one size, got {', '.join(f'{w} x {h}' for w, h in sizes)}: resize them first "
            "(the trainer's images all have the run's resolution)."
        )
    array = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


# Built-ins register themselves on import.
from . import clip, digits, geneval, image_reward, jpeg, ocr, remote, similarity, vlm  # noqa: E402, F401


__all__ = [
    "RewardFunc",
    "RewardModel",
    "get_reward",
    "list_rewards",
    "load_once",
    "register_reward",
    "resolve_checkpoint",
    "resolve_file",
    "reward_name",
    "to_tensor",
]
