"""A drop-in path for code written for TRL's `DDPOTrainer` (trl <= 0.23.1, removed in 0.24).

A DDPO script ports by changing its imports: `from trl_nft.ddpo import DDPOConfig, DDPOTrainer,
DefaultDDPOStableDiffusionPipeline`. Its `reward_function`, `prompt_function`, `image_samples_hook` and `log_with`
trackers keep working unchanged; the training underneath is DiffusionNFT (`DiffusionNFTTrainer`). Every public field,
method and attribute of TRL 0.23.1's `DDPOConfig`, `DDPOTrainer` and `DefaultDDPOStableDiffusionPipeline` exists here:
it does what it did, or, where DiffusionNFT has nothing like it (PPO's loss, DDPO's epoch-by-epoch `step`), raises an
error that names what to use instead. docs/ddpo_migration.md lists each name with its status.
"""

import contextlib
import functools
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, filter_trackers, get_available_trackers
from accelerate.utils import LoggerType, ProjectConfiguration
from datasets import Dataset
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.utils import is_bitsandbytes_available, is_torch_tf32_available

from .checkpointing import newest_whole_checkpoint
from .model_card import write_trainer_model_card
from .models.sd import StableDiffusionAdapter
from .nft_config import NFTConfig
from .nft_trainer import DiffusionNFTTrainer
from .policies import TRAINED_ADAPTER
from .policy_files import LORA_WEIGHTS_NAME, load_policy, save_policy
from .rewards import to_tensor


# The LoRA of DDPO's pipeline (`get_trainable_layers`), which `DDPOTrainer` trains as DDPO did.
DDPO_LORA_CONFIG = LoraConfig(
    r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
)


