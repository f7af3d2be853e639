"""Scoring a batch of samples with the run's reward functions: each function called as the reward contract says
(images, or videos: `trl_nft.rewards.video`), under the run's failure policy, and its output checked before it can
reach the advantages.

A reward can fail three ways: it raises, it takes longer than the timeout, or it returns a non-finite value. The
policy (`NFTConfig.reward_failure_policy`) decides what follows, and nothing is ever scored 0 silently:

- `"fail"` (the default): the run stops with the reward's own error (a timeout: `TimeoutError`), noted with its name;
- `"retry"`: a call that raised or timed out is made again, up to `retries` times, waiting `backoff * 2**k` seconds
  before the k-th retry, then the run stops; a non-finite value stops it at once (it is not transient);
- `"drop"`: as `"retry"`, but the samples of a call that still failed, and those given a non-finite value, are
  dropped from the update (their reward is unknown: they count in no group's statistics and no loss), and counted.
"""

import math
import numbers
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

from .video import score_videos


logger = logging.get_logger(__name__)

FAILURE_POLICIES = ("fail", "retry", "drop")


@dataclass
class RewardFailurePolicy:
    """What to do when a reward raises, times out or returns a non-finite value (module docstring)."""

    on_failure: str = "fail"
    retries: int = 3
    backoff: float = 1.0
    timeout: float | None = None  # seconds per call; None waits for ever

    def __post_init__(self):
        if self.on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure={self.on_failure!r} is not one of {FAILURE_POLICIES}.")


@dataclass
class Scores:
    """The rewards `[num_samples, num_funcs]` (NaN where a function returned None), which samples were dropped
    (`[num_samples]`, bool), and how many calls were retried."""

    rewards: torch.Tensor
    dropped: torch.Tensor
    retries: int = 0
    failures: list[str] = field(default_factory=list)  # what failed, one line each, for the log


class RewardFailure(RuntimeError):
    """A reward call that raised or timed out after the `"drop"` policy's retries: its samples are dropped."""


def score_samples(
    funcs: list,
    names: list[str],
    samples: list[Image.Image] | list[list[Image.Image]],
    prompts: list[str],
    columns: dict[str, list],
    video_frames: int | None = None,
    video_aggregation: str = "mean",
    policy: RewardFailurePolicy | None = None,
) -> Scores:
    """Score `samples` (images, or videos as lists of frames) with every function, under `policy`. A function that
    returns anything but one float (or None) per sample is a `ValueError` naming it, whatever the policy: that is a
    bug in the function, not a fault."""
    policy = policy or RewardFailurePolicy()
    is_video = bool(samples) and isinstance(samples[0], list)
    kind = "videos" if is_video else "images"
    scores = Scores(torch.full((len(samples), len(funcs)), float("nan")), torch.zeros(len(samples), dtype=torch.bool))

    def call(func):
        if is_video:
            return score_videos(func, samples, prompts, columns, video_frames, video_aggregation)
        return func(images=samples, prompts=prompts, **columns)

    for j, (func, name) in enumerate(zip(funcs, names, strict=True)):
        try:
            output = _call_with_retries(lambda func=func: call(func), name, policy, scores)
        except RewardFailure as failure:
            if policy.on_failure != "drop":
                raise
            scores.dropped[:] = True  # every sample of this call: its reward for `name` is unknown
            scores.failures.append(str(failure))
            continue
        if isinstance(output, torch.Tensor | np.ndarray):
            output = output.tolist()
        if not isinstance(output, list | tuple) or len(output) != len(samples):
            got = f"{len(output)} values" if isinstance(output, list | tuple) else f"a {type(output).__name__}"
            raise ValueError(
                f"Reward function {name!r} returned {got} for {len(samples)} {kind}; it must return a list with one "
                f"float (or None) per {kind[:-1]}."
            )
        for i, value in enumerate(output):
            if value is None:
                continue
            if not isinstance(value, numbers.Real):
                raise ValueError(
                    f"Reward function {name!r} returned {value!r} for {kind[:-1]} {i} (prompt {prompts[i]!r}); rewards "
                    "must be floats, or None where the reward does not apply."
                )
            if not math.isfinite(value):
                if policy.on_failure != "drop":
                    raise ValueError(
                        f"Reward function {name!r} returned {value!r} for {kind[:-1]} {i} (prompt {prompts[i]!r}); "
                        "rewards must be finite (reward_failure_policy='drop' drops such samples from the update)."
                    )
                scores.dropped[i] = True
                scores.failures.append(f"{name!r} returned {value!r} for {kind[:-1]} {i} (prompt {prompts[i]!r})")
                continue
            scores.rewards[i, j] = float(value)
    return scores


def _call_with_retries(call, name: str, policy: RewardFailurePolicy, scores: Scores):
    """`call()` under the policy's timeout, retried on an exception or a timeout as the policy says. When it still
    fails, `"fail"` and `"retry"` re-raise the reward's own error, with a note naming the reward and the policy;
    `"drop"` raises a `RewardFailure` for the caller to drop the call's samples."""
    attempts = 1 + (policy.retries if policy.on_failure in ("retry", "drop") else 0)
    for attempt in range(attempts):
        try:
            return _with_timeout(call, policy.timeout, name)
        except Exception as error:  # noqa: BLE001 - any failure of a user's reward is handled by the policy
            reason = f"raised {type(error).__name__}: {error}"
            if attempt + 1 < attempts:
                delay = policy.backoff * 2**attempt
                logger.warning(
                    f"Reward function {name!r} {reason}; retry {attempt + 1} of {policy.retries} in {delay} s."
                )
                scores.retries += 1
                time.sleep(delay)
                continue
            retried = f" after {policy.retries} retries" if attempts > 1 else ""
            if policy.on_failure == "drop":
                raise RewardFailure(f"Reward function {name!r} {reason}{retried}.") from error
            error.add_note(
                f"Reward function {name!r} failed{retried} (reward_failure_policy={policy.on_failure!r}; 'retry' "
                "retries a failed call, 'drop' drops the samples it could not score from the update)."
            )
            raise


def _with_timeout(call, timeout: float | None, name: str):
    if timeout is None:
        return call()
    # A thread of its own: a call that overruns is abandoned to finish in the background (Python cannot stop it).
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        return executor.submit(call).result(timeout=timeout)
    except FutureTimeoutError as error:
        raise TimeoutError(f"it took longer than reward_timeout={timeout} s") from error
    finally:
        executor.shutdown(wait=False)
