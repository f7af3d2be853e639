"""Reward functions: a registry of named rewards and the built-ins.

A reward function has the signature `f(images, prompts, **kwargs) -> list[float | None]`:

- `images`: a list of `PIL.Image.Image` (RGB), one per generated image. The trainer decodes each image to PIL once
  and every reward gets the same list; `to_tensor` turns it into a float tensor `[B, 3, H, W]` in [0, 1];
- `prompts`: the list of prompts, one per image;
- `kwargs`: every other column of the training dataset as a list with one value per image (TRL's GRPO convention),
  so accept `**kwargs` even if you use none of them;
- the return value holds one float per image, or `None` where the reward does not apply to that image (it is then
  left out of the weighted sum, e.g. an OCR reward on a prompt with no quoted text). NaN is an error.

Model-backed rewards subclass `RewardModel` (lazy loading once per process, device/dtype, batching). Register a
function or a `RewardModel` class under a name with `@register_reward("name")`; `get_reward("name", **options)`
returns the function, or an instance of the class built with the options (e.g. `checkpoint=...`).
"""

import difflib
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


def list_rewards() -> list[str]:
    """The names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def reward_name(reward: RewardFunc) -> str:
    """The name a reward is logged under: its registered name, or its function/class name."""
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (same size) as a float tensor `[B, 3, H, W]` in [0, 1]."""
    array = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


# Built-ins register themselves on import.
from . import clip, digits, geneval, image_reward, jpeg, ocr, remote, vlm  # noqa: E402, F401


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