def _field(default, help: str):
    # `help` is what `HfArgumentParser` (TRL's example script parses DDPOConfig with it) shows for `--help`.
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DDPOConfig:
    """TRL 0.23.1's `DDPOConfig`: the same fields, defaults and methods, mapped onto `NFTConfig` by `to_nft_config()`.

    One DDPO epoch (sample `sample_num_batches_per_epoch` batches of `sample_batch_size` images per process, then train
    on them in micro-batches of `train_batch_size`, accumulating `train_gradient_accumulation_steps`) is one
    DiffusionNFT rollout with the same batches and as many optimizer steps. DDPO had no prompt groups: here each prompt
    is sampled `num_generations` times (the one field DDPO did not have; default: `sample_batch_size`, one group per
    sampled batch). docs/ddpo_migration.md gives each field's status.
    """

    exp_name: str = _field(os.path.basename(sys.argv[0]).removesuffix(".py"), "Name of this experiment.")
    run_name: str = _field("", "Name of this run.")
    seed: int = _field(0, "Random seed.")
    # As accelerate's `Accelerator(log_with=...)`: a tracker name, a list of names, `GeneralTracker` instances, or a
    # mixture. Annotated `str | None` so that `HfArgumentParser` can parse `--log_with`.
    log_with: str | None = _field(
        None, "Trackers, as accelerate's `Accelerator(log_with=...)`: 'tensorboard', 'wandb'."
    )
    tracker_kwargs: dict = _field({}, "Keyword arguments of the trackers, keyed by tracker name.")
    accelerator_kwargs: dict = _field({}, "Keyword arguments for the accelerator (only `project_dir` is used).")
    project_kwargs: dict = _field({}, "Keyword arguments for accelerate's ProjectConfiguration (e.g. `logging_dir`).")
    tracker_project_name: str = _field("trl", "Name of project to use for tracking.")
    logdir: str = _field("logs", "Output directory (checkpoints) when project_kwargs sets no project_dir.")
    num_epochs: int = _field(100, "Number of epochs to train.")
    save_freq: int = _field(1, "Number of epochs between saving model checkpoints.")
    num_checkpoint_limit: int = _field(5, "Number of checkpoints to keep before overwriting old ones.")
    mixed_precision: str = _field("fp16", "Mixed precision training: 'no', 'fp16' or 'bf16' (on CUDA).")
    allow_tf32: bool = _field(True, "Allow `tf32` on Ampere GPUs.")
    resume_from: str = _field("", "Resume training from a checkpoint (or the newest checkpoint in a folder).")
    sample_num_steps: int = _field(50, "Number of sampler inference steps.")
    sample_eta: float = _field(1.0, "Eta parameter for the DDIM sampler (DiffusionNFT samples with eta 0).")
    sample_guidance_scale: float = _field(5.0, "Classifier-free guidance weight.")
    sample_batch_size: int = _field(1, "Batch size (per GPU) to use for sampling.")
    sample_num_batches_per_epoch: int = _field(2, "Number of batches to sample per epoch.")
    train_batch_size: int = _field(1, "Batch size (per GPU) to use for training.")
    train_use_8bit_adam: bool = _field(False, "Use 8bit Adam optimizer from bitsandbytes.")
    train_learning_rate: float = _field(3e-4, "Learning rate.")
    train_adam_beta1: float = _field(0.9, "Adam beta1.")
    train_adam_beta2: float = _field(0.999, "Adam beta2.")
    train_adam_weight_decay: float = _field(1e-4, "Adam weight decay.")
    train_adam_epsilon: float = _field(1e-8, "Adam epsilon.")
    train_gradient_accumulation_steps: int = _field(1, "Number of gradient accumulation steps.")
    train_max_grad_norm: float = _field(1.0, "Maximum gradient norm for gradient clipping.")
    train_num_inner_epochs: int = _field(1, "Number of inner epochs per outer epoch (no effect: see the docs).")
    train_cfg: bool = _field(True, "Whether to use classifier-free guidance during training (DiffusionNFT: never).")
    train_adv_clip_max: float = _field(5.0, "Clip advantages to the range.")
    train_clip_range: float = _field(1e-4, "PPO clip range (no effect: DiffusionNFT has no likelihood ratio).")
    train_timestep_fraction: float = _field(1.0, "Fraction of timesteps to train on.")
    per_prompt_stat_tracking: bool = _field(False, "Whether to normalise rewards per prompt.")
    per_prompt_stat_tracking_buffer_size: int = _field(16, "Per-prompt reward buffer size (no effect).")
    per_prompt_stat_tracking_min_count: int = _field(16, "Per-prompt reward buffer minimum (no effect).")
    async_reward_computation: bool = _field(False, "Whether to compute rewards asynchronously.")
    max_workers: int = _field(2, "Maximum number of workers for `compute_rewards(is_async=True)`.")
    negative_prompts: str = _field("", "Negative prompt for guided sampling (DiffusionNFT: the empty prompt).")
    push_to_hub: bool = _field(False, "Whether to push the final model checkpoint to the Hub.")
    # Not in DDPO: images per prompt group (None: `sample_batch_size`, or with one image per batch the epoch's images).
    num_generations: int | None = _field(None, "Images per prompt group (None: sample_batch_size).")

    def __post_init__(self):
        if self.train_use_8bit_adam and not is_bitsandbytes_available():  # DDPO's check, word for word
            raise ImportError(
                "You need to install bitsandbytes to use 8bit Adam. "
                "You can install it with `pip install bitsandbytes`."
            )

    def to_dict(self) -> dict:
        """The fields, nested dicts flattened to `parent/child` keys, as DDPO's `to_dict()` (what trackers store)."""
        flat = {}

        def add(key: str, value) -> None:
            if isinstance(value, dict):
                for name, child in value.items():
                    add(f"{key}/{name}", child)
            else:
                flat[key] = value

        for name, value in self.__dict__.items():
            add(name, value)
        return flat

    def to_nft_config(self) -> NFTConfig:
        """The equivalent `NFTConfig` (docs/ddpo_migration.md lists every mapping). Settings DiffusionNFT cannot take
        as they are get the nearest working one, and fields it has no use for are ignored; one warning lists both."""
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is invalid: use 'no', 'fp16' or 'bf16'.")
        notes = []
        batches, num_generations = self.sample_num_batches_per_epoch, self.num_generations
        if num_generations is None and self.sample_batch_size * batches == 1:
            batches = 2
            notes.append(
                "sample_num_batches_per_epoch=1 -> 2: with sample_batch_size=1 an epoch would sample one image, and "
                "DiffusionNFT compares at least two images of a prompt"
            )
        images = self.sample_batch_size * batches  # per process and epoch
        _check_batch_sizes(
            self.sample_batch_size, self.train_batch_size, images, self.train_gradient_accumulation_steps
        )
        if num_generations is None:
            num_generations = self.sample_batch_size if self.sample_batch_size > 1 else images
            notes.append(
                f"prompt_function is called once per group of num_generations={num_generations} images of one prompt "
                "(DDPO: once per image), since DiffusionNFT compares the images of a prompt; set "
                "DDPOConfig(num_generations=...) to choose the group size"
            )
        if self.sample_eta != 0:
            notes.append(
                f"sample_eta={self.sample_eta} -> 0: DiffusionNFT samples with deterministic DDIM (DDPO needed noise "
                "for its log-probabilities)"
            )
        if self.train_cfg:
            notes.append(
                "train_cfg=True -> False: DiffusionNFT trains the conditional prediction; sample_guidance_scale still "
                "guides the sampling"
            )
        cuda = torch.cuda.is_available()
        if self.mixed_precision != "no" and not cuda:
            notes.append(f"mixed_precision={self.mixed_precision!r} -> 'no': without CUDA this run is float32")
        defaults = {config_field.name: config_field.default for config_field in fields(self)}
        for name, reason in _WITHOUT_COUNTERPART.items():
            if getattr(self, name) != defaults[name]:
                notes.append(f"{name}={getattr(self, name)!r} has no effect: {reason}")
        for kwargs_name, used in (("accelerator_kwargs", _USED_ACCELERATOR_KWARGS), ("project_kwargs", _USED_PROJECT)):
            unused = sorted(set(getattr(self, kwargs_name)) - used)
            if unused:
                notes.append(
                    f"{kwargs_name} {unused} have no effect: the Trainer builds its accelerator from the training "
                    "arguments (NFTConfig's accelerator_config)"
                )
        if notes:
            _warn_at_caller("DDPOConfig settings that DiffusionNFT runs differently:\n- " + "\n- ".join(notes))

        steps_per_epoch = images // (self.train_batch_size * self.train_gradient_accumulation_steps)
        project = _project_configuration(self)
        output_dir = project.project_dir or self.logdir
        return NFTConfig(
            output_dir=output_dir,
            run_name=self.run_name or self.exp_name,
            seed=self.seed,
            # `log_with` goes to accelerate's trackers, as in DDPO (`DDPOTrainer` sets them up). transformers' own
            # integrations stay off: for the same tracker they would start a second run (a second `wandb.init`, a
            # second TensorBoard writer logging the same scalars to another folder).
            report_to="none",
            logging_steps=1,  # DDPO logged every optimizer step
            max_steps=self.num_epochs * steps_per_epoch,
            save_steps=self.save_freq * steps_per_epoch,
            save_total_limit=self.project_kwargs.get("total_limit") or self.num_checkpoint_limit,
            fp16=cuda and self.mixed_precision == "fp16",
            bf16=cuda and self.mixed_precision == "bf16",
            tf32=self.allow_tf32 and is_torch_tf32_available() or None,  # DDPO: "on Ampere GPUs"
            resume_from_checkpoint=_resume_checkpoint(self.resume_from),
            num_inference_steps=self.sample_num_steps,
            guidance_scale=self.sample_guidance_scale,
            sampler="DDIMScheduler",  # DDPO sampled with DDIM
            per_device_rollout_batch_size=self.sample_batch_size,
            per_device_train_batch_size=self.train_batch_size,
            steps_per_generation=images // self.train_batch_size,
            gradient_accumulation_steps=self.train_gradient_accumulation_steps,
            num_generations=num_generations,
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


# DDPOConfig fields DiffusionNFT has no use for, and why (warned about when set away from DDPO's default).
_WITHOUT_COUNTERPART = {
    "train_clip_range": "PPO's ratio clip; DiffusionNFT has no likelihood ratio",
    "train_num_inner_epochs": "DiffusionNFT trains once on each rollout",
    "per_prompt_stat_tracking_buffer_size": "rewards are normalised within each prompt group of the rollout",
    "per_prompt_stat_tracking_min_count": "rewards are normalised within each prompt group of the rollout",
    "max_workers": "training scores in one background thread (it sizes `compute_rewards(is_async=True)` only)",
    "negative_prompts": "guided sampling uses the empty negative prompt",
}
_USED_ACCELERATOR_KWARGS = {"project_dir"}
_USED_PROJECT = {"project_dir", "logging_dir", "total_limit", "automatic_checkpoint_naming"}


def _check_batch_sizes(sample_batch_size: int, train_batch_size: int, images: int, accumulation: int) -> None:
    """DDPO's `_config_check`, per process: an epoch's images split into whole optimizer steps."""
    if sample_batch_size < train_batch_size:
        raise ValueError(
            f"Sample batch size ({sample_batch_size}) must be greater than or equal to the train batch size "
            f"({train_batch_size}): lower train_batch_size or raise sample_batch_size."
        )
    if sample_batch_size % train_batch_size:
        raise ValueError(
            f"Sample batch size ({sample_batch_size}) must be divisible by the train batch size ({train_batch_size})."
        )
    if images % (train_batch_size * accumulation):
        raise ValueError(
            f"Number of samples per epoch ({images}) must be divisible by the total train batch size "
            f"({train_batch_size * accumulation} = train_batch_size x train_gradient_accumulation_steps)."
        )


def _resume_checkpoint(resume_from: str) -> str | None:
    """DDPO's `resume_from`: a checkpoint folder, or a folder of checkpoints (its newest)."""
    if not resume_from:
        return None
    resume_from = os.path.normpath(os.path.expanduser(resume_from))
    folder = os.path.isdir(resume_from)
    if os.path.basename(resume_from).startswith("checkpoint_") or (
        folder and any(name.startswith("checkpoint_") for name in os.listdir(resume_from))
    ):
        raise ValueError(
            f"resume_from={resume_from!r} holds checkpoints of TRL's DDPOTrainer (accelerate's save_state), which "
            "DiffusionNFT cannot resume. Start a new run from a checkpoint's LoRA instead: "
            "`pipeline.sd_pipeline.load_lora_weights(<its checkpoint_N folder>)` before building the DDPOTrainer, "
            "which then trains that LoRA further."
        )
    return (newest_whole_checkpoint(resume_from) or resume_from) if folder else resume_from


@dataclass
class DDPOPipelineOutput:
    """What DDPO's pipeline call returns: the images, the DDIM trajectory (the initial latents, then each step's) and
    the log-probability of each step."""

    images: torch.Tensor
    latents: list[torch.Tensor]
    log_probs: list[torch.Tensor]


@dataclass
class DDPOSchedulerOutput:
    """What DDPO's `scheduler_step` returns: the sample at the previous timestep and its log-probability."""

    latents: torch.Tensor
    log_probs: torch.Tensor


class DDPOStableDiffusionPipeline:
    """TRL's base class of DDPO pipelines. `DDPOTrainer` trains a diffusers pipeline (`sd_pipeline`):
    `DefaultDDPOStableDiffusionPipeline` is the implementation."""


class DefaultDDPOStableDiffusionPipeline(DDPOStableDiffusionPipeline):
    """DDPO's pipeline: a `StableDiffusionPipeline` (SD1.x / SD2.x) loaded with `from_pretrained`, DDIM as its
    scheduler, its safety checker off, and a LoRA when `use_lora` (DDPO's: rank 4, alpha 4; `use_lora=False` fine-tunes
    the whole UNet). As in DDPO, a LoRA saved beside the pipeline (`pytorch_lora_weights.safetensors`, which
    `save_pretrained` writes) is loaded with it, and training continues it.

    Once a `DDPOTrainer` is built on it, this object shows the model being trained, as in DDPO: `unet`, sampling and
    `save_checkpoint` use the trained weights, `save_pretrained` the run's result (their EMA when the trainer keeps one,
    as `trainer.save_model()`).
    """

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True):
        pipeline = StableDiffusionPipeline.from_pretrained(pretrained_model_name, revision=pretrained_model_revision)
        try:
            pipeline.load_lora_weights(
                pretrained_model_name, weight_name=LORA_WEIGHTS_NAME, revision=pretrained_model_revision
            )
        except OSError:  # no LoRA beside the pipeline
            pass
        self._setup(pipeline, use_lora, pretrained_model_name, pretrained_model_revision)
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.safety_checker = None
        pipeline.vae.requires_grad_(False)
        pipeline.text_encoder.requires_grad_(False)
        pipeline.unet.requires_grad_(not self.use_lora)

    @classmethod
    def _wrapping(cls, pipeline: StableDiffusionPipeline) -> "DefaultDDPOStableDiffusionPipeline":
        """This class around a pipeline passed to `DDPOTrainer` as it is (the trainer sets its own sampler)."""
        wrapper = cls.__new__(cls)
        wrapper._setup(pipeline, True, pipeline.name_or_path, "main")
        return wrapper

    def _setup(self, pipeline: StableDiffusionPipeline, use_lora: bool, name: str, revision: str) -> None:
        # A LoRA on the UNet (loaded with the pipeline) turns LoRA on, as in DDPO.
        self.sd_pipeline, self.use_lora = pipeline, use_lora or bool(getattr(pipeline.unet, "peft_config", None))
        self.pretrained_model, self.pretrained_revision = name, revision
        self._trainer: DDPOTrainer | None = None  # set by the DDPOTrainer that trains this pipeline

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
    ) -> DDPOPipelineOutput:
        """DDPO's sampling, with its arguments: the pipeline's own call, each DDIM step taken by `scheduler_step` (its
        noise from the global generator, as in DDPO). Returns the images, the trajectory and each step's
        log-probability (`return_dict` is ignored, as in DDPO)."""
        trajectory, log_probs = [], []

        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            output = self.scheduler_step(model_output, timestep, sample, eta)
            trajectory.extend([sample, output.latents] if not trajectory else [output.latents])
            log_probs.append(output.log_probs)
            return DDIMSchedulerOutput(output.latents, None) if return_dict else (output.latents,)

        legacy_callback = {} if callback is None else {"callback": callback, "callback_steps": callback_steps}
        scheduler = self.sd_pipeline.scheduler
        scheduler.step = step
        try:
            images = self.sd_pipeline(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                output_type=output_type,
                cross_attention_kwargs=cross_attention_kwargs,
                guidance_rescale=guidance_rescale,
                **legacy_callback,
            ).images
        finally:
            del scheduler.step  # the class's method again
        return DDPOPipelineOutput(images, trajectory, log_probs)

    def rgb_with_grad(self, *args, **kwargs) -> DDPOPipelineOutput:
        raise NotImplementedError(
            "rgb_with_grad is AlignProp's differentiable sampling (TRL's AlignPropTrainer, also removed in trl 0.24). "
            "DiffusionNFT needs no gradient through the sampler: pass your reward to DDPOTrainer as its "
            "reward_function (or to DiffusionNFTTrainer), and sample images with `pipeline(...)` or "
            "`pipeline.sd_pipeline(...)`."
        )

    def scheduler_step(self, *args, **kwargs) -> DDPOSchedulerOutput:
        """DDPO's DDIM step with its log-probability (`ddim_step_with_log_prob`) on this pipeline's scheduler."""
        return ddim_step_with_log_prob(self.sd_pipeline.scheduler, *args, **kwargs)

    @property
    def unet(self):
        return self.sd_pipeline.unet

    @property
    def vae(self):
        return self.sd_pipeline.vae

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer

    @property
    def scheduler(self):
        return self.sd_pipeline.scheduler

    @property
    def text_encoder(self):
        return self.sd_pipeline.text_encoder

    @property
    def autocast(self):
        return contextlib.nullcontext if self.use_lora else None

    def set_progress_bar_config(self, *args, **kwargs):
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

    def get_trainable_layers(self):
        """The UNet, whose trainable parameters are the LoRA's (or all, without LoRA). Before a trainer is built, as
        in DDPO, this adds DDPO's LoRA (which the trainer then trains); once it is built, the trained UNet as it is."""
        if self.use_lora and self._trainer is None and _lora_adapter(self.unet) is None:
            self.unet.add_adapter(DDPO_LORA_CONFIG, adapter_name=TRAINED_ADAPTER)
            for param in self.unet.parameters():
                if param.requires_grad:  # the LoRA in float32, as DDPO upcast it for fp16 training
                    param.data = param.to(torch.float32)
        return self.unet

    def save_pretrained(self, output_dir: str) -> None:
        """As DDPO: the pipeline (`StableDiffusionPipeline.from_pretrained(output_dir)`) with, when `use_lora`, the
        LoRA beside it in diffusers' format (`pytorch_lora_weights.safetensors`: `load_lora_weights(output_dir)`,
        or `DefaultDDPOStableDiffusionPipeline(output_dir)` for both). The UNet is written without its LoRA layers
        (DDPO wrote them into it, so that the folder reloaded with random attention weights)."""
        with self._trainer.policies.evaluation_weights() if self._trainer is not None else contextlib.nullcontext():
            if self.use_lora and _lora_adapter(self.unet) is not None:
                self.save_checkpoint([self.unet], [], output_dir)
            components = {**self.sd_pipeline.components, "unet": _without_lora(self.unet)}
            requires_safety_checker = self.sd_pipeline.config.get("requires_safety_checker", False)
            pipeline = type(self.sd_pipeline)(**components, requires_safety_checker=requires_safety_checker)
            pipeline.save_pretrained(output_dir)

    def save_checkpoint(self, models: list, weights: list, output_dir: str) -> None:
        """DDPO's accelerate save hook: `models[0]`'s trained LoRA to `output_dir` (diffusers' format), or without
        LoRA the whole UNet to `output_dir/unet`."""
        self._policy_files(models, output_dir, save_policy)

    def load_checkpoint(self, models: list, input_dir: str) -> None:
        """DDPO's accelerate load hook: what `save_checkpoint` wrote, into `models[0]` (its trained LoRA, which
        `get_trainable_layers()` adds, or the whole UNet)."""
        self._policy_files(models, input_dir, load_policy)

    def _policy_files(self, models: list, directory: str, operation: Callable) -> None:
        if len(models) != 1:
            raise ValueError("Given how the trainable params were set, this should be of length 1")
        model = models[0]
        adapter = self._trainer.adapter if self._trainer is not None else StableDiffusionAdapter(self.sd_pipeline)
        adapter_name = _lora_adapter(model) if self.use_lora else None
        if self.use_lora and adapter_name is None:
            raise ValueError(
                f"{type(model).__name__} has no LoRA to {operation.__name__.split('_')[0]}: call "
                "`get_trainable_layers()` first (it adds DDPO's), or pass the UNet of a pipeline a DDPOTrainer trains."
            )
        lora_config = model.peft_config[adapter_name] if adapter_name else None
        if operation is save_policy:
            save_policy(model, adapter_name, directory, adapter, lora_config)
        else:
            load_policy(model, adapter_name, directory, directory, adapter, lora_config is not None)


