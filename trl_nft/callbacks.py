"""Callbacks that watch a DiffusionNFT run: sample grids (images, not just numbers), early stopping at a target
reward, and a reward-hacking guard. The trainer adds them from `NFTConfig` fields; they are ordinary
`transformers.TrainerCallback`s."""

import os

import numpy as np
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


class SampleLoggingCallback(TrainerCallback):
    """Every `every_steps` optimizer steps, a grid of the latest rollout's images with their prompts and rewards:
    saved as `output_dir/samples/step_<N>.png` and sent to TensorBoard, Weights & Biases and Trackio when those are in
    `report_to`. Main process only; the images are that process's share of the rollout."""

    def __init__(self, trainer, every_steps: int, num_images: int = 8):
        self.trainer, self.every_steps, self.num_images = trainer, every_steps, num_images

    def on_step_end(self, args, state, control, **kwargs):
        samples = self.trainer.last_rollout_samples
        if state.global_step % self.every_steps != 0 or not state.is_world_process_zero or samples is None:
            return
        grid = sample_grid(*(column[: self.num_images] for column in samples))
        folder = os.path.join(args.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step_{state.global_step:06d}.png"))
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_image("train/samples", np.asarray(grid), state.global_step, dataformats="HWC")
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"train/samples": wandb.Image(grid)}, step=state.global_step)
        if "trackio" in args.report_to:
            import trackio

            trackio.log({"train/samples": trackio.Image(grid)}, step=state.global_step)


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


def sample_grid(images: list[Image.Image], prompts: list[str], rewards: list[float], columns: int = 4) -> Image.Image:
    """Images in rows of `columns`, each captioned with the start of its prompt and its reward."""
    width, height = images[0].size
    caption = 12
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * (height + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt, reward) in enumerate(zip(images, prompts, rewards, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + caption)
        grid.paste(image, (x, y + caption))
        draw.text((x + 1, y), f"{reward:.3g} {prompt}"[: max(4, width // 6)], fill="black")
    return grid
