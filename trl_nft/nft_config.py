"""Configuration of the `DiffusionNFTTrainer`."""

import contextlib
import contextvars
import functools
import inspect
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from .objective import DECAY_SCHEDULES, LOSS_TYPES, REWARD_SCALES
from .rewards.scoring import FAILURE_POLICIES
from .rewards.video import FRAME_AGGREGATIONS


# The processes of a launch that has not started them yet (`launching`): a rollout must divide into groups on them.
_LAUNCH_PROCESSES: contextvars.ContextVar[tuple[int | None] | None] = contextvars.ContextVar("launch", default=None)


@contextlib.contextmanager
def launching(processes: int | None) -> Iterator[None]:
    """Within this context, an `NFTConfig` checks that a rollout divides into groups of `num_generations` for a launch
    of `processes` processes, not for the running one (`trl nft` checks a config before accelerate starts them);
    `None`, a count not known yet, leaves that check to the training processes."""
    token = _LAUNCH_PROCESSES.set((processes,))
    try:
        yield
    finally:
        _LAUNCH_PROCESSES.reset(token)


@dataclass
class NFTConfig(TrainingArguments):
    r"""
    Configuration class for the [`DiffusionNFTTrainer`].

    Only the DiffusionNFT-specific parameters are listed here; see [`~transformers.TrainingArguments`] for the rest.
    Defaults follow the authors' released code for SD3.5-Medium where it differs from `TrainingArguments`.

    **Batch sizes** follow `GRPOTrainer`: `per_device_train_batch_size` counts *images*. One rollout (a paper
    "iteration") collects `per_device_train_batch_size x num_processes x steps_per_generation` images, i.e. that number
    divided by `num_generations` prompts, each sampled `num_generations` times; by default `steps_per_generation` is
    `gradient_accumulation_steps`, so that each rollout makes one optimizer step, as in the released code. The paper's
    iteration of 48 prompts x 24 images = 1152 images is, for example, `num_generations=24` with 8 GPUs,
    `per_device_train_batch_size=8` and `gradient_accumulation_steps=18`.

    > Parameters that control the model and the rollouts

    num_generations (`int`, *optional*, defaults to `8`):
        Group size `K`: images sampled per prompt. Advantages are computed within each group. The paper uses 24.
    steps_per_generation (`int` or `None`, *optional*, defaults to `None`):
        Micro-batches (of `per_device_train_batch_size` images per process) one rollout is split into, as in
        `GRPOConfig`. `None` is `gradient_accumulation_steps`: one optimizer step per rollout. `k` times
        `gradient_accumulation_steps` makes `k` optimizer steps on each rollout (on shuffled slices of it), all against
        the same old policy, which is soft-updated once per rollout; on a small model, where sampling is cheap next
        to the many optimizer steps needed, this learns faster per second.
    num_inference_steps (`int`, *optional*, defaults to `10`):
        Sampler steps per rollout. The training times are the rollout's own time grid.
    guidance_scale (`float`, *optional*, defaults to `1.0`):
        Guidance scale of the rollouts, as the model family understands it (docs/models.md): classifier-free guidance
        for SD3, SD1.x, SDXL, FLUX.2-klein base, Z-Image and Qwen-Image (its `true_cfg_scale`), where `1.0` samples
        CFG-free, as DiffusionNFT is designed to; the guidance embedding of a guidance-distilled FLUX.1-dev, which the
        training forwards take too; step-distilled models (FLUX.1-schnell, FLUX.2-klein) take none (only `1.0`).
        Training itself is always CFG-free.
    resolution (`int` or `None`, *optional*, defaults to `None`):
        Side of the square images, in pixels. `None` uses the model's native resolution; the paper uses 512.
    sampler (`str`, `diffusers.SchedulerMixin` or `None`, *optional*, defaults to `None`):
        Rollout sampler: a diffusers scheduler class name or instance. `None` takes the model family's default, a
        2nd-order deterministic multistep solver as in the paper: DPM-Solver++(2M) (`"DPMSolverMultistepScheduler"`),
        or UniPC (`"UniPCMultistepScheduler"`) for Qwen-Image and Z-Image, whose pipelines DPM-Solver cannot follow.
        Non-flow-matching
        classes are switched to flow sigmas.
    sampler_kwargs (`dict` or `None`, *optional*, defaults to `None`):
        Overrides of the sampler's config, e.g. `{"solver_order": 1}` for a 1st-order solver.
    max_sequence_length (`int`, *optional*, defaults to `128`):
        Maximum prompt length in tokens of the family's long text encoder (T5 for SD3 and FLUX.1, Qwen2.5-VL for
        Qwen-Image, Qwen3 for FLUX.2-klein and Z-Image), capped at what its tokenizer and pipeline take; CLIP-only
        families (SD1.x, SDXL) ignore it. FLUX.1 and FLUX.2-klein pad every prompt to it.
    num_frames (`int` or `None`, *optional*, defaults to `None`):
        Frames per video, for video models (Wan 2.1: `4 k + 1`); `None` takes the model's default. Image models take
        none: setting it for one is an error.
    per_device_rollout_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Images each process samples (and decodes and scores) at a time during rollouts; `None` is
        `per_device_train_batch_size`. Sampling holds no activations for backward, so it usually fits a larger batch
        than training. It changes neither the rollout's size nor its images: each image's noise is its own.
    prompt_embedding_cache_size (`int`, *optional*, defaults to `0`):
        Keep the text conditioning of up to this many prompts (the least recently used dropped first), so that a
        prompt met again in a later rollout or evaluation is not encoded again; `0` encodes every rollout's prompts.
        Each prompt costs its conditioning's size on the device (SD3.5: 205 tokens x 4096 in bf16, about 1.7 MB;
        twice that with CFG). Qwen-Image and Z-Image refuse it: they pad a prompt to the longest of its batch, so its
        encoding depends on the other prompts.
    offload_text_encoders_and_vae (`bool`, *optional*, defaults to `False`):
        Keep the text encoders and the VAE in CPU memory while the policy trains, moving them to the accelerator for
        each rollout and evaluation only (once each way per rollout). Frees their weights for the training's
        activations (SD3.5-Medium: T5-XXL's 9.5 GB); costs the transfers (SD3.5-Medium: 11 GB each way per rollout,
        an estimated 1-2 s over PCIe 4).
    torch_compile (`bool`, *optional*, defaults to `False`):
        Compile the denoiser's repeated blocks in place with `torch.compile` (`torch_compile_backend`,
        `torch_compile_mode`; regional compilation: seconds, not minutes), instead of `TrainingArguments`' compile of
        the training forward alone: the rollouts, the old and reference forwards and the training forward all run
        the compiled blocks. Each policy switch (trained, old, no adapter) compiles once, in the first step.

    > Parameters that control memory (see docs/memory.md and `trl-nft estimate-memory`)

    quantization (`str` or `None`, *optional*, defaults to `None`):
        Load the frozen denoiser quantized, through diffusers' quantization configs, and train LoRA adapters on it
        (`trl_nft.quantization`): `"nf4"` or `"int8"` (bitsandbytes, CUDA GPU), `"int8-weight-only"` (torchao, CPU
        and GPU), `"fp8-weight-only"` (torchao; on a GPU, compute capability 8.9 or newer) or `"gguf"` (the
        `gguf_file` checkpoint). The old adapter and the reference (adapters off) run on the same quantized weights.
        `"int8-dynamic"` is accepted here and refused by the trainer (its outputs carry no gradient), as are
        bitsandbytes without a CUDA GPU and `use_peft=False`. `None`: the weights in the mixed-precision dtype.
    gguf_file (`str` or `None`, *optional*, defaults to `None`):
        With `quantization="gguf"` (and only then): the `.gguf` file of the denoiser, as diffusers' `from_single_file`
        loads it (e.g. a Q4_0 or Q8_0 FLUX.1-dev); the other components come from `model`.
    quantize_text_encoders (`bool`, *optional*, defaults to `False`):
        Quantize the text encoders with the same method (not with `"gguf"`, whose file holds the denoiser only).

    reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
        Weight of each reward function in the summed reward. `None` weighs every function `1.0`.
    scale_rewards (`str`, *optional*, defaults to `"batch"`):
        Denominator `Z` of the advantage `(R - group mean) / Z`: `"batch"` is the std of all rewards of the iteration
        across all processes (the released code's global std), `"group"` each group's std, `"none"` no scaling.
    advantage_clip (`float`, *optional*, defaults to `5.0`):
        `A_max` in `r = 0.5 + 0.5 clip(A / A_max, -1, 1)`; advantages beyond it saturate `r` at 0 or 1.
    group_filter_min_reward_std (`float` or `None`, *optional*, defaults to `None`):
        Groups whose rewards spread less than this (population std of the combined reward) train nothing: their
        samples get weight 0 in the policy loss (Edit-R1 drops groups with std < 0.05 on its [0, 1] judge score, where
        a near-flat group's ranking is mostly the judge's noise). `None`: no such filter. In the combined reward's
        units (after `reward_weights`), on the rewards of all processes.
    group_filter_max_reward_mean (`float` or `None`, *optional*, defaults to `None`):
        Groups whose mean reward exceeds this train nothing (Edit-R1: mean > 0.9, prompts already solved). `None`: no
        such filter. Logged with the other: `frac_groups_filtered`.
    overlap_reward_scoring (`bool`, *optional*, defaults to `False`):
        Score each chunk of `per_device_rollout_batch_size` rollout images in a background thread while the next chunk
        is sampled. Worth it when rewards are slow on the CPU or remote (a reward server, a VLM judge). Results are
        identical either way: every chunk is scored on its own in both modes.
    video_reward_frames (`int` or `None`, *optional*, defaults to `None`):
        How image rewards score a video (docs/rewards.md, "Rewards on videos"): this many evenly spaced frames of it
        (the first and the last included), each as an image; `None` scores every frame. Video-aware rewards (a
        `videos` parameter) receive whole videos instead.
    video_reward_aggregation (`str`, *optional*, defaults to `"mean"`):
        How the scores of a video's frames make its reward: `"mean"` or `"min"` (the worst frame).
    reward_failure_policy (`str`, *optional*, defaults to `"fail"`):
        What a reward that raises, times out or returns a non-finite value does (docs/reliability.md): `"fail"` stops
        the run with an error naming it; `"retry"` retries a call that raised or timed out `reward_retries` times with
        backoff, then stops; `"drop"` retries likewise, then drops the samples it could not score (and those scored
        non-finite) from the update, counted in `faults/dropped_samples`. Nothing is ever scored 0 silently.
    reward_retries (`int`, *optional*, defaults to `3`):
        Retries of a failed reward call under the `"retry"` and `"drop"` policies (logged as `faults/reward_retries`).
    reward_retry_backoff (`float`, *optional*, defaults to `1.0`):
        Seconds before the first retry; the wait doubles at each retry.
    reward_timeout (`float` or `None`, *optional*, defaults to `None`):
        Seconds a reward call may take before it counts as failed; `None` waits for ever. (A remote reward has its own
        request timeout as well.)

    > Parameters that control the NFT update

    nft_beta (`float`, *optional*, defaults to `1.0`):
        NFT strength: the implicit policies are `v_old ± nft_beta (v_theta - v_old)`. Near 1 is stable; the released
        OCR and multi-reward runs use 0.1, which learns faster.
    beta (`None`):
        Not a setting: an old name of `nft_beta`, and in `GRPOConfig` the KL coefficient (here `kl_coef`). Any value
        is refused with a message naming both, so that a GRPO user's `--beta 0.04` does not silently change the
        method 25-fold.
    kl_coef (`float`, *optional*, defaults to `1e-4`):
        Weight of the penalty `mean((v_theta - v_ref)^2)` toward the frozen base model. `0.0` skips the reference
        forward pass entirely.
    velocity_norm_penalty (`float`, *optional*, defaults to `0.0`):
        Weight `w` of NormGuard's hinge on velocity-norm inflation: the loss adds
        `w * mean_b relu(||v_theta|| - (1 + m) ||v_ref||)^2` (`m` = `velocity_norm_margin`; norms are a sample's RMS
        over its latent elements), against the old policy's `v_old` instead of `v_ref` when `kl_coef` is 0. It acts
        only when the policy's velocity norm exceeds the anchor's; logged as `loss/velocity_norm` (the hinge's mean,
        before `w`). `0.0`: off.
    velocity_norm_margin (`float`, *optional*, defaults to `0.0`):
        Margin `m` of the velocity-norm hinge: the policy's norm may exceed the anchor's by this fraction for free.
    reference_refresh_steps (`int`, *optional*, defaults to `0`):
        Every this many optimizer steps the reference of the KL penalty becomes the current policy (GARDO's refreshed
        reference): the penalty then bounds the drift since the last refresh, not from the base model. With LoRA, a
        third adapter `"ref"` (never merged into the base; the saved LoRA holds the trained adapter only); fully
        fine-tuned, the reference copy. Needs `kl_coef > 0`. `0`: off (the reference is the base model).
    loss_type (`str`, *optional*, defaults to `"x0_adaptive"`):
        `"x0_adaptive"`: the released code's x0-space regression with adaptive weighting (stable); `"velocity"`: the
        paper's plain velocity loss.
    negative_loss (`bool`, *optional*, defaults to `True`):
        Keep the negative policy's term `(1 - r) L_neg` of the loss. `False` is the paper's ablation: the positive
        term alone, with which the reward collapses. For studying the method, not for training.
    train_timestep_fraction (`float`, *optional*, defaults to `0.99`):
        Fraction of the rollout's time grid trained on, a fresh random subset per image (9 of 10 steps by default).
    old_policy_decay_schedule (`str`, *optional*, defaults to `"linear"`):
        Decay `eta` of the old-policy update `theta_old <- eta theta_old + (1 - eta) theta` after each rollout `i`
        (each optimizer step by default, see `steps_per_generation`): `"linear"` is `min(old_policy_decay_rate * (i - old_policy_decay_delay), old_policy_decay_max)`
        (0 during the delay), `"constant"` is `old_policy_decay_max`, `"on_policy"` is 0.
    old_policy_decay_rate (`float`, *optional*, defaults to `0.001`):
        Slope of the linear schedule. The released OCR run uses `0.0075`.
    old_policy_decay_max (`float`, *optional*, defaults to `0.5`):
        Ceiling of the linear schedule, and the value of the constant one. The released OCR run uses `0.999`.
    old_policy_decay_delay (`int`, *optional*, defaults to `0`):
        Steps during which the linear schedule stays at 0 (fully on-policy). The released OCR run uses `75`.
    max_nonfinite_steps (`int`, *optional*, defaults to `3`):
        An optimizer step whose gradients are not finite (a NaN or infinite loss) is skipped: the weights and the
        optimizer's moments stay as they were, and `faults/nonfinite_steps_skipped` counts it. Up to this many such
        steps in a row are skipped; one more stops the run with an error (the last checkpoint stays resumable). `0`
        stops at the first.

    > Parameters that control evaluation and watching the run

    ema_decay (`float`, *optional*, defaults to `0.9`):
        Ceiling of the decay of an exponential moving average of the trained weights, used for evaluation and saving
        (`save_model`, checkpoints), as in the released code; its decay warms up as `min(i / (9 + i), ema_decay)` at
        step `i`. `0.0` turns it off: evaluation and saving use the trained weights.
    eval_num_inference_steps (`int` or `None`, *optional*, defaults to `None`):
        Sampler steps at evaluation; `None` uses `num_inference_steps`. The released code evaluates with 40.
    eval_sampler (`str` or `None`, *optional*, defaults to `None`):
        Sampler at evaluation (a diffusers scheduler class name); `None` uses `sampler`. The released code evaluates
        with `"FlowMatchEulerDiscreteScheduler"`.

    sample_logging_steps (`int`, *optional*, defaults to `50`):
        Every this many optimizer steps, save a grid of the latest rollout's images with prompts and rewards to
        `output_dir/samples/` and send it to the image-capable loggers in `report_to`. `0` turns it off.
    sample_logging_num_images (`int`, *optional*, defaults to `8`):
        Images in each sample grid.
    early_stopping_reward (`float` or `None`, *optional*, defaults to `None`):
        Stop training once the logged training reward reaches this value.
    reward_hacking_guard (`str`, *optional*, defaults to `"warn"`):
        Watch for reward hacking at each evaluation: when the held-out metric stays below its best while the training
        reward is above its value at that best, for `reward_hacking_patience` evaluations in a row, `"warn"` logs a
        warning and `"stop"` also stops training. `"off"` disables it. Needs an `eval_dataset` and evaluations
        (`eval_strategy`).
    reward_hacking_metric (`str` or `None`, *optional*, defaults to `None`):
        The held-out evaluation metric, e.g. `"eval_rewards/judge/mean"`. `None`: the mean of the first
        `eval_reward_funcs` entry if there is one, else `"eval_reward"` (the training reward on held-out prompts).
    reward_hacking_patience (`int`, *optional*, defaults to `2`):
        Evaluations in a row that must show the divergence before the guard acts.
    reward_hacking_threshold (`float`, *optional*, defaults to `0.0`):
        How far below its best the held-out metric must be for an evaluation to count, in the metric's units. Set it
        to about the evaluation's noise (e.g. 0.05 for an accuracy over 100 images) so that the guard ignores dips
        that the same weights would show on other noise.

    > Parameters that control the adapters

    use_peft (`bool`, *optional*, defaults to `True`):
        Train LoRA adapters (the trained and the old policy are two adapters on one denoiser; the reference is the
        denoiser with adapters disabled). `False` trains all denoiser weights, with an EMA copy as the old policy.
        A `peft_config` passed to the trainer takes precedence over the `lora_*` fields.
    lora_r (`int`, *optional*, defaults to `32`):
        LoRA rank.
    lora_alpha (`int`, *optional*, defaults to `64`):
        LoRA alpha.
    lora_dropout (`float`, *optional*, defaults to `0.0`):
        LoRA dropout.
    lora_target_modules (`list[str]` or `None`, *optional*, defaults to `None`):
        Modules LoRA adapts. `None` uses the model family's default (for SD3, the attention projections of the
        released code).

    > Parameters that control resuming

    resume_from_checkpoint (`str` or `None`, *optional*, defaults to `None`):
        The checkpoint to resume from (passed to `train()` by `trl nft`): a checkpoint folder
        (`<output_dir>/checkpoint-N`), or `"true"` (or `"last"`, any case) for the newest whole checkpoint in
        `output_dir`. Checked here, before the model loads: a `ValueError` when there is no such checkpoint, or when
        the folder is not a whole checkpoint (it says what is missing).
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["sampler_kwargs"]

    # Overridden TrainingArguments defaults (released-code settings; "iteration" = one optimizer step).
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule (none in the paper)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps (and the last), as TRL."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: they reach the reward functions."}
    )
    dataloader_pin_memory: bool = field(
        default=False, metadata={"help": "Pin dataloader memory (the batches here are prompts: nothing to pin)."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (frozen weights stored in bf16). `None`: on when CUDA is available."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder to resume from, or 'true' (or 'last') for the newest whole one in output_dir."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the denoiser's repeated blocks in place with torch.compile (regional compilation, with "
            "`torch_compile_backend` and `torch_compile_mode`): rollouts, the old and reference forwards and training "
            "all run them, and each adapter switch compiles once. Exact up to float rounding."
        },
    )

    # Model and rollouts
    num_generations: int = field(default=8, metadata={"help": "Images sampled per prompt (group size K)."})
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches per rollout; None: gradient_accumulation_steps (one optimizer step per rollout)."
        },
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Sampler steps per rollout."})
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "Guidance scale of the rollouts: CFG (1.0 is CFG-free), or FLUX.1-dev's guidance embedding."
        },
    )
    resolution: int | None = field(default=None, metadata={"help": "Image side in pixels; None: the model's own."})
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "Rollout sampler: a diffusers scheduler class name (or an instance, from Python); None: the model "
            "family's default (DPMSolverMultistepScheduler; UniPCMultistepScheduler for Qwen-Image and Z-Image)."
        },
    )
    sampler_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Overrides of the sampler config, e.g. '{\"solver_order\": 1}'."}
    )
    max_sequence_length: int = field(
        default=128,
        metadata={
            "help": "Maximum prompt length in tokens of the long text encoder (T5, Qwen2.5-VL), capped by its tokenizer."
        },
    )
    num_frames: int | None = field(
        default=None, metadata={"help": "Frames per video, for video models (Wan: 4 k + 1); None: the model's own."}
    )
    per_device_rollout_batch_size: int | None = field(
        default=None,
        metadata={"help": "Images sampled at a time per process in rollouts; None: per_device_train_batch_size."},
    )
    offload_text_encoders_and_vae: bool = field(
        default=False,
        metadata={
            "help": "Keep the text encoders and the VAE in CPU memory while training; on the device for rollouts."
        },
    )
    prompt_embedding_cache_size: int = field(
        default=0,
        metadata={
            "help": "Prompts whose text conditioning is kept for later rollouts (least recently used out); 0: none."
        },
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantize the frozen denoiser: 'nf4', 'int8' (bitsandbytes, GPU), 'int8-weight-only', "
            "'fp8-weight-only' (torchao) or 'gguf' (with gguf_file); LoRA trains on top. None: no quantization."
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "With quantization='gguf': the .gguf file of the denoiser."}
    )
    quantize_text_encoders: bool = field(
        default=False, metadata={"help": "Quantize the text encoders too, with the same method (not 'gguf')."}
    )

    # Rewards
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function; None weighs all 1.0."}
    )
    scale_rewards: str = field(
        default="batch", metadata={"help": "Advantage scale: 'batch' (global std), 'group' (group std) or 'none'."}
    )
    advantage_clip: float = field(default=5.0, metadata={"help": "A_max in r = 0.5 + 0.5 clip(A / A_max, -1, 1)."})
    group_filter_min_reward_std: float | None = field(
        default=None, metadata={"help": "Groups whose reward std is below this train nothing (Edit-R1: 0.05)."}
    )
    group_filter_max_reward_mean: float | None = field(
        default=None, metadata={"help": "Groups whose mean reward is above this train nothing (Edit-R1: 0.9)."}
    )
    overlap_reward_scoring: bool = field(
        default=False, metadata={"help": "Score a rollout chunk in a background thread while the next is sampled."}
    )
    video_reward_frames: int | None = field(
        default=None,
        metadata={"help": "Evenly spaced frames of a video that image rewards score; None: every frame."},
    )
    video_reward_aggregation: str = field(
        default="mean", metadata={"help": "How a video's frame scores make its reward: 'mean' or 'min'."}
    )
    reward_failure_policy: str = field(
        default="fail",
        metadata={"help": "A reward that raises, times out or returns NaN: 'fail', 'retry' (then fail) or 'drop'."},
    )
    reward_retries: int = field(default=3, metadata={"help": "Retries of a failed reward call ('retry', 'drop')."})
    reward_retry_backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first reward retry; doubles at each retry."}
    )
    reward_timeout: float | None = field(
        default=None, metadata={"help": "Seconds a reward call may take before it counts as failed; None: no limit."}
    )

    # NFT update
    nft_beta: float = field(default=1.0, metadata={"help": "NFT strength of the implicit policies (near 1: stable)."})
    beta: float | None = field(
        default=None, metadata={"help": "Not a setting: the NFT strength is --nft_beta, the KL weight --kl_coef."}
    )
    kl_coef: float = field(default=1e-4, metadata={"help": "Weight of the penalty toward the base model (0: off)."})
    velocity_norm_penalty: float = field(
        default=0.0, metadata={"help": "Weight of the hinge on ||v_theta|| above (1 + margin) ||v_ref|| (0: off)."}
    )
    velocity_norm_margin: float = field(
        default=0.0, metadata={"help": "Fraction by which ||v_theta|| may exceed ||v_ref|| before the hinge acts."}
    )
    reference_refresh_steps: int = field(
        default=0, metadata={"help": "Every N optimizer steps the KL reference becomes the current policy (0: off)."}
    )
    loss_type: str = field(default="x0_adaptive", metadata={"help": "'x0_adaptive' (released code) or 'velocity'."})
    negative_loss: bool = field(
        default=True, metadata={"help": "Keep the negative term of the loss (False: the paper's ablation)."}
    )
    train_timestep_fraction: float = field(
        default=0.99, metadata={"help": "Fraction of the rollout's time grid trained on per image."}
    )
    old_policy_decay_schedule: str = field(
        default="linear", metadata={"help": "Old-policy decay schedule: 'linear', 'constant' or 'on_policy'."}
    )
    old_policy_decay_rate: float = field(default=0.001, metadata={"help": "Slope of the linear decay schedule."})
    old_policy_decay_max: float = field(default=0.5, metadata={"help": "Ceiling (linear) or value (constant)."})
    old_policy_decay_delay: int = field(default=0, metadata={"help": "Steps at decay 0 before the linear ramp."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Optimizer steps with non-finite gradients skipped in a row before stopping."}
    )

    # Evaluation and watching the run
    ema_decay: float = field(
        default=0.9, metadata={"help": "Ceiling of the decay of the weights EMA used to evaluate and save (0: off)."}
    )
    eval_num_inference_steps: int | None = field(
        default=None, metadata={"help": "Sampler steps at evaluation; None: num_inference_steps."}
    )
    eval_sampler: str | None = field(
        default=None, metadata={"help": "Sampler at evaluation (a diffusers scheduler class name); None: sampler."}
    )
    sample_logging_steps: int = field(
        default=50, metadata={"help": "Save and log a grid of rollout images every N steps (0: off)."}
    )
    sample_logging_num_images: int = field(default=8, metadata={"help": "Images per sample grid."})
    early_stopping_reward: float | None = field(
        default=None, metadata={"help": "Stop once the logged training reward reaches this value."}
    )
    reward_hacking_guard: str = field(
        default="warn",
        metadata={"help": "When a held-out metric falls while the training reward rises: 'warn', 'stop' or 'off'."},
    )
    reward_hacking_metric: str | None = field(
        default=None,
        metadata={"help": "Held-out evaluation metric to watch; None: first eval-only reward, else eval_reward."},
    )
    reward_hacking_patience: int = field(
        default=2, metadata={"help": "Evaluations in a row showing the divergence before the guard acts."}
    )
    reward_hacking_threshold: float = field(
        default=0.0, metadata={"help": "How far below its best the held-out metric must be to count (its units)."}
    )

    # Adapters
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (False: full fine-tuning)."})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules LoRA adapts; None: the model family's default."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and not self.fp16
        if isinstance(self.sampler_kwargs, str):  # JSON from the command line; parsed here to name the field on error
            try:
                self.sampler_kwargs = json.loads(self.sampler_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"sampler_kwargs={self.sampler_kwargs!r} is invalid: give a JSON object such as "
                    f"'{{\"solver_order\": 1}}' ({error})."
                ) from error
        super().__post_init__()

        def check(condition: bool, field_name: str, requirement: str) -> None:
            if not condition:
                raise ValueError(f"{field_name}={getattr(self, field_name)!r} is invalid: {requirement}.")

        # The values' types first, so that the range checks below can compare. (`sampler` may also be a scheduler
        # instance, from Python: checked below.)
        for name, annotation in _own_field_types().items():
            if name != "sampler":
                expected = _expected_type(getattr(self, name), annotation)
                check(expected is None, name, f"it must be {expected}")
        # TrainingArguments' numbers that transformers takes unchecked (a negative learning rate fails only when the
        # optimizer is built, a seed out of range at the first rollout).
        check(
            math.isfinite(self.learning_rate) and self.learning_rate >= 0,
            "learning_rate",
            "it must be 0 or positive (AdamW's step size)",
        )
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "it must be 0 or positive")
        check(0 <= self.adam_beta1 < 1, "adam_beta1", "it must be in [0, 1)")
        check(0 <= self.adam_beta2 < 1, "adam_beta2", "it must be in [0, 1)")
        check(math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0, "adam_epsilon", "it must be positive")
        check(self.max_grad_norm >= 0, "max_grad_norm", "it must be positive, or 0 for no gradient clipping")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check(getattr(self, name) >= 1, name, "it must be at least 1")
        check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "give a number of steps, or -1 (epochs)")
        check(self.max_steps >= 1 or self.num_train_epochs > 0, "num_train_epochs", "it must be positive")
        check(self.logging_steps > 0, "logging_steps", "it must be positive (a fraction of the run when below 1)")
        check(self.save_strategy != "steps" or self.save_steps > 0, "save_steps", "it must be positive")
        check(self.eval_steps is None or self.eval_steps > 0, "eval_steps", "it must be positive, or None")
        check(0 <= self.seed < 2**32, "seed", "it must be in [0, 2**32)")
        check(self.dataloader_num_workers >= 0, "dataloader_num_workers", "it must be 0 (the main process) or more")
        check(self.num_generations >= 2, "num_generations", "a group needs at least 2 images to compare")
        check(self.num_inference_steps >= 1, "num_inference_steps", "it must be at least 1")
        check(self.guidance_scale >= 1.0, "guidance_scale", "use 1.0 for CFG-free sampling or a value above 1")
        check(self.resolution is None or self.resolution > 0, "resolution", "it must be a positive number of pixels")
        check(self.max_sequence_length >= 1, "max_sequence_length", "it must be at least 1")
        check(self.num_frames is None or self.num_frames >= 1, "num_frames", "it must be at least 1 (or None)")
        check(
            self.per_device_rollout_batch_size is None or self.per_device_rollout_batch_size >= 1,
            "per_device_rollout_batch_size",
            "it must be at least 1 (or None: per_device_train_batch_size)",
        )
        check(self.prompt_embedding_cache_size >= 0, "prompt_embedding_cache_size", "it must be 0 (off) or more")
        if self.quantization is not None:  # imports diffusers: `trl nft` checks other configs without importing it
            from .quantization import QUANTIZATION_METHODS

            check(
                self.quantization in QUANTIZATION_METHODS,
                "quantization",
                f"choose one of {QUANTIZATION_METHODS}, or None",
            )
        check(
            (self.gguf_file is not None) == (self.quantization == "gguf"),
            "gguf_file",
            "give the .gguf file of the denoiser with quantization='gguf', and only then",
        )
        check(
            not self.quantize_text_encoders or self.quantization is not None,
            "quantize_text_encoders",
            "it needs a quantization method (quantization=...)",
        )
        check(
            self.video_reward_frames is None or self.video_reward_frames >= 1,
            "video_reward_frames",
            "score at least 1 frame per video, or None for every frame",
        )
        check(
            self.video_reward_aggregation in FRAME_AGGREGATIONS,
            "video_reward_aggregation",
            f"choose one of {FRAME_AGGREGATIONS}",
        )
        check(
            self.reward_failure_policy in FAILURE_POLICIES,
            "reward_failure_policy",
            f"choose one of {FAILURE_POLICIES}",
        )
        check(self.reward_retries >= 0, "reward_retries", "it must be 0 or more")
        check(self.reward_retry_backoff >= 0, "reward_retry_backoff", "it must be 0 or more seconds")
        check(
            self.reward_timeout is None or self.reward_timeout > 0,
            "reward_timeout",
            "give a positive number of seconds, or None",
        )
        check(self.scale_rewards in REWARD_SCALES, "scale_rewards", f"choose one of {REWARD_SCALES}")
        check(self.advantage_clip > 0, "advantage_clip", "it must be positive")
        check(
            self.group_filter_min_reward_std is None or self.group_filter_min_reward_std >= 0,
            "group_filter_min_reward_std",
            "it must be None (off) or >= 0",
        )
        check(
            self.group_filter_max_reward_mean is None or math.isfinite(self.group_filter_max_reward_mean),
            "group_filter_max_reward_mean",
            "it must be None (off) or a finite number",
        )
        check(
            self.beta is None,
            "beta",
            "the NFT strength is `nft_beta` (default 1.0) and the KL penalty's weight `kl_coef` (GRPOConfig's `beta`)",
        )
        check(self.nft_beta > 0, "nft_beta", "it must be positive")
        check(self.kl_coef >= 0, "kl_coef", "it must be 0 (off) or positive")
        check(self.velocity_norm_penalty >= 0, "velocity_norm_penalty", "it must be 0 (off) or positive")
        check(self.velocity_norm_margin >= 0, "velocity_norm_margin", "it must be 0 or positive")
        check(self.reference_refresh_steps >= 0, "reference_refresh_steps", "it must be 0 (off) or positive")
        check(
            self.reference_refresh_steps == 0 or self.kl_coef > 0,
            "reference_refresh_steps",
            "the reference serves only the KL penalty: set kl_coef > 0, or reference_refresh_steps=0",
        )
        check(self.loss_type in LOSS_TYPES, "loss_type", f"choose one of {LOSS_TYPES}")
        check(0 < self.train_timestep_fraction <= 1, "train_timestep_fraction", "it must be in (0, 1]")
        check(
            self.old_policy_decay_schedule in DECAY_SCHEDULES,
            "old_policy_decay_schedule",
            f"choose one of {DECAY_SCHEDULES}",
        )
        check(self.old_policy_decay_rate >= 0, "old_policy_decay_rate", "it must be non-negative")
        check(0 <= self.old_policy_decay_max < 1, "old_policy_decay_max", "it must be in [0, 1)")
        check(self.old_policy_decay_delay >= 0, "old_policy_decay_delay", "it must be non-negative")
        check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "it must be 0 (stop at the first) or more")
        check(self.lora_r >= 1, "lora_r", "it must be at least 1")
        check(0 <= self.ema_decay < 1, "ema_decay", "it must be in [0, 1) (0 turns the EMA off)")
        check(
            self.eval_num_inference_steps is None or self.eval_num_inference_steps >= 1,
            "eval_num_inference_steps",
            "it must be at least 1, or None to use num_inference_steps",
        )
        check(
            self.reward_hacking_guard in ("off", "warn", "stop"),
            "reward_hacking_guard",
            "choose 'off', 'warn' or 'stop'",
        )
        check(self.reward_hacking_patience >= 1, "reward_hacking_patience", "it must be at least 1")
        check(self.reward_hacking_threshold >= 0, "reward_hacking_threshold", "it must be 0 or positive")
        check(self.sample_logging_steps >= 0, "sample_logging_steps", "it must be 0 (off) or positive")
        check(self.sample_logging_num_images >= 1, "sample_logging_num_images", "it must be at least 1")
        check(
            self.sampler_kwargs is None or isinstance(self.sampler_kwargs, dict),
            "sampler_kwargs",
            "give a JSON object of scheduler settings, such as '{\"solver_order\": 1}'",
        )
        check(self.lora_alpha > 0, "lora_alpha", "it must be positive (the LoRA scale is lora_alpha / lora_r)")
        check(0 <= self.lora_dropout < 1, "lora_dropout", "it must be in [0, 1)")
        check(
            self.lora_target_modules is None or len(self.lora_target_modules) > 0,
            "lora_target_modules",
            "name at least one module, or None for the model family's default targets",
        )
        check(
            self.reward_weights is None or all(math.isfinite(weight) for weight in self.reward_weights),
            "reward_weights",
            "every weight must be a finite number",
        )
        check(
            self.early_stopping_reward is None or math.isfinite(self.early_stopping_reward),
            "early_stopping_reward",
            "give a finite reward, or None",
        )
        for name in ("sampler", "eval_sampler"):
            sampler = getattr(self, name)
            check(
                sampler is None or _is_scheduler(sampler),
                name,
                "give a diffusers scheduler class name, such as 'DPMSolverMultistepScheduler' or "
                "'FlowMatchEulerDiscreteScheduler', or None for the default",
            )

        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        check(
            self.steps_per_generation >= 1 and self.steps_per_generation % self.gradient_accumulation_steps == 0,
            "steps_per_generation",
            f"it must be a multiple of gradient_accumulation_steps={self.gradient_accumulation_steps} (whole optimizer "
            "steps per rollout)",
        )
        launch = _LAUNCH_PROCESSES.get()
        processes = self.world_size if launch is None else launch[0]
        images = (
            None if processes is None else self.per_device_train_batch_size * processes * self.steps_per_generation
        )
        if images is not None and images % self.num_generations != 0:
            raise ValueError(
                f"The images of one rollout (per_device_train_batch_size={self.per_device_train_batch_size} x "
                f"{processes} processes x steps_per_generation={self.steps_per_generation} = {images}) must divide "
                f"into groups of num_generations={self.num_generations}. Change one of these so that the product is a "
                "multiple of num_generations."
            )
        if self.resume_from_checkpoint is not None:  # a checkpoint that is missing fails now, before the model loads
            from .checkpointing import resolve_resume_checkpoint

            resolve_resume_checkpoint(self.resume_from_checkpoint, self.output_dir)

    def to_dict(self) -> dict:
        # A scheduler instance given as `sampler` is logged by its class name (loggers need JSON).
        config = super().to_dict()
        if config["sampler"] is not None and not isinstance(config["sampler"], str):
            config["sampler"] = type(config["sampler"]).__name__
        return config

    @property
    def images_per_rollout(self) -> int:
        """Images collected per rollout, over all processes."""
        return self.per_device_train_batch_size * self.world_size * self.steps_per_generation

    @property
    def prompts_per_rollout(self) -> int:
        """Prompts (groups) per rollout."""
        return self.images_per_rollout // self.num_generations

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.steps_per_generation // self.gradient_accumulation_steps


@functools.cache
def _own_field_types() -> dict:
    """The annotations of the fields NFTConfig adds to TrainingArguments, read from the class: `HfArgumentParser`
    rewrites the dataclass fields' `type` in place (it drops `None` from `int | None`), so those are not reliable."""
    inherited = {config_field.name for config_field in fields(TrainingArguments)}
    hints = typing.get_type_hints(NFTConfig)
    return {
        config_field.name: hints[config_field.name]
        for config_field in fields(NFTConfig)
        if config_field.name not in inherited
    }


