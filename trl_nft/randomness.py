"""Random draws keyed by what they are for, so that a run's result does not depend on how many processes ran it.

Every random draw of a sample (its rollout's initial noise, the times it is trained at and the noise added there) comes
from a generator of its own, seeded by `(seed, step, stream, index)`: the run's seed, the optimizer step, what the
draw is for, and the sample's index in the whole rollout (over every process and machine). A rollout of the same
global batch is split over 1, 2 or N processes, each taking a contiguous block of its samples, and whichever process
holds a sample draws the same numbers for it: so the rollouts, the rewards (gathered before they are normalised), the
training draws and the weights are the same up to float rounding (the order in which gradients are summed). A resumed
run redraws what it would have drawn, too.

The ODE samplers (the default) draw only the initial noise; a stochastic sampler's per-step noise comes from the
pipeline's own generator use (`generator` passed to `scheduler.step`, which the flow pipelines do not do) and is
not covered.
"""

import torch


#: What a draw is for (the `stream` of the key).
ROLLOUT_NOISE, TRAINING_DRAWS, EVALUATION_NOISE = 0, 1, 2


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by `key`, a tuple of integers (hashed: integers' hashes do not depend on
    `PYTHONHASHSEED`, so every process seeds the same generator for the same key)."""
    return torch.Generator(device="cpu").manual_seed(hash(key) % (2**63))


def sample_generators(seed: int, step: int, stream: int, indices: list[int] | torch.Tensor) -> list[torch.Generator]:
    """One generator per sample, for the samples at global `indices` of the rollout of optimizer step `step`."""
    indices = indices.tolist() if isinstance(indices, torch.Tensor) else indices
    return [keyed_generator(seed, step, stream, index) for index in indices]


def per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise `[len(generators), *shape]`, each row drawn from its sample's own generator."""
    return torch.stack([torch.randn(shape, generator=generator) for generator in generators])
