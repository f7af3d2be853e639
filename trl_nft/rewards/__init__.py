"""Reward functions: a registry of named rewards and the built-ins.

A reward function has the signature `f(images, prompts, **kwargs) -> list[float | None]`:

- `images`: a list of `PIL.Image.Image` (RGB), one per generated image;
- `prompts`: the list of prompts, one per image;
- `kwargs`: every other column of the training dataset as a list with one value per image (TRL's GRPO convention),
  so accept `**kwargs` even if you use none of them;
- the return value holds one float per image, or `None` where the reward does not apply to that image (it is then
  left out of the weighted sum). NaN is an error.
"""

from collections.abc import Callable


RewardFunc = Callable[..., list[float | None]]

_REGISTRY: dict[str, RewardFunc] = {}


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Decorator that makes a reward function available under `name` (as `reward_funcs="name"`)."""

    def decorator(func: RewardFunc) -> RewardFunc:
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered.")
        _REGISTRY[name] = func
        return func

    return decorator


def get_reward(name: str) -> RewardFunc:
    """The registered reward function called `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown reward {name!r}. Known rewards: {', '.join(list_rewards())}.")
    return _REGISTRY[name]


def list_rewards() -> list[str]:
    """The names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


# Built-ins register themselves on import.
from . import jpeg  # noqa: E402, F401


__all__ = ["RewardFunc", "get_reward", "list_rewards", "register_reward"]
