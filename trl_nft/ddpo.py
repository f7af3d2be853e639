"""A drop-in path for code written for TRL's `DDPOTrainer` (trl <= 0.23.1, removed in 0.24).

A DDPO script ports by changing its imports: `from trl_nft.ddpo import DDPOConfig, DDPOTrainer,
DefaultDDPOStableDiffusionPipeline`. Its `reward_function`, `prompt_function`, `image_samples_hook` and `log_with`
trackers keep working unchanged; the training underneath is DiffusionNFT (`DiffusionNFTTrainer`). `DDPOConfig` keeps
DDPO's field names and maps each onto `NFTConfig` (`to_nft_config`); fields with no DiffusionNFT equivalent (PPO's clip
range, inner epochs, ...) are accepted and listed in docs/ddpo_migration.md.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, filter_trackers, get_available_trackers
from accelerate.utils import LoggerType, ProjectConfiguration
from datasets import Dataset
from diffusers import StableDiffusionPipeline
from transformers import TrainerCallback

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
    # As accelerate's `Accelerator(log_with=...)`: a tracker name, a list of names, `GeneralTracker` instances, or a
    # mixture. Annotated `str | None` so that `HfArgumentParser` (TRL's example script) can parse `--log_with`.
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
            output_dir=_project_configuration(self).project_dir or self.logdir,
            run_name=self.run_name or self.exp_name,
            seed=self.seed,
            # `log_with` goes to accelerate's trackers, as in DDPO (`DDPOTrainer` sets them up). transformers' own
            # integrations stay off: for the same tracker they would start a second run (a second `wandb.init`, a
            # second TensorBoard writer logging the same scalars to another folder).
            report_to="none",
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
      `[[images, prompts, prompt_metadata, rewards, reward_metadata]]`; `tracker` is the first of `log_with`'s
      trackers, started (`None` when nothing is logged).

    `log_with`'s trackers are set up as DDPO's `Accelerator` set them up, on `self.accelerator`: its `trackers`, `log`,
    `get_tracker` and `end_training` work on them, and the trainer's logs (reward, loss, ...) reach them
    (docs/ddpo_migration.md, "Trackers").
    """

    def __init__(
        self,
        config: DDPOConfig,
        reward_function: Callable,
        prompt_function: Callable,
        sd_pipeline: DefaultDDPOStableDiffusionPipeline | StableDiffusionPipeline,
        image_samples_hook: Callable | None = None,
    ):
        _check_log_with(config.log_with)
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
        self._tracker = self._init_trackers(config)

    def _init_trackers(self, config: DDPOConfig) -> GeneralTracker | None:
        """Start `log_with`'s trackers as DDPO did (`Accelerator(log_with=..., project_config=...)`, then
        `init_trackers(tracker_project_name, init_kwargs=tracker_kwargs)` on the main process) and return the one
        `image_samples_hook` gets."""
        if config.log_with is None:
            return None
        # transformers builds the Trainer's Accelerator without trackers; give it what DDPO's had. DDPO required a
        # logging directory for TensorBoard and the like; without one they log under `output_dir`. Nothing else in
        # the Trainer's Accelerator reads `logging_dir`.
        logging_dir = _project_configuration(config).logging_dir or self.args.output_dir
        self.accelerator.project_configuration.logging_dir = logging_dir
        self.accelerator.log_with = filter_trackers(config.log_with, logging_dir)
        self.accelerator.init_trackers(config.tracker_project_name, init_kwargs=config.tracker_kwargs)
        hyperparameters = _hyperparameters(config)
        for tracker in self.accelerator.trackers:
            # As DDPO stored them: flat for TensorBoard (its hparams take no nesting), under one key for the others.
            nested = tracker.name != "tensorboard"
            tracker.store_init_configuration({"ddpo_trainer_config": hyperparameters} if nested else hyperparameters)
        self.add_callback(_TrackersCallback(self.accelerator))
        if self.accelerator.trackers:
            return self.accelerator.trackers[0]  # what DDPO handed to the hook
        # accelerate keeps trackers on the main process only; elsewhere the hook gets one that discards everything,
        # so that a hook written for one process runs unchanged on all of them.
        return None if self.accelerator.is_main_process else _DiscardingTracker()

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


class _TrackersCallback(TrainerCallback):
    """Sends the trainer's logs (reward, loss, ...) to the accelerator's trackers at the optimizer step, as DDPO's
    `accelerator.log(..., step=global_step)` did (on the main process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.accelerator.log(logs, step=state.global_step)


class _DiscardingTracker(GeneralTracker):
    """The hook's tracker on processes other than the main one: every call is accepted and dropped."""

    name = "discarding"
    requires_logging_directory = False
    tracker = None

    def log_images(self, values: dict, step: int | None = None, **kwargs):
        pass


def _project_configuration(config: DDPOConfig) -> ProjectConfiguration:
    """The `ProjectConfiguration` DDPO's `Accelerator` had: `project_kwargs`, with `accelerator_kwargs["project_dir"]`
    as `project_dir` (and so as `logging_dir`) where `project_kwargs` sets none, as `Accelerator(project_dir=...)`
    does."""
    project = ProjectConfiguration(**config.project_kwargs)
    if project.project_dir is None and config.accelerator_kwargs.get("project_dir") is not None:
        project.set_directories(config.accelerator_kwargs["project_dir"])
    return project


def _check_log_with(log_with) -> None:
    """A `ValueError` naming `log_with` for what accelerate would reject (an unknown name) or drop without a word (a
    tracker whose package is not installed)."""
    if log_with is None:
        return
    names = LoggerType.list() + [name for name in LOGGER_TYPE_TO_CLASS if name not in LoggerType.list()]
    for entry in log_with if isinstance(log_with, list | tuple) else [log_with]:
        if isinstance(entry, GeneralTracker):
            continue
        if entry not in LoggerType and str(entry) not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"log_with={log_with!r}: {entry!r} is not a tracker. Use one of {', '.join(names)}, a list of them, "
                "or instances of `accelerate.tracking.GeneralTracker`."
            )
        if entry in LoggerType and LoggerType(entry) not in [LoggerType.ALL, *get_available_trackers()]:
            raise ValueError(f"log_with={log_with!r}: {str(entry)!r} is not installed; `pip install {entry}`.")


def _hyperparameters(config: DDPOConfig) -> dict:
    """`config` as DDPO's `to_dict()` gave it to the trackers (nested dicts flattened to `parent/child` keys), with
    values TensorBoard's hparams take: lists as comma-separated strings, trackers by name, other objects as `str`."""

    def loggable(item):
        if item is None or isinstance(item, bool | int | float | str):
            return item
        if isinstance(item, list | tuple):
            return ", ".join(str(loggable(element)) for element in item)
        return item.name if isinstance(item, GeneralTracker) else str(item)

    hyperparameters = {}

    def add(key: str, item) -> None:
        if isinstance(item, dict):
            for name, child in item.items():
                add(f"{key}/{name}", child)
        else:
            hyperparameters[key] = loggable(item)

    for config_field in fields(config):
        add(config_field.name, getattr(config, config_field.name))
    return hyperparameters
