"""Callbacks that watch a DiffusionNFT run: sample grids (images, not just numbers), early stopping at a target
reward, and a reward-hacking guard. The trainer adds them from `NFTConfig` fields; they are ordinary
`transformers.TrainerCallback`s."""

import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging

from .media import frame_strip, save_gif


logger = logging.get_logger(__name__)


class SampleLoggingCallback(TrainerCallback):
    """Every `every_steps` optimizer steps, a grid of the latest rollout's images (one per prompt first, an edit beside
    its source image; videos as strips of frames, and also played in an animated GIF next to it) with their prompts and
    rewards: saved as `output_dir/samples/step_<N>.png` (and `.gif`) and sent to TensorBoard, Weights & Biases (with the GIF
    as a video) and Trackio when those are in `report_to`. Main process only; the images are that process's share of the rollout."""

    def __init__(self, trainer, every_steps: int, num_images: int = 8):
        self.trainer, self.every_steps, self.num_images = trainer, every_steps, num_images
        self.columns = min(num_images, 5 if num_images % 5 == 0 else 4)

    def on_step_end(self, args, state, control, **kwargs):
        samples = self.trainer.last_rollout_samples
        if state.global_step % self.every_steps != 0 or not state.is_world_process_zero or samples is None:
            return
        chosen = spread_over_prompts(self.num_images, samples[1])
        shown, prompts, rewards = ([column[i] for i in chosen] for column in samples)
        conditions = self.trainer.last_rollout_conditions
        if conditions is not None and not isinstance(shown[0], list):  # an edit: its source on its left
            shown = [source_beside(conditions[i], image) for i, image in zip(chosen, shown, strict=True)]
        grid = sample_grid(shown, prompts, rewards, columns=self.columns)
        folder = os.path.join(args.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step_{state.global_step:06d}.png"))
        animation = None
        if isinstance(shown[0], list):  # videos: the grid above shows frames of each; this one plays them
            frames = [
                sample_grid([video[t] for video in shown], prompts, rewards, self.columns)
                for t in range(len(shown[0]))
            ]
            animation = os.path.join(folder, f"step_{state.global_step:06d}.gif")
            save_gif(frames, animation)
        # Each tracker gets the grid at transformers' step, as its own callback logs the metrics: TensorBoard at
        # `global_step`; W&B and Trackio with a `train/global_step` entry and their own step counter (an explicit
        # `step=` can run ahead of that counter, and W&B then drops the metrics logged after it).
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_image("train/samples", np.asarray(grid), state.global_step, dataformats="HWC")
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                logged = {"train/samples": wandb.Image(grid), "train/global_step": state.global_step}
                if animation is not None:
                    logged["train/videos"] = wandb.Video(animation)
                wandb.log(logged)
        if "trackio" in args.report_to:
            import trackio

            trackio.log({"train/samples": trackio.Image(grid), "train/global_step": state.global_step})


class EarlyStoppingAtRewardCallback(TrainerCallback):
    """Stop training once the logged training `reward` reaches `target`."""

    def __init__(self, target: float):
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and logs.get("reward") is not None and logs["reward"] >= self.target:
            control.should_training_stop = True


class RewardHackingGuardCallback(TrainerCallback):
    """Warn (or stop) when a held-out evaluation metric falls while the training reward rises.

    At each evaluation, the held-out value is compared with its best so far, and the training reward (the mean of the
    `reward` logged since the previous evaluation) with its value at that best evaluation. Held-out more than
    `threshold` below its best while the training reward is above its value then is a strike; `patience` strikes in a
    row trigger the guard, and `triggered_steps` records the step of each warning (or of the stop).
    """

    def __init__(self, metric: str, patience: int = 2, stop: bool = False, threshold: float = 0.0):
        self.metric, self.patience, self.stop, self.threshold = metric, patience, stop, threshold
        self.best: float | None = None
        self.train_reward_at_best: float | None = None
        self.strikes = 0
        self.triggered_steps: list[int] = []
        self._train_rewards: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self._train_rewards.append(logs["reward"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric not in metrics or not self._train_rewards:
            return
        held_out = metrics[self.metric]
        train_reward = sum(self._train_rewards) / len(self._train_rewards)
        self._train_rewards = []
        if self.best is None or held_out >= self.best:
            self.best, self.train_reward_at_best, self.strikes = held_out, train_reward, 0
            return
        fallen = held_out < self.best - self.threshold
        self.strikes = self.strikes + 1 if fallen and train_reward > self.train_reward_at_best else 0
        if self.strikes >= self.patience:
            self.triggered_steps.append(state.global_step)
            logger.warning(
                f"Possible reward hacking at step {state.global_step}: {self.metric} = {held_out:.4g} has stayed below "
                f"its best {self.best:.4g} for {self.strikes} evaluations while the training reward rose from "
                f"{self.train_reward_at_best:.4g} to {train_reward:.4g}."
                + (" Stopping training." if self.stop else " (reward_hacking_guard='stop' would stop training.)")
            )
            control.should_training_stop = control.should_training_stop or self.stop


#: Tiles are at least this wide: smaller images (digits-sd3's are 16 px) are enlarged pixel for pixel.
MIN_TILE_WIDTH = 128
CAPTION_LINE_HEIGHT = 12


def sample_grid(images: list, prompts: list[str], rewards: list[float], columns: int = 4) -> Image.Image:
    """Images in rows of `columns`, each under a caption: its reward, then its prompt on up to two lines. A video (a
    list of frames) shows as a strip of four of its frames."""
    images = [frame_strip(image) if isinstance(image, list) else image for image in images]
    scale = -(-MIN_TILE_WIDTH // images[0].width)  # ceiling division: 1 for images already wide enough
    width, height = images[0].width * scale, images[0].height * scale
    caption = 3 * CAPTION_LINE_HEIGHT
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * (height + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt, reward) in enumerate(zip(images, prompts, rewards, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + caption)
        grid.paste(image.resize((width, height), Image.NEAREST) if scale > 1 else image, (x, y + caption))
        lines = [
            f"reward {reward:.3g}",
            *textwrap.wrap(prompt, width=max(4, width // 6), max_lines=2, placeholder=".."),
        ]
        draw.multiline_text((x + 1, y), "\n".join(lines), fill="black", spacing=0)
    return grid


def source_beside(source: Image.Image | list[Image.Image], image: Image.Image) -> Image.Image:
    """`image` with its condition image (the first of several) on its left, scaled to its height."""
    source = source[0] if isinstance(source, list) else source
    source = source.resize((max(1, round(source.width * image.height / source.height)), image.height))
    pair = Image.new("RGB", (source.width + image.width, image.height), "white")
    pair.paste(source, (0, 0))
    pair.paste(image, (source.width, 0))
    return pair


def spread_over_prompts(count: int, prompts: list[str]) -> list[int]:
    """`count` indices into a rollout's images, one per prompt before any prompt's second (a rollout lists each
    prompt's group in a row, so its first images would all show one prompt)."""
    rank, seen = [], {}
    for prompt in prompts:
        rank.append(seen.get(prompt, 0))
        seen[prompt] = rank[-1] + 1
    return sorted(range(len(prompts)), key=rank.__getitem__)[:count]
