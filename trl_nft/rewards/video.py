"""How rewards see a video: one rule for every reward function, image or video.

A video family's samples reach the rewards as videos, each a list of frames (`PIL.Image.Image`, RGB), and a reward
takes them one of two ways:

- a **video-aware** reward names a `videos` parameter, `f(videos, prompts, **kwargs)` (or has `takes_videos = True`,
  for a callable object): it receives every frame of every video and returns one value per video;
- any other reward is an image reward, `f(images, prompts, **kwargs)`: it scores `frames` evenly spaced frames of each
  video (the first and the last included; `None`: every frame) as images, each with its video's prompt and columns,
  and the scores of a video's frames are aggregated into its reward (`"mean"` or `"min"`, over the frames the reward
  did not answer `None` for; `None` when it answered `None` for all of them).

So every built-in image reward works on videos unchanged.
"""

import inspect
import math
import numbers
from collections.abc import Callable

import numpy as np
from PIL import Image

from . import reward_name


FRAME_AGGREGATIONS = ("mean", "min")


def takes_videos(reward: Callable) -> bool:
    """Whether `reward` is video-aware: it names a `videos` parameter, or says so with `takes_videos = True`."""
    if getattr(reward, "takes_videos", False):
        return True
    try:
        return "videos" in inspect.signature(reward).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature: an image reward
        return False


def frame_indices(num_frames: int, frames: int | None) -> list[int]:
    """`frames` evenly spaced indices into a video of `num_frames` frames, the first and the last included (every
    frame when `frames` is None or not smaller than `num_frames`)."""
    if frames is None or frames >= num_frames:
        return list(range(num_frames))
    if frames == 1:
        return [num_frames // 2]  # one frame: the middle one
    return [round(i * (num_frames - 1) / (frames - 1)) for i in range(frames)]


def score_videos(
    reward: Callable,
    videos: list[list[Image.Image]],
    prompts: list[str],
    columns: dict[str, list],
    frames: int | None = None,
    aggregation: str = "mean",
):
    """One reward per video from `reward`: the videos themselves for a video-aware reward, else its scores of the
    chosen frames aggregated per video (see the module's docstring). The output of an image reward is checked to
    hold one value per frame scored; the caller checks the values."""
    if takes_videos(reward):
        return reward(videos=videos, prompts=prompts, **columns)
    if aggregation not in FRAME_AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {FRAME_AGGREGATIONS}.")
    chosen = [frame_indices(len(video), frames) for video in videos]
    owner = [i for i, indices in enumerate(chosen) for _ in indices]  # the video of each frame scored
    images = [videos[i][j] for i, indices in enumerate(chosen) for j in indices]
    output = reward(
        images=images,
        prompts=[prompts[i] for i in owner],
        **{key: [values[i] for i in owner] for key, values in columns.items()},
    )
    output = output.tolist() if hasattr(output, "tolist") else output
    if not isinstance(output, list | tuple) or len(output) != len(images):
        got = f"{len(output)} values" if isinstance(output, list | tuple) else f"a {type(output).__name__}"
        raise ValueError(
            f"Reward function {reward_name(reward)!r} returned {got} for {len(images)} video frames "
            f"({len(videos)} videos); it must return a list with one float (or None) per frame."
        )
    per_video: list[list[float]] = [[] for _ in videos]
    for i, value in zip(owner, output, strict=True):
        if value is not None:
            per_video[i].append(value)
    combine = np.mean if aggregation == "mean" else np.min
    return [
        float(combine(values)) if values and all(map(_is_number, values)) else _first(values) for values in per_video
    ]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _first(values: list):
    """What a video's reward is when its frames' values cannot be combined: None when there are none, else the first
    value that is not a finite number, which the caller's validation then names."""
    return next((value for value in values if not _is_number(value)), None)
