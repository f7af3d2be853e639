"""The text encoders and the VAE in CPU memory while the policy trains (`NFTConfig.offload_text_encoders_and_vae`)."""

import contextlib

import torch
from torch import nn


class IdleOffload:
    """Keeps `modules` in CPU memory except within `in_use()`, where they are on `device`; does nothing unless
    `enabled`.

    The trainer uses them only to sample and score (rollouts, evaluation), so they wait on the CPU through the
    training micro-steps, where the memory peak is: for SD3.5-Medium that frees T5-XXL's 9.5 GB (bf16) for activations.
    Each rollout moves them in and out once; the whole sampling phase is in use, so the pipeline finds every component
    on its execution device."""

    def __init__(self, modules: list[nn.Module], device: torch.device, enabled: bool):
        self.modules, self.device, self.enabled = modules, device, enabled
        if enabled:
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for module in self.modules:
            module.to(device)

    @contextlib.contextmanager
    def in_use(self):
        if not self.enabled:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move(torch.device("cpu"))
