"""The text conditioning of recently seen prompts, kept so that a prompt is not encoded again at every rollout."""

from collections import OrderedDict
from collections.abc import Callable

import torch

from .models.base import DiffusionAdapter


class PromptEmbeddingCache:
    """The conditioning rows of at most `capacity` prompts, the least recently used dropped first.

    `encode(prompts, encode_prompts)` returns what `encode_prompts(prompts)` returns (a dict of batch-first tensors,
    one row per prompt), encoding only the prompts it does not hold, in one batch. That is exact only when a prompt's
    row does not depend on the other prompts of its batch, which holds for encoders padded to a fixed length (the
    families' `per_prompt_encoding`)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def encode(
        self, prompts: list[str], encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        missing = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self._rows))
        new_rows = {}
        if missing:
            encoded = encode_prompts(missing)
            new_rows = {prompt: {key: value[i] for key, value in encoded.items()} for i, prompt in enumerate(missing)}
        rows = [self._rows[prompt] if prompt in self._rows else new_rows[prompt] for prompt in prompts]
        for prompt in prompts:  # most recently used last
            if prompt in self._rows:
                self._rows.move_to_end(prompt)
            else:
                # A copy: a row of the batch would keep the whole batch's storage alive.
                self._rows[prompt] = {key: value.clone() for key, value in new_rows[prompt].items()}
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


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