def _lora_adapter(unet: torch.nn.Module) -> str | None:
    """The LoRA adapter of `unet` that DDPO's methods act on: the trained one, else the only one (a LoRA loaded with
    the pipeline); None without one."""
    adapters = list(getattr(unet, "peft_config", {}))
    return TRAINED_ADAPTER if TRAINED_ADAPTER in adapters else adapters[0] if len(adapters) == 1 else None


def _without_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """`unet` without its LoRA layers (a model sharing its base weights, built without allocating any), or `unet`
    itself when it has none."""
    if not getattr(unet, "peft_config", None):
        return unet
    state_dict = {
        name.replace(".base_layer.", "."): value for name, value in unet.state_dict().items() if ".lora_" not in name
    }
    with torch.device("meta"):
        base = type(unet).from_config(unet.config)
    base.load_state_dict(state_dict, assign=True)
    return base


def ddim_step_with_log_prob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
) -> DDPOSchedulerOutput:
    r"""TRL 0.23.1's `scheduler_step` (DDPO's DDIM step), on a batch of timesteps: the DDIM posterior of eq. (12) and
    (16) of the DDIM paper (arXiv 2010.02502),

        x_{t-1} = sqrt(alpha_{t-1}) x0_pred + sqrt(1 - alpha_{t-1} - sigma_t^2) eps_pred + sigma_t z,
        sigma_t = eta sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t-1}),

    sampled (or `prev_sample` given), with the Gaussian log-density of `x_{t-1}`, averaged over all but the batch axis.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError(
            "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
        )
    timestep = torch.as_tensor(timestep)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, scheduler.config.num_train_timesteps - 1)  # as DDPO: no final alpha

    def at(timesteps: torch.Tensor) -> torch.Tensor:  # alpha_t, broadcast from the batch axis onto `sample`
        alpha = scheduler.alphas_cumprod.gather(0, timesteps.cpu().reshape(-1)).reshape(timesteps.shape)
        return alpha.reshape(alpha.shape + (1,) * (sample.ndim - alpha.ndim)).to(sample.device)

    alpha_prod_t, alpha_prod_t_prev = at(timestep), at(prev_timestep)
    beta_prod_t = 1 - alpha_prod_t
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise ValueError(
            f"prediction_type given as {prediction_type} must be one of `epsilon`, `sample`, or `v_prediction`"
        )
    if scheduler.config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif scheduler.config.clip_sample:
        clip = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-clip, clip)

    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5
    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    prev_sample_mean = (
        alpha_prod_t_prev**0.5 * pred_original_sample + (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    )

    if prev_sample is not None and generator is not None:
        raise ValueError(
            "Cannot pass both generator and prev_sample. Please make sure that either `generator` or"
            " `prev_sample` stays `None`."
        )
    if prev_sample is None:
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2)
        - torch.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(np.pi)))
    )
    return DDPOSchedulerOutput(prev_sample.type(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim))))


class DDPOTrainer(DiffusionNFTTrainer):
    """DiffusionNFT behind DDPO's constructor: `DDPOTrainer(config, reward_function, prompt_function, sd_pipeline,
    image_samples_hook=None)`.

    - `reward_function(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`: `images` a float tensor
      `[B, 3, H, W]` in [0, 1], `rewards` a tensor, array or list with one value per image.
    - `prompt_function() -> (prompt, prompt_metadata)`: called once per prompt group, up front.
    - `image_samples_hook(prompt_image_data, global_step, tracker)`: called after each rollout with
      `[[images, prompts, prompt_metadata, rewards, reward_metadata]]`; `tracker` is the first of `log_with`'s
      trackers, started (`None` when nothing is logged).
    - `sd_pipeline`: a `DefaultDDPOStableDiffusionPipeline` (or a diffusers `StableDiffusionPipeline`), trained in
      place as in DDPO.

    `log_with`'s trackers are set up as DDPO's `Accelerator` set them up, on `self.accelerator`: its `trackers`, `log`,
    `get_tracker` and `end_training` work on them, and the trainer's logs (reward, loss, ...) reach them
    (docs/ddpo_migration.md, "Trackers"). DDPO's attributes (`config`, `prompt_fn`, `reward_fn`, `sd_pipeline`,
    `optimizer`, `trainable_layers`, ...) and methods (`train(epochs)`, `compute_rewards`, `save_pretrained`,
    `push_to_hub(repo_id)`, ...) are here; `step`, `calculate_loss` and `loss` (PPO's) raise an error that says what
    to use.
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
        if isinstance(sd_pipeline, StableDiffusionPipeline):
            sd_pipeline = DefaultDDPOStableDiffusionPipeline._wrapping(sd_pipeline)
        elif not isinstance(sd_pipeline, DefaultDDPOStableDiffusionPipeline):
            raise TypeError(
                f"sd_pipeline is a {type(sd_pipeline).__name__}: give a DefaultDDPOStableDiffusionPipeline or a "
                "diffusers StableDiffusionPipeline (DiffusionNFTTrainer trains other model families)."
            )
        args = config.to_nft_config()
        self.config, self.sd_pipeline, self.image_samples_callback = config, sd_pipeline, image_samples_hook
        self.prompt_fn, self.reward_fn = prompt_function, reward_function
        self._sample_batches: list[list] = []  # what DDPO handed to image_samples_hook: one entry per batch
        self._prompts, self._prompt_metadata = [], []
        peft_config, self._initial_lora = _lora_to_train(sd_pipeline)
        args.use_peft = sd_pipeline.use_lora

        def reward(images, prompts, ddpo_prompt_index, **kwargs):
            return self._score_with_ddpo_reward(images, prompts, ddpo_prompt_index)

        reward.__name__ = getattr(reward_function, "__name__", "reward")  # metrics are named after the function
        super().__init__(
            model=sd_pipeline.sd_pipeline,
            reward_funcs=reward,
            args=args,
            train_dataset=self._draw_prompts(config.num_epochs * args.prompts_per_rollout),
            peft_config=peft_config,
        )
        # The pipeline object shows the model being trained, as in DDPO.
        sd_pipeline.sd_pipeline, sd_pipeline._trainer = self.pipeline, self
        self._tracker = self._init_trackers(config)
        self.num_train_timesteps = max(1, int(config.sample_num_steps * config.train_timestep_fraction))
        self.autocast = sd_pipeline.autocast or self.accelerator.autocast
        self.trainable_layers = self.policies.trained if self.policies.use_lora else self.model
        if config.async_reward_computation:
            self.executor = ThreadPoolExecutor(max_workers=config.max_workers)
        self.first_epoch = 0
        if args.resume_from_checkpoint is not None:
            state = TrainerState.load_from_json(os.path.join(args.resume_from_checkpoint, TRAINER_STATE_NAME))
            self.first_epoch = state.global_step // args.optimizer_steps_per_rollout
        if not self.is_fsdp_enabled:  # DDPO built its optimizer up front (FSDP must wrap the model first)
            self.create_optimizer()

    # ------------------------------------------------------------------ DDPO's data

    def _draw_prompts(self, count: int) -> Dataset:
        """`count` prompts (one per prompt group), drawn as DDPO drew them, from `prompt_function`; those drawn
        before are kept."""
        for _ in range(count - len(self._prompts)):
            prompt, metadata = self.prompt_fn()
            self._prompts.append(prompt)
            self._prompt_metadata.append(metadata)
        return Dataset.from_dict({"prompt": self._prompts, "ddpo_prompt_index": list(range(len(self._prompts)))})

    def _setup_policies(self, args: NFTConfig, peft_config: LoraConfig | None) -> None:
        super()._setup_policies(args, peft_config)
        if self._initial_lora is not None:  # the LoRA the pipeline came with: training continues it
            set_peft_model_state_dict(self.adapter.denoiser, self._initial_lora, adapter_name=TRAINED_ADAPTER)
            self.policies.start_frozen_as_trained()

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
        output = self.reward_fn(pixels, list(prompts), metadata)
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
        if self.image_samples_callback is not None:
            self.image_samples_callback(self._sample_batches, self.state.global_step, self._tracker)
        return rollout

    # ------------------------------------------------------------------ DDPO's public methods

    def train(self, epochs: int | None = None, **kwargs):
        """DDPO's `train(epochs=None)`: train up to epoch `epochs` (default: `config.num_epochs`), from the checkpoint
        `resume_from` names, if any, as DDPO resumed. Keyword arguments go to `DiffusionNFTTrainer.train`."""
        if epochs is not None:
            if not isinstance(epochs, int) or isinstance(epochs, bool):
                raise TypeError(
                    f"train(epochs={epochs!r}): epochs is a number of epochs (DDPO's argument); resume with "
                    "train(resume_from_checkpoint=...) or DDPOConfig(resume_from=...)."
                )
            self.args.max_steps = epochs * self.args.optimizer_steps_per_rollout
            self.train_dataset = self._draw_prompts(epochs * self.args.prompts_per_rollout)
        kwargs.setdefault("resume_from_checkpoint", self.args.resume_from_checkpoint)
        return super().train(**kwargs)

    def compute_rewards(self, prompt_image_pairs: list, is_async: bool = False) -> tuple:
        """DDPO's: `reward_function` on each `(images, prompts, prompt_metadata)`, as `(rewards, reward_metadata)`
        tuples, one entry per pair (with `is_async`, in the `executor`'s threads)."""

        def call(pair):
            rewards, metadata = (_result(value) for value in self.reward_fn(*pair))
            return torch.as_tensor(rewards, device=self.accelerator.device), metadata

        if is_async:
            if not hasattr(self, "executor"):  # DDPO created it only then
                self.executor = ThreadPoolExecutor(max_workers=self.config.max_workers)
            return tuple(zip(*self.executor.map(call, prompt_image_pairs), strict=True))
        return tuple(zip(*map(call, prompt_image_pairs), strict=True))

    def step(self, epoch: int, global_step: int) -> int:
        raise NotImplementedError(
            "DDPOTrainer.step(epoch, global_step) ran one DDPO epoch; here the epochs run inside trainer.train() "
            "(transformers' training loop): call trainer.train(), or trainer.train(epochs) to stop at an epoch. For "
            "work between epochs, use image_samples_hook (called after each rollout) or a transformers.TrainerCallback "
            "(trainer.add_callback(...); each epoch ends at a multiple of "
            "trainer.args.optimizer_steps_per_rollout optimizer steps)."
        )

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        raise NotImplementedError(
            "calculate_loss is DDPO's PPO loss on a trajectory step; DiffusionNFT trains on the forward process and "
            "has no trajectories or log-probabilities. Its loss is trainer.compute_loss (the mathematics: "
            "trl_nft.objective.nft_loss)."
        )

    def loss(self, advantages: torch.Tensor, clip_range: float, ratio: torch.Tensor):
        raise NotImplementedError(
            "loss is PPO's clipped surrogate; DiffusionNFT has no likelihood ratio. Its loss is "
            "trl_nft.objective.nft_loss (trainer.compute_loss in training)."
        )

    @property
    def stat_tracker(self):
        raise AttributeError(
            "DDPO's per-prompt reward buffer (stat_tracker) has no counterpart: DiffusionNFT normalises each reward "
            "within its prompt group of the rollout (trl_nft.objective.group_advantages; scale_rewards="
            f"{self.args.scale_rewards!r} from per_prompt_stat_tracking)."
        )

    @functools.cached_property
    def neg_prompt_embed(self) -> torch.Tensor:
        """DDPO's text embedding of `negative_prompts` (`[1, 77, dim]`)."""
        tokens = self.sd_pipeline.tokenizer(
            self.config.negative_prompts,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.sd_pipeline.tokenizer.model_max_length,
        ).input_ids
        text_encoder = self.sd_pipeline.text_encoder
        with torch.no_grad():
            return text_encoder(tokens.to(text_encoder.device))[0]

    def save_pretrained(self, save_directory: str, *, repo_id: str | None = None, push_to_hub: bool = False, **kwargs):
        """As DDPO's (huggingface_hub's `PyTorchModelHubMixin`): `sd_pipeline.save_pretrained(save_directory)` and the
        model card; with `push_to_hub=True`, then uploaded to `repo_id` (default: the folder's name)."""
        if self.is_world_process_zero():
            self.sd_pipeline.save_pretrained(save_directory)
            write_trainer_model_card(self, save_directory)
            if push_to_hub:
                return self.push_to_hub(repo_id or os.path.basename(os.path.normpath(save_directory)), **kwargs)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Push model using huggingface_hub.",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        **kwargs,
    ):
        """As DDPO's (`PyTorchModelHubMixin.push_to_hub`): create `repo_id`, then upload what `save_pretrained`
        writes (the pipeline, its LoRA and the model card). transformers' `Trainer.push_to_hub(commit_message=...)`
        would take TRL's `trainer.push_to_hub(repo_id)` for a commit message."""
        if not self.is_world_process_zero():
            return None
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self.args.hub_model_id = repo_id  # the model card names it
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=directory,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns,
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise NotImplementedError(
            "A DDPOTrainer is not loaded from a folder or the Hub: load what it saved with "
            "DefaultDDPOStableDiffusionPipeline(repo_or_folder) (the pipeline and its LoRA) and build a DDPOTrainer "
            "on it to train further, or resume a run with DDPOConfig(resume_from=...)."
        )

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The model card `save_pretrained` writes, as a `huggingface_hub.ModelCard`."""
        with tempfile.TemporaryDirectory() as directory:
            write_trainer_model_card(self, directory)
            return ModelCard.load(os.path.join(directory, "README.md"))

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """DDPO's signature: the model card in `output_dir` (`dataset_name` is not shown: the prompts come from
        `prompt_function`)."""
        super().create_model_card(model_name=model_name, tags=tags)


def _lora_to_train(pipeline: DefaultDDPOStableDiffusionPipeline) -> tuple[LoraConfig | None, dict | None]:
    """The LoRA `DDPOTrainer` trains, as DDPO: the one the pipeline carries (loaded with it, or added by
    `get_trainable_layers()`), whose weights training starts from (it is taken off the UNet: the trainer adds its
    adapters with the same configuration), else DDPO's; None without LoRA."""
    unet = pipeline.unet
    adapters = dict(getattr(unet, "peft_config", {}))
    if len(adapters) > 1:
        raise ValueError(
            f"The UNet carries {len(adapters)} LoRA adapters ({', '.join(adapters)}); DDPOTrainer trains one. Fuse "
            "the others into the UNet first (`pipeline.sd_pipeline.fuse_lora(adapter_names=[...])`)."
        )
    if not adapters:
        return (DDPO_LORA_CONFIG if pipeline.use_lora else None), None
    ((name, config),) = adapters.items()
    weights = {
        key: value.detach().clone() for key, value in get_peft_model_state_dict(unet, adapter_name=name).items()
    }
    unet.delete_adapters(name)
    return config, weights


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


def _warn_at_caller(message: str) -> None:
    """`warnings.warn(message)` attributed to the first caller outside this package: the user's line."""
    package, level, frame = os.path.dirname(os.path.abspath(__file__)), 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, stacklevel=level)


def _result(value):
    """`value`, or a future's result (DDPO's asynchronous reward functions returned futures)."""
    return value.result() if isinstance(value, Future) else value


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
    """`config.to_dict()`, as DDPO gave it to the trackers, with values TensorBoard's hparams take: lists as
    comma-separated strings, trackers by name, other objects as `str`."""

    def loggable(item):
        if item is None or isinstance(item, bool | int | float | str):
            return item
        if isinstance(item, list | tuple):
            return ", ".join(str(loggable(element)) for element in item)
        return item.name if isinstance(item, GeneralTracker) else str(item)

    return {key: loggable(value) for key, value in config.to_dict().items()}