def _expected_type(value, annotation) -> str | None:
    """None when `value` fits the field's `annotation` (`int`, `float`, `bool`, `str`, `list[...]`, `dict`, unions
    with `None`), else what it must be. A bool is no number here, and an int is a float."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is bool and isinstance(value, bool):
            return None
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if origin in (str, dict) and isinstance(value, origin):
            return None
        if origin is list and isinstance(value, list | tuple):
            (item,) = typing.get_args(option)
            if all(_expected_type(element, item) is None for element in value):
                return None
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a dict"}
    plurals = {int: "integers", float: "numbers", str: "strings"}
    described = []
    for option in options:
        if option is type(None):
            described.append("None")
        elif typing.get_origin(option) is list:
            described.append(f"a list of {plurals[typing.get_args(option)[0]]}")
        else:
            described.append(names[option])
    return " or ".join(described)


def _is_scheduler(sampler) -> bool:
    """Whether `sampler` is a diffusers scheduler, or the name of a diffusers scheduler class."""
    import diffusers

    if isinstance(sampler, diffusers.SchedulerMixin):
        return True
    return (
        isinstance(sampler, str)
        and inspect.isclass(getattr(diffusers, sampler, None))
        and issubclass(getattr(diffusers, sampler), diffusers.SchedulerMixin)
    )
