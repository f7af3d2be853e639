"""Callbacks that watch a DiffusionNFT run: sample grids (images, not just numbers) and early stopping at a target
reward. The trainer adds them from `NFTConfig` fields; they are ordinary `transformers.TrainerCallback`s."""

import os

import numpy as np
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback


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
