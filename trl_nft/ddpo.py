"""A drop-in path for code written for TRL's `DDPOTrainer` (trl <= 0.23.1, removed in 0.24).

A DDPO script ports by changing its imports: `from trl_nft.ddpo import DDPOConfig, DDPOTrainer,
DefaultDDPOStableDiffusionPipeline`. Its `reward_function`, `prompt_function` and `image_samples_hook` keep working
unchanged; the training underneath is DiffusionNFT (`DiffusionNFTTrainer`). `DDPOConfig` keeps DDPO's field names and
maps each onto `NFTConfig` (`to_nft_config`); fields with no DiffusionNFT equivalent (PPO's clip range, inner epochs,
...) are accepted and listed in docs/ddpo_migration.md.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from diffusers import StableDiffusionPipeline

from .nft_config import NFTConfig
from .nft_trainer import DiffusionNFTTrainer
from .rewards import to_tensor


@dataclass
class DDPOConfig:
    """TRL 0.23's `DDPOConfig` fields (same names and defaults), mapped onto `NFTConfig` by `to_nft_config()`.

    One DDPO epoch (sample, then train) is one DiffusionNFT iteration: `sample_num_batches_per_epoch` batches of
    `sample_batch_size` images per process. DDPO had no prompt groups; here each sampled batch is one group of
    `num_generations` images of one prompt (default: `sample_batch_size`), the only field DDPO did not have.
    """

    exp_name: str = "ddpo"
    run_name: str = ""
    seed: int = 0
    log_with: str | None = None
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    project_kwargs: dict = field(default_factory=dict)
    tracker_project_name: str = "trl"
    logdir: str = "logs"
    num_epochs: int = 100
    save_freq: int = 1
    num_checkpoint_limit: int = 5
    mixed_precision: str = "fp16"
    allow_tf32: bool = True
    resume_from: str = ""
    sample_num_steps: int = 50
    sample_eta: float = 1.0
    sample_guidance_scale: float = 5.0
    sample_batch_size: int = 1
    sample_num_batches_per_epoch: int = 2
    train_batch_size: int = 1
    train_use_8bit_adam: bool = False
    train_learning_rate: float = 3e-4
    train_adam_beta1: float = 0.9
    train_adam_beta2: float = 0.999
    train_adam_weight_decay: float = 1e-4
    train_adam_epsilon: float = 1e-8
    train_gradient_accumulation_steps: int = 1
    train_max_grad_norm: float = 1.0
    train_num_inner_epochs: int = 1
    train_cfg: bool = True
    train_adv_clip_max: float = 5.0
    train_clip_range: float = 1e-4
    train_timestep_fraction: float = 1.0
    per_prompt_stat_tracking: bool = False
    per_prompt_stat_tracking_buffer_size: int = 16
    per_prompt_stat_tracking_min_count: int = 16
    async_reward_computation: bool = False
    max_workers: int = 2
    negative_prompts: str = ""
    push_to_hub: bool = False
    # Not in DDPO: images per prompt group (None: `sample_batch_size`).
    num_generations: int | None = None

    def to_nft_config(self) -> NFTConfig:
        """The equivalent `NFTConfig` (docs/ddpo_migration.md lists every mapping)."""
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is invalid: use 'no', 'fp16' or 'bf16'.")
        cuda = torch.cuda.is_available()  # DDPO's fp16 default meant "on the GPU"; on a CPU it runs in float32
        return NFTConfig(
            output_dir=self.project_kwargs.get("project_dir", self.logdir),
            run_name=self.run_name or self.exp_name,
            seed=self.seed,
            report_to=self.log_with or "none",
            max_steps=self.num_epochs,
            save_steps=self.save_freq,
            save_total_limit=self.num_checkpoint_limit,
            fp16=cuda and self.mixed_precision == "fp16",
            bf16=cuda and self.mixed_precision == "bf16",
            tf32=cuda and self.allow_tf32 or None,
            resume_from_checkpoint=self.resume_from or None,
            num_inference_steps=self.sample_num_steps,
            guidance_scale=self.sample_guidance_scale,
            sampler="DDIMScheduler",  # DDPO sampled with DDIM
            per_device_train_batch_size=self.sample_batch_size,
            gradient_accumulation_steps=self.sample_num_batches_per_epoch,
            num_generations=self.num_generations or self.sample_batch_size,
            optim="adamw_bnb_8bit" if self.train_use_8bit_adam else "adamw_torch",
            learning_rate=self.train_learning_rate,
            adam_beta1=self.train_adam_beta1,
            adam_beta2=self.train_adam_beta2,
            weight_decay=self.train_adam_weight_decay,
            adam_epsilon=self.train_adam_epsilon,
            max_grad_norm=self.train_max_grad_norm,
            advantage_clip=self.train_adv_clip_max,
            train_timestep_fraction=self.train_timestep_fraction,
            scale_rewards="group" if self.per_prompt_stat_tracking else "batch",
            overlap_reward_scoring=self.async_reward_computation,
            push_to_hub=self.push_to_hub,
        )


class DefaultDDPOStableDiffusionPipeline:
    """DDPO's pipeline wrapper: an SD1.x pipeline loaded with `from_pretrained`; LoRA is on by default, as in DDPO
    (`use_lora=False` fine-tunes the whole UNet)."""

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True):
        self.sd_pipeline = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name, revision=pretrained_model_revision
        )
        self.use_lora = use_lora


class DDPOTrainer(DiffusionNFTTrainer):
    """DiffusionNFT behind DDPO's constructor: `DDPOTrainer(config, reward_function, prompt_function, sd_pipeline,
    image_samples_hook=None)`.

    - `reward_function(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`: `images` a float tensor
      `[B, 3, H, W]` in [0, 1], `rewards` a tensor, array or list with one value per image.
    - `prompt_function() -> (prompt, prompt_metadata)`: called once per prompt group, up front.
    - `image_samples_hook(prompt_image_data, global_step, tracker)`: called after each rollout with
      `[[images, prompts, prompt_metadata, rewards, reward_metadata]]`; `tracker` is accelerate's tracker for
      `log_with` (`None` when nothing is logged).
    """

    def __init__(
        self,
        config: DDPOConfig,
        reward_function: Callable,
        prompt_function: Callable,
        sd_pipeline: DefaultDDPOStableDiffusionPipeline | StableDiffusionPipeline,
        image_samples_hook: Callable | None = None,
    ):
        args = config.to_nft_config()
        self._ddpo_reward_function, self._image_samples_hook = reward_function, image_samples_hook
        self._sample_batches: list[list] = []  # what DDPO handed to image_samples_hook: one entry per batch
        # One prompt per group, enough for every iteration, drawn as DDPO drew them: from `prompt_function`.
        drawn = [prompt_function() for _ in range(args.max_steps * args.prompts_per_rollout)]
        prompts, self._prompt_metadata = [prompt for prompt, _ in drawn], [metadata for _, metadata in drawn]
        dataset = Dataset.from_dict({"prompt": prompts, "ddpo_prompt_index": list(range(len(prompts)))})
        pipeline = getattr(sd_pipeline, "sd_pipeline", sd_pipeline)
        args.use_peft = getattr(sd_pipeline, "use_lora", True)

        def reward(images, prompts, ddpo_prompt_index, **kwargs):
            return self._score_with_ddpo_reward(images, prompts, ddpo_prompt_index)

        reward.__name__ = getattr(reward_function, "__name__", "reward")  # metrics are named after the function
        super().__init__(model=pipeline, reward_funcs=reward, args=args, train_dataset=dataset)
        self._tracker = _accelerate_tracker(config, args.output_dir)

    def _score_with_ddpo_reward(self, images, prompts, ddpo_prompt_index) -> list[float]:
        pixels = to_tensor(images)
        metadata = [self._prompt_metadata[i] for i in ddpo_prompt_index]
        output = self._ddpo_reward_function(pixels, list(prompts), metadata)
        if isinstance(output, torch.Tensor | np.ndarray) or not (
            isinstance(output, tuple | list) and len(output) == 2
        ):
            raise ValueError(
                "A DDPO reward_function must return a pair (rewards, reward_metadata), e.g. `return rewards, {}`; "
                f"got {type(output).__name__}."
            )
        rewards, reward_metadata = output
        rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
        self._sample_batches.append([pixels, list(prompts), metadata, rewards, reward_metadata])
        return rewards.tolist()

    def _generate_and_score(self, rows: list[dict]) -> dict:
        self._sample_batches = []
        rollout = super()._generate_and_score(rows)
        if self._image_samples_hook is not None:
            self._image_samples_hook(self._sample_batches, self.state.global_step, self._tracker)
        return rollout


def _accelerate_tracker(config: DDPOConfig, output_dir: str):
    """The tracker object DDPO handed to `image_samples_hook` (accelerate's own tracker classes)."""
    if config.log_with == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        return TensorBoardTracker(config.tracker_project_name, os.path.join(output_dir, "ddpo_images"))
    if config.log_with == "wandb":
        from accelerate.tracking import WandBTracker

        return WandBTracker(config.tracker_project_name, **config.tracker_kwargs.get("wandb", {}))
    return None
