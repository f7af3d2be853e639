"""The conditioning of recently seen prompts (and their condition images), kept so that a row is not encoded again at
every rollout."""

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from .models.base import DiffusionAdapter


class PromptEmbeddingCache:
    """The conditioning rows of at most `capacity` conditions, the least recently used dropped first.

    `encode(keys, encode_missing)` returns what `encode_missing(keys)` returns (a dict of batch-first tensors, one row
    per key), encoding only the keys it does not hold, in one batch. A key identifies a row's whole condition: its
    prompt, and for image-conditioned families the fingerprint of its images. That is exact only when a row's
    encoding does not depend on the other rows of its batch, which holds for encoders padded to a fixed length (the
    families' `per_prompt_encoding`)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: OrderedDict[Hashable, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def encode(
        self, keys: list[Hashable], encode_missing: Callable[[list[Hashable]], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        missing = list(dict.fromkeys(key for key in keys if key not in self._rows))
        new_rows = {}
        if missing:
            encoded = encode_missing(missing)
            new_rows = {key: {name: value[i] for name, value in encoded.items()} for i, key in enumerate(missing)}
        rows = [self._rows[key] if key in self._rows else new_rows[key] for key in keys]
        for key in keys:  # most recently used last
            if key in self._rows:
                self._rows.move_to_end(key)
            else:
                # A copy: a row of the batch would keep the whole batch's storage alive.
                self._rows[key] = {name: value.clone() for name, value in new_rows[key].items()}
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def prompt_embedding_cache(capacity: int, adapter: DiffusionAdapter) -> PromptEmbeddingCache | None:
    """The cache `NFTConfig.prompt_embedding_cache_size` asks for (None for 0), or a `ValueError` for a family whose
    encoding of a prompt depends on its batch."""
    if not capacity:
        return None
    if not adapter.per_prompt_encoding:
        raise ValueError(
            f"prompt_embedding_cache_size={capacity} cannot be used with {type(adapter.pipeline).__name__}: it "
            "encodes a prompt differently depending on the other prompts of its batch (padded to the longest), so a "
            "kept encoding would not be the one a rollout makes. Set prompt_embedding_cache_size=0."
        )
    return PromptEmbeddingCache(capacity)
