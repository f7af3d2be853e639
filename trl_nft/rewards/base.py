"""The base of model-backed rewards: lazy loading (once per process), device/dtype placement, batching."""

import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image


#: The keywords a reward receives besides the dataset's columns, and the parameter names of a `RewardModel`'s
#: `score(self, models, images, prompts, ...)`: a dataset column of one of these names would collide with them.
RESERVED_KEYWORDS = ("images", "videos", "prompts", "condition_images", "self", "models")

_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.RLock()  # re-entrant: a loader may itself load shared parts through `load_once`


def load_once(key: tuple, loader: Callable[[], Any]) -> Any:
    """`loader()` the first time `key` is asked for in this process, the cached result afterwards. Rewards key it on
    (what, checkpoint, device, dtype), so two rewards built on one checkpoint share one copy of the weights."""
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = loader()
        return _LOADED[key]


def resolve_checkpoint(checkpoint: str, what: str) -> str:
    """`checkpoint` unchanged if it is a Hub id or an existing local path; an error naming it if it is a local path
    that does not exist (instead of a Hub lookup of a file name)."""
    expanded = os.path.expanduser(checkpoint)
    if os.path.exists(expanded):
        return expanded
    if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1:
        raise FileNotFoundError(
            f"{what} checkpoint {checkpoint!r} does not exist: give an existing local path or a Hub id ('owner/name')."
        )
    return checkpoint


def resolve_file(checkpoint: str, what: str, filename: str | None = None) -> str:
    """A local file: `checkpoint` itself when it is an existing file, `checkpoint/filename` for a local folder, else
    `filename` downloaded from the Hub repository `checkpoint` (or found in the local Hub cache)."""
    checkpoint = resolve_checkpoint(checkpoint, what)
    if os.path.isfile(checkpoint):
        return checkpoint
    if os.path.isdir(checkpoint):
        path = os.path.join(checkpoint, filename or "")
        if filename is None or not os.path.isfile(path):
            raise FileNotFoundError(f"{what} checkpoint folder {checkpoint!r} has no file {filename!r}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(checkpoint, filename)


def source_images(condition_images: list, reward: str) -> list[list[Image.Image]]:
    """Each sample's condition images as a list (rewards receive one image per sample, or a list for a multi-image
    row); a `ValueError` naming `reward` when a sample has none."""
    rows = [list(images) if isinstance(images, list | tuple) else [images] for images in condition_images]
    if any(not images or any(image is None for image in images) for images in rows):
        raise ValueError(
            f"{reward} compares each sample with its source image, but a sample has no condition image: every row of "
            "the dataset needs its 'image'."
        )
    return rows


class RewardModel:
    """A reward backed by models: subclass it, set `default_checkpoint`, and implement `load` and `score`.

    The weights load lazily at the first call, once per process (`load_once`), on the device and dtype the trainer
    sets with `to()` (the accelerator's device and the mixed-precision dtype). Calls are split into batches of
    `batch_size` images. Pass `checkpoint` to use other weights: a Hub id or a local path.
    """

    name: str = ""  # set by `register_reward`
    default_checkpoint: str = ""

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}.")
        self.checkpoint = checkpoint or self.default_checkpoint
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        self.__name__ = self.name or type(self).__name__
        self._models: Any = None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "RewardModel":
        """Where to run (takes effect at the next call; the weights are loaded or fetched from the cache there)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self._models = None
        return self

    def load(self) -> Any:
        """Load and return the models (on `self.device`, in `self.dtype`, in eval mode). Called through `load_once`."""
        raise NotImplementedError

    def score(self, models: Any, images: list[Image.Image], prompts: list[str], **columns) -> list[float | None]:
        """Rewards of one batch, given what `load` returned."""
        raise NotImplementedError

    def checkpoints(self) -> list[str]:
        """What `load` reads, each a Hub id or a local path: `checkpoint` and every other `*_checkpoint` attribute that
        is set. `trl nft` checks before it launches that each can be read (a local path exists, a Hub id is cached or
        can be fetched); override this when `load` reads others."""
        return [
            value
            for name, value in vars(self).items()
            if (name == "checkpoint" or name.endswith("_checkpoint")) and isinstance(value, str) and value
        ]

    def cache_key(self) -> tuple:
        """What identifies the loaded weights (override when `load` depends on more than the checkpoint)."""
        return (type(self).__qualname__, self.checkpoint, str(self.device), self.dtype)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str], **columns) -> list[float | None]:
        if self._models is None:
            self._models = load_once(self.cache_key(), self.load)
        rewards: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            batch = slice(start, start + self.batch_size)
            rewards += self.score(
                self._models, images[batch], prompts[batch], **{key: value[batch] for key, value in columns.items()}
            )
        return rewards

    def __repr__(self) -> str:
        return f"{type(self).__name__}(checkpoint={self.checkpoint!r}, device={self.device}, dtype={self.dtype})"
