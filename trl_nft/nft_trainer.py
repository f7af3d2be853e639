"""`DiffusionNFTTrainer`: online DiffusionNFT fine-tuning of diffusion and flow models, shaped like TRL's trainers."""

import contextlib
import copy
import logging as stdlib_logging
import math
import os
import textwrap
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from accelerate.utils import DistributedType, TorchDynamoPlugin
from datasets import Dataset
from diffusers import DiffusionPipeline
from diffusers.training_utils import offload_models
from peft import LoraConfig
from PIL import Image
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints
from transformers.utils import logging

from .callbacks import EarlyStoppingAtRewardCallback, RewardHackingGuardCallback, SampleLoggingCallback
from .checkpointing import (
    ResumableRepeatSampler,
    atomic_checkpoint_dir,
    remove_interrupted_saves,
    resolve_resume_checkpoint,
)
from .conditions import (
    CONDITION_IMAGES_KEYWORD,
    fingerprint,
    reward_columns,
    row_condition_images,
)
from .console import rollout_progress_bar, use_short_console_logs
from .faults import NonFiniteStepGuard, explain_out_of_memory
from .forwards import (
    compile_repeated_blocks,
    compiled_blocks_settings,
    mixed_adapter_batch,
    repeat_batch,
    weights_dtype_forward,
)
from .inputs import check_inputs_before_loading, check_inputs_for_model
from .model_card import base_model_of, write_trainer_model_card
from .models import get_adapter, load_pipeline
from .nft_config import NFTConfig
from .objective import (
    forward_process,
    group_advantages,
    group_reward_std,
    kept_groups,
    nft_loss,
    noise_level_means,
    noise_level_sums,
    optimality_probability,
)
from .policies import OLD_ADAPTER, TRAINED_ADAPTER, TRAINED_POLICY_DIR, Policies, SoftUpdatesCallback, copy_, eval_mode
from .policy_files import load_policy, save_policy
from .prompt_cache import prompt_embedding_cache
from .quantization import Quantization
from .randomness import (
    EVALUATION_NOISE,
    ROLLOUT_NOISE,
    TRAINING_DRAWS,
    keyed_generator,
    per_sample_randn,
    sample_generators,
)
from .reference import ReferenceRefreshCallback
from .rewards import RewardFunc, RewardModel
from .rewards.scoring import RewardFailurePolicy, score_samples


logger = logging.get_logger(__name__)

_ROLLOUT_MEMORY_ADVICE = (
    "Rollouts sample {batch} images at a time: lower per_device_rollout_batch_size (which changes nothing else), or "
    "resolution (or num_frames)."
)
_TRAINING_MEMORY_ADVICE = (
    "A micro-step trains on per_device_train_batch_size={batch} images: lower it (and raise gradient_accumulation_steps to "
    "keep the images per optimizer step), or set activation_checkpointing=True."
)


class DiffusionNFTTrainer(Trainer):
    """
    Trainer for DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

    Each optimizer step: sample `num_generations` images per prompt with the old policy through the model's diffusers
    pipeline, score them, turn rewards into optimality probabilities, train the policy on the forward process at the
    rollout's times, then soft-update the old policy. The mathematics lives in `trl_nft.objective`.

    Args:
        model (`str` or `diffusers.DiffusionPipeline`):
            A Hub id, a local folder, a pipeline instance, a name such as `"sd3.5-medium"` or `"flux-dev"`
            (`MODEL_ALIASES`), or an embedded model (`EMBEDDED_MODELS`): `"tiny-sd3"`, `"tiny-flux"`,
            `"tiny-qwen-image"`, ... (tiny random pipelines built offline) or `"digits-sd3"` (pretrained, shipped).
        reward_funcs (`str`, callable, or a list of them):
            Reward functions `f(images, prompts, **kwargs) -> list[float | None]` (see `trl_nft.rewards`), reward
            objects such as `get_reward("clip_score", checkpoint=...)`, or names of registered rewards such as
            `"geneval"`, mixed. Several are summed with `args.reward_weights`; model-backed rewards (`RewardModel`) are
            moved to the training device and mixed-precision dtype.
        args ([`NFTConfig`], *optional*):
            Configuration; defaults to `NFTConfig(output_dir=f"{model_name}-NFT")`.
        train_dataset (`datasets.Dataset`):
            Prompts, in a `prompt` column. Other columns reach the reward functions as keyword lists.
        eval_dataset (`datasets.Dataset`, *optional*):
            Prompts for `evaluate()`: one image each, fixed noise, the current policy.
        peft_config (`peft.LoraConfig`, *optional*):
            LoRA configuration, overriding the `lora_*` fields of `args`.
        callbacks (list of `transformers.TrainerCallback`, *optional*):
            Extra callbacks.
        optimizers (`tuple`, *optional*):
            `(optimizer, lr_scheduler)`, as for `transformers.Trainer`.
        eval_reward_funcs (`str`, callable, or a list of them, *optional*):
            Held-out rewards, scored only by `evaluate()` (logged as `eval_rewards/<name>/mean`, never trained on): a
            judge of another kind shows whether the training reward is being gamed (see `reward_hacking_guard`).
    """

    _tag_names = ["trl", "trl-nft", "diffusion-nft", "diffusers", "text-to-image"]
    _name = "DiffusionNFT"
    _paper = {
        "title": "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
        "id": "2509.16117",
        "citation": textwrap.dedent("""\
            @inproceedings{zheng2026diffusionnft,
                title        = {{DiffusionNFT: Online Diffusion Reinforcement with Forward Process}},
                author       = {Kaiwen Zheng and Huayu Chen and Haotian Ye and Haoxiang Wang and Qinsheng Zhang and Kai Jiang and Hang Su and Stefano Ermon and Jun Zhu and Ming-Yu Liu},
                booktitle    = {International Conference on Learning Representations},
                year         = 2026,
                eprint       = {arXiv:2509.16117},
            }"""),
    }

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: str | RewardFunc | list[str | RewardFunc],
        args: NFTConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        eval_reward_funcs: str | RewardFunc | list[str | RewardFunc] | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else type(model).__name__
            args = NFTConfig(output_dir=f"{model_name.split('/')[-1]}-NFT")
        # Everything cheap is checked before the model is loaded.
        rewards = check_inputs_before_loading(args, train_dataset, eval_dataset, reward_funcs, eval_reward_funcs)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights
        self.eval_reward_funcs, self.eval_reward_func_names = rewards.eval_funcs, rewards.eval_names

        # The pipeline: frozen weights in the mixed-precision dtype, trained weights in float32.
        weight_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        quantization = Quantization.from_config(args, use_lora=args.use_peft or peft_config is not None)
        # A pipeline passed in keeps its own scheduler and progress bars: the trainer sets its own on a shallow copy,
        # which shares the components (docs/trainer.md, "A pipeline passed in", says what training changes in them).
        self.pipeline = copy.copy(load_pipeline(model, torch_dtype=weight_dtype, quantization=quantization))
        self.base_model_id, self.base_model_path = base_model_of(model, self.pipeline)  # for the model card
        self.pipeline.set_progress_bar_config(disable=True)
        self.adapter = get_adapter(
            self.pipeline,
            guidance_scale=args.guidance_scale,
            max_sequence_length=args.max_sequence_length,
            num_frames=args.num_frames,
        )
        check_inputs_for_model(self.adapter, train_dataset, eval_dataset)
        self._prompt_cache = prompt_embedding_cache(args.prompt_embedding_cache_size, self.adapter)
        self.resolution = args.resolution or self.adapter.default_resolution()
        self.adapter.check_resolution(self.resolution)
        self.adapter.set_sampler(args.sampler, args.sampler_kwargs)
        if self.pipeline.dtype != weight_dtype:
            self.pipeline.to(dtype=weight_dtype)
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()  # no dropout in frozen encoders, the VAE, or the reference
        denoiser = self.adapter.denoiser
        set_seed(args.seed)  # LoRA initialisation draws from the global generator
        self._setup_policies(args, peft_config)
        if args.torch_compile:  # the blocks, in place, instead of accelerate's whole-model compile of `model` only
            for module in (denoiser, *self.policies.frozen_modules()):
                compile_repeated_blocks(module, backend=args.torch_compile_backend, mode=args.torch_compile_mode)

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=lambda rows: rows,  # rows stay dicts: prompts are encoded at rollout time
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        use_short_console_logs(self.callback_handler)
        launched = max(args.world_size, int(os.environ.get("WORLD_SIZE", 1)))  # torchrun's count, whatever the state
        if launched > 1 and self.accelerator.distributed_type == DistributedType.NO:
            # Otherwise each process would run its own copy of the training, silently.
            raise ValueError(
                f"{launched} processes were launched but the Trainer does not run distributed: on CPU, set "
                "use_cpu=True (--use_cpu) so that the processes form a process group; FSDP and DeepSpeed configs need "
                "GPUs (accelerate runs them on CPU as independent processes), use --multi_gpu --use_cpu there."
            )
        self.pipeline.to(self.accelerator.device)
        self.policies.to(self.accelerator.device)  # and the EMA of the trained weights that evaluation and saving use
        # With `offload_text_encoders_and_vae` these wait in CPU memory through the training micro-steps, where the
        # memory peak is (SD3.5-Medium: T5-XXL's 9.5 GB); `_sampling_components()` brings them in for rollouts.
        self._offloaded = (
            [*self.adapter.text_encoders, self.pipeline.vae] if args.offload_text_encoders_and_vae else []
        )
        for component in self._offloaded:
            component.to("cpu")
        self._rollout_seconds = self._reward_seconds = 0.0  # of the current rollout, for the timing metrics
        self._scoring_thread = ThreadPoolExecutor(max_workers=1) if args.overlap_reward_scoring else None
        self._reward_failure_policy = RewardFailurePolicy(
            args.reward_failure_policy, args.reward_retries, args.reward_retry_backoff, args.reward_timeout
        )
        self._fault_counts: Counter = Counter()  # retried reward calls since the last rollout's metrics
        for func in self.reward_funcs + self.eval_reward_funcs:
            if isinstance(func, RewardModel):  # model-backed rewards run beside the policy, in its precision
                func.to(self.accelerator.device, weight_dtype)
        self._check_reward_funcs(train_dataset, self.reward_funcs, self.reward_func_names)
        if eval_dataset is not None and self.eval_reward_funcs:
            self._check_reward_funcs(eval_dataset, self.eval_reward_funcs, self.eval_reward_func_names)
        self._metrics: dict[str, list[float]] = defaultdict(list)  # gathered here, averaged at each log
        self.add_callback(SoftUpdatesCallback(self.policies, self.rollout_done, self._metrics))
        if args.reference_refresh_steps:
            every = args.reference_refresh_steps
            self.add_callback(ReferenceRefreshCallback(self.policies.trained, self.policies.reference, every))
        self.add_callback(NonFiniteStepGuard(self.policies.trained, args.max_nonfinite_steps, self._metrics))
        if args.sample_logging_steps:
            self.add_callback(SampleLoggingCallback(self, args.sample_logging_steps, args.sample_logging_num_images))
        if args.early_stopping_reward is not None:
            self.add_callback(EarlyStoppingAtRewardCallback(args.early_stopping_reward))
        if args.reward_hacking_guard != "off" and eval_dataset is not None:
            self.add_callback(
                RewardHackingGuardCallback(
                    self._held_out_metric(args.reward_hacking_metric),
                    args.reward_hacking_patience,
                    stop=args.reward_hacking_guard == "stop",
                    threshold=args.reward_hacking_threshold,
                )
            )
        self.last_rollout_samples: tuple[list, list, list] | None = None  # (images, prompts, rewards), this process
        self.last_rollout_conditions: list | None = None  # their condition images, for an image-conditioned model

        self._step = 0  # micro-steps taken, to know when a new rollout is due
        self._buffered_inputs: list[dict] | None = None
        self._loss_parts: list[torch.Tensor] = []  # per time, reduced to metrics once per micro-step
        self._norm_ratio_sums: list[torch.Tensor] = []  # per time, likewise

    # ------------------------------------------------------------------ set-up

    def _setup_policies(self, args: NFTConfig, peft_config: LoraConfig | None) -> None:
        """The trained, old and reference policies (`trl_nft.policies`)."""
        self.policies = Policies(self.pipeline, self.adapter, args, peft_config)

    def _build_accelerator_args(self, **kwargs) -> dict:
        # `torch_compile` compiled the denoiser's blocks in place (see __init__); accelerate compiles nothing more.
        accelerator_args = super()._build_accelerator_args(**kwargs)
        accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return accelerator_args

    def _held_out_metric(self, metric: str | None) -> str:
        """The evaluation metric the reward-hacking guard watches: `metric`, else the first held-out reward's mean,
        else the training reward on the evaluation prompts."""
        known = ["eval_reward"] + [
            f"eval_rewards/{name}/mean" for name in self.reward_func_names + self.eval_reward_func_names
        ]
        if metric is None:
            return known[len(self.reward_func_names) + 1] if self.eval_reward_funcs else "eval_reward"
        if metric not in known:
            raise ValueError(f"reward_hacking_metric={metric!r} is not an evaluation metric; choose one of {known}.")
        return metric

    def _check_reward_funcs(self, dataset: Dataset, funcs: list[RewardFunc], names: list[str]) -> None:
        """Score two blank samples once, so that a reward function with the wrong output fails before any rollout."""
        rows = [dataset[i % len(dataset)] for i in range(2)]
        blank = Image.new("RGB", (self.resolution, self.resolution), (127, 127, 127))
        self._score(
            [blank if self.adapter.num_frames is None else [blank] * self.adapter.num_frames] * 2, rows, funcs, names
        )

    # ------------------------------------------------------------------ data

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self):
        # As in GRPOTrainer: each process loads the prompts of a whole rollout at once, and `_prepare_inputs` hands
        # out its `steps_per_generation` slices.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset: Dataset | None = None) -> ResumableRepeatSampler:
        # Each prompt `num_generations` times in a row, so that after gathering, consecutive images form the groups
        # (a group may span processes); the block of one rollout repeats once per micro-step.
        return ResumableRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.prompts_per_rollout,
            repeat_count=self.args.steps_per_generation,
            shuffle=True,
            seed=self.args.seed,
        )

    def _prepare_inputs(self, generation_batch: list[dict]) -> dict:
        parts = self.args.steps_per_generation
        if self._step % parts == 0 or self._buffered_inputs is None:
            rollout = self._generate_and_score(generation_batch)
            if parts > self.args.gradient_accumulation_steps:
                # Several optimizer steps per rollout: each gets a random mix of the groups, as in GRPOTrainer.
                # (this process's share only: such runs depend on the number of processes)
                mixing = keyed_generator(self.args.seed, self.state.global_step, self.accelerator.process_index)
                order = torch.randperm(len(rollout["latents"]), generator=mixing)
                rollout = _take(rollout, order.to(rollout["latents"].device))
            self._buffered_inputs = [_slice_batch(rollout, i, parts) for i in range(parts)]
        return self._buffered_inputs[self._step % parts]

    def rollout_done(self) -> bool:
        """Whether the micro-steps taken so far end a rollout (the next one samples anew)."""
        return self._step % self.args.steps_per_generation == 0

    # ------------------------------------------------------------------ rollout and rewards

    def _sampling_components(self):
        """Within this context the offloaded text encoders and VAE (if any) are on the training device (diffusers'
        `offload_models`)."""
        return offload_models(*self._offloaded, device=self.accelerator.device, offload=bool(self._offloaded))

    def _float32_weights_autocast(self):
        """Autocast for sampling when the weights are float32: full fine-tuning's old copy (which accelerate does not
        wrap) and its trained model (sampled past the wrapper). LoRA samples with its frozen bf16 weights as they are."""
        return contextlib.nullcontext() if self.policies.use_lora else self.accelerator.autocast()

    def _sample_generators(self, stream: int, indices: list[int] | torch.Tensor) -> list[torch.Generator]:
        # Keyed by the samples' indices in the whole rollout, not by the process: see trl_nft/randomness.py.
        return sample_generators(self.args.seed, self.state.global_step, stream, indices)

    def _sample_and_score(
        self,
        rows: list[dict],
        generators: list[torch.Generator],
        chunk_size: int,
        num_inference_steps: int,
        reward_funcs: list[RewardFunc],
        reward_func_names: list[str],
    ) -> tuple[dict, torch.Tensor, torch.Tensor, list, torch.Tensor, torch.Tensor]:
        """Sample one image per row with the pipeline's current denoiser, `chunk_size` images at a time, each from its
        own generator, decode each chunk to PIL and score it. Returns per-image conditioning, clean latents, the
        sampler's time grid, the images (or videos), the rewards `[num_images, num_funcs]` and which images the reward
        failure policy dropped. Each unique prompt is encoded once (or taken from the prompt-embedding cache).

        Every chunk is scored on its own, so with `overlap_reward_scoring` (a chunk scored in a background thread while
        the next one is sampled) the rewards are exactly those of the sequential order."""
        conditioning = self._encode_conditions(rows)
        latents, images, scored = [], [], []
        show = not self.args.disable_tqdm and self.accelerator.is_local_main_process
        with (
            rollout_progress_bar(len(rows), "Sampling", show) as sampling_bar,
            rollout_progress_bar(len(rows), "Scoring", show) as scoring_bar,
            weights_dtype_forward(self.adapter.denoiser),  # latents stay in the mixed-precision dtype
            self._float32_weights_autocast(),
        ):

            def score(chunk_images: list, chunk_rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
                scores = self._score(chunk_images, chunk_rows, reward_funcs, reward_func_names)
                scoring_bar.update(len(chunk_rows))
                return scores

            for start in range(0, len(rows), chunk_size):
                chunk = slice(start, start + chunk_size)
                start_time = time.perf_counter()
                rollout = self.adapter.sample(
                    {key: value[chunk] for key, value in conditioning.items()},
                    num_inference_steps,
                    self.resolution,
                    generators[chunk],
                )
                chunk_images = self._decode_to_pil(rollout.latents)
                self._rollout_seconds += time.perf_counter() - start_time
                sampling_bar.update(len(chunk_images))
                latents.append(rollout.latents.float())  # the training targets are computed in float32
                images += chunk_images
                if self._scoring_thread is not None:
                    scored.append(self._scoring_thread.submit(score, chunk_images, rows[chunk]))
                else:
                    scored.append(score(chunk_images, rows[chunk]))
            rewards_per_func, dropped = (torch.cat(part) for part in zip(*(_result(r) for r in scored), strict=True))
        # Training is CFG-free: only the conditional embeddings are kept.
        conditioning = {key: value for key, value in conditioning.items() if not key.startswith("negative_")}
        return conditioning, torch.cat(latents), rollout.sigmas, images, rewards_per_func, dropped

    def _encode_conditions(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Each row's conditioning, batch-first: each distinct condition (a prompt, with its condition images for an
        image-conditioned family) encoded once, or taken from the prompt-embedding cache."""
        images = row_condition_images(rows)
        keys = [
            (row["prompt"], None if images is None else fingerprint(row_images))
            for row, row_images in zip(rows, images or [None] * len(rows), strict=True)
        ]
        position = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        first_row = {key: i for i, key in reversed(list(enumerate(keys)))}

        def encode(distinct: list[tuple]) -> dict[str, torch.Tensor]:
            prompts = [prompt for prompt, _ in distinct]
            condition_images = None if images is None else [images[first_row[key]] for key in distinct]
            return self.adapter.encode_conditions(prompts, condition_images, self.resolution)

        # The pipeline's and the tokenizers' truncation warnings: counted once, at start-up, instead.
        with _quiet(type(self.pipeline).__module__, "transformers.tokenization_utils_base"):
            if self._prompt_cache is not None:
                encoded = self._prompt_cache.encode(list(position), encode)
            else:
                encoded = encode(list(position))
        index = torch.tensor([position[key] for key in keys], device=self.accelerator.device)
        return {key: value[index] for key, value in encoded.items()}

    def _decode_to_pil(self, latents: torch.Tensor) -> list[Image.Image] | list[list[Image.Image]]:
        """The samples as the rewards see them: PIL images, or for a video family each video's frames."""
        decoded = self.adapter.decode(latents)  # [B, 3, H, W], or [B, F, 3, H, W]
        array = (decoded.movedim(-3, -1).float().cpu().numpy() * 255).round().astype(np.uint8)
        if array.ndim == 4:
            return [Image.fromarray(image) for image in array]
        return [[Image.fromarray(frame) for frame in video] for video in array]

    def _score(
        self, samples: list, rows: list[dict], funcs: list[RewardFunc], names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards `[num_samples, num_funcs]` of images (or videos) (NaN where a function returned None), each output
        validated, under the reward failure policy (`trl_nft.rewards.scoring`), and which samples it dropped."""
        start_time = time.perf_counter()
        prompts = [row["prompt"] for row in rows]
        columns = reward_columns(rows)
        scores = score_samples(
            funcs,
            names,
            samples,
            prompts,
            columns,
            video_frames=self.args.video_reward_frames,
            video_aggregation=self.args.video_reward_aggregation,
            policy=self._reward_failure_policy,
        )
        for failure in scores.failures:
            logger.warning(f"Dropped from the update: {failure}")
        self._fault_counts["reward_retries"] += scores.retries
        self._reward_seconds += time.perf_counter() - start_time
        return scores.rewards, scores.dropped

    def _generate_and_score(self, rows: list[dict]) -> dict:
        """One rollout of this process's share of the step: sample with the old policy, score, and turn the rewards
        of all processes into optimality probabilities."""
        device = self.accelerator.device
        chunk = self.args.per_device_rollout_batch_size or self.args.per_device_train_batch_size
        prompts = [row["prompt"] for row in rows]
        # This process holds a contiguous block of the rollout, in the order of the gather below.
        local = slice(self.accelerator.process_index * len(rows), (self.accelerator.process_index + 1) * len(rows))
        sample_index = torch.arange(local.start, local.stop)
        self._rollout_seconds = self._reward_seconds = 0.0
        with (
            self.policies.acting_as_old(),
            self._sampling_components(),
            explain_out_of_memory("the rollout", _ROLLOUT_MEMORY_ADVICE.format(batch=chunk)),
        ):
            conditioning, latents, time_grid, images, rewards_per_func, dropped = self._sample_and_score(
                rows,
                self._sample_generators(ROLLOUT_NOISE, sample_index),
                chunk,
                self.args.num_inference_steps,
                self.reward_funcs,
                self.reward_func_names,
            )
        rewards_per_func = self.accelerator.gather(rewards_per_func.to(device)).cpu()
        dropped = self.accelerator.gather(dropped.to(device)).cpu()
        if dropped.all():
            raise RuntimeError(
                "The reward failure policy dropped every sample of the rollout: nothing is left to train on (see the "
                "warnings above for why each reward failed)."
            )
        not_applicable = rewards_per_func.isnan().all(dim=1) & ~dropped
        if not_applicable.any():
            raise ValueError(
                f"No reward function returned a value for {int(not_applicable.sum())} images: each image needs at "
                f"least one reward that applies to it (reward functions: {', '.join(self.reward_func_names)})."
            )
        rewards = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[dropped] = float("nan")  # unknown: left out of the group statistics, and of the loss (weight 0)
        advantages = group_advantages(rewards, self.args.num_generations, self.args.scale_rewards)
        optimality = optimality_probability(advantages, self.args.advantage_clip)

        kept = rewards[~dropped]
        self._metrics["reward"].append(kept.mean().item())
        self._metrics["reward_std"].append(kept.std().item() if len(kept) > 1 else 0.0)
        for j, name in enumerate(self.reward_func_names):
            self._metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, j]).item())
        group_std = group_reward_std(rewards, self.args.num_generations)
        self._metrics["frac_reward_zero_std"].append((group_std < 1e-8).float().mean().item())
        groups_kept = kept_groups(
            rewards,
            self.args.num_generations,
            self.args.group_filter_min_reward_std,
            self.args.group_filter_max_reward_mean,
        )
        self._metrics["frac_groups_filtered"].append(1.0 - groups_kept.float().mean().item())
        if not groups_kept.any():
            logger.warning(
                "Every group of this rollout was filtered out (group_filter_min_reward_std / "
                "group_filter_max_reward_mean): this step trains on no sample."
            )
        trained = ~dropped & groups_kept.repeat_interleave(self.args.num_generations)
        self._metrics["faults/dropped_samples"].append(dropped.sum().item())
        retries = torch.tensor(float(self._fault_counts.pop("reward_retries", 0)), device=device)
        self._metrics["faults/reward_retries"].append(self.accelerator.gather(retries).sum().item())
        self._metrics["optimality/mean"].append(optimality.mean().item())
        self._metrics["timing/rollout_seconds"].append(self._rollout_seconds)
        self._metrics["timing/reward_seconds"].append(self._reward_seconds)
        self._metrics["rollout/images_per_second"].append(len(rows) / self._rollout_seconds)
        self.last_rollout_samples = (images, prompts, rewards[local].tolist())
        self.last_rollout_conditions = reward_columns(rows).get(CONDITION_IMAGES_KEYWORD)
        return {
            "latents": latents,
            "conditioning": conditioning,
            "time_grid": time_grid,
            "optimality": optimality[local].to(device),
            "sample_weights": trained[local].float().to(device),  # 0 for a dropped or filtered sample: trains nothing
            "sample_index": sample_index.to(device),  # what keys each sample's training draws
        }

    # ------------------------------------------------------------------ training

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-step on this process's slice of the rollout. Each image is trained at a random subset of the
        rollout's times, with fresh noise: the old (and reference) velocities of all those times are computed first,
        then each time's policy loss is back-propagated on its own, as in the released code, to bound memory."""
        model.train()
        batch = self._prepare_inputs(inputs)
        advice = _TRAINING_MEMORY_ADVICE.format(batch=self.args.per_device_train_batch_size)
        with explain_out_of_memory("the training step", advice):
            return self._train_micro_step(model, batch)

    def _train_micro_step(self, model, batch: dict) -> torch.Tensor:
        """`training_step` on one micro-batch of the rollout: the loss, back-propagated, and its metrics."""
        start = time.perf_counter()
        clean, time_grid = batch["latents"], batch["time_grid"]
        num_images, num_times = clean.shape[0], len(time_grid)
        num_train_times = max(1, int(num_times * self.args.train_timestep_fraction))
        # Each image's times, then its noise at each, from its own generator: the same on any number of processes.
        generators = self._sample_generators(TRAINING_DRAWS, batch["sample_index"])
        times = torch.stack([torch.randperm(num_times, generator=g)[:num_train_times] for g in generators])
        samples = []
        for j in range(num_train_times):
            sigmas = time_grid[times[:, j].to(time_grid.device)]
            noise = per_sample_randn(clean.shape[1:], generators).to(clean)
            noisy, _ = forward_process(clean, noise, sigmas)
            samples.append({**batch, "sigmas": sigmas, "noise": noise, "noisy": noisy, "reference_velocity": None})

        with torch.no_grad(), self.accelerator.autocast():  # the frozen copies of full fine-tuning are not wrapped
            self._frozen_velocities(samples, batch["conditioning"])

        scale = 1.0 / (num_train_times * self.current_gradient_accumulation_steps)
        total = torch.zeros((), device=clean.device)
        for j, sample in enumerate(samples):
            # Gradients are all-reduced once, with the last time's backward.
            sync = contextlib.nullcontext() if j == num_train_times - 1 else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, sample)
                self.accelerator.backward(loss * scale)
            total += loss.detach() * scale

        # Loss parts: mean over times on this process, then over processes; the velocity-norm ratios' sums: summed
        # over both. One host sync per micro-step.
        parts = torch.stack(self._loss_parts).mean(dim=0)
        local = torch.cat([parts, torch.stack(self._norm_ratio_sums).sum(dim=0)])
        gathered = self.accelerator.gather(local).view(self.accelerator.num_processes, -1)
        values = torch.cat([gathered[:, : len(parts)].mean(dim=0), gathered[:, len(parts) :].sum(dim=0)]).tolist()
        parts, ratio_sums = values[: len(parts)], values[len(parts) :]
        self._loss_parts.clear()
        self._norm_ratio_sums.clear()
        for name, value in zip(("positive", "negative", "kl", "velocity_norm"), parts, strict=True):
            self._metrics[f"loss/{name}"].append(value)
        ratio = "velocity_norm_ratio" if self.args.kl_coef > 0 else "velocity_norm_ratio_to_old"
        for bucket, value in noise_level_means(ratio_sums).items():
            self._metrics[ratio if bucket is None else f"{ratio}/{bucket}"].append(value)
        self._step += 1
        train_time = time.perf_counter() - start
        self._metrics["timing/train_seconds"].append(train_time)
        self._metrics["train/sample_steps_per_second"].append(num_images * num_train_times / train_time)
        return total

    def _frozen_velocities(self, samples: list[dict], conditioning: dict) -> None:
        """Each sample's `old_velocity` and, when `kl_coef > 0`, `reference_velocity`, with one switch to each frozen
        policy per micro-step, not one per time. With LoRA both policies are the frozen weights with the old adapter or
        with none (or the refreshed reference's), so one forward of the doubled batch gives both (PEFT's mixed-adapter
        batch; not for DoRA)."""
        policies = self.policies
        fused = self.args.kl_coef > 0 and policies.use_lora and not policies.lora_config.use_dora
        if fused:
            size, doubled = len(samples[0]["noisy"]), repeat_batch(conditioning, 2)
            adapter_names = [OLD_ADAPTER] * size + [policies.reference_adapter] * size
            with policies.acting_as_old() as denoiser, mixed_adapter_batch(denoiser, adapter_names):
                for sample in samples:
                    inputs = repeat_batch({"noisy": sample["noisy"], "sigmas": sample["sigmas"]}, 2)
                    velocity = self.adapter.predict_velocity(denoiser, inputs["noisy"], inputs["sigmas"], doubled)
                    sample["old_velocity"], sample["reference_velocity"] = velocity.chunk(2)
            return
        with policies.acting_as_old() as old_policy:
            for sample in samples:
                sample["old_velocity"] = self.adapter.predict_velocity(
                    old_policy, sample["noisy"], sample["sigmas"], conditioning
                )
        if self.args.kl_coef > 0:
            with policies.acting_as_reference() as reference:
                for sample in samples:
                    sample["reference_velocity"] = self.adapter.predict_velocity(
                        reference, sample["noisy"], sample["sigmas"], conditioning
                    )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None) -> torch.Tensor:
        """The NFT loss of one forward-process sample per image. `inputs` holds the clean `latents`, the `noise`, the
        times `sigmas`, the `noisy` latents, the `conditioning`, the `optimality`, the `sample_weights` (0 for a sample
        the reward failure policy dropped) and the frozen `old_velocity` and `reference_velocity` (None when `kl_coef`
        is 0)."""
        policy_velocity = self.adapter.predict_velocity(
            model, inputs["noisy"], inputs["sigmas"], inputs["conditioning"]
        )
        reference_velocity = inputs["reference_velocity"]
        loss = nft_loss(
            policy_velocity.float(),
            inputs["old_velocity"].float(),
            inputs["noisy"].float(),
            inputs["latents"].float(),
            inputs["noise"].float(),
            inputs["sigmas"],
            inputs["optimality"],
            nft_beta=self.args.nft_beta,
            loss_type=self.args.loss_type,
            advantage_clip=self.args.advantage_clip,
            reference_velocity=None if reference_velocity is None else reference_velocity.float(),
            kl_coef=self.args.kl_coef,
            negative_loss=self.args.negative_loss,
            sample_weights=inputs["sample_weights"],
            velocity_norm_penalty=self.args.velocity_norm_penalty,
            velocity_norm_margin=self.args.velocity_norm_margin,
        )
        self._loss_parts.append(torch.stack([loss.positive, loss.negative, loss.kl, loss.velocity_norm]))
        self._norm_ratio_sums.append(noise_level_sums(loss.velocity_norm_ratio, inputs["sigmas"]))
        return loss.loss

    @contextlib.contextmanager
    def _evaluation_sampler(self):
        """Within this context the pipeline samples with `eval_sampler` (when set)."""
        rollout_scheduler = self.pipeline.scheduler
        if self.args.eval_sampler is not None:
            self.adapter.set_sampler(self.args.eval_sampler)
        try:
            yield
        finally:
            self.pipeline.scheduler = rollout_scheduler

    # ------------------------------------------------------------------ evaluation and logging

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score the current policy (its EMA when `ema_decay > 0`) on `eval_dataset`: one image per prompt, with the
        same noise at every call, `eval_num_inference_steps` steps of `eval_sampler`. Reports the weighted training
        reward (`eval_reward`), each reward function's mean, the held-out `eval_reward_funcs`, and what a reward's
        `summary(scores, **columns)` adds (e.g. GenEval's per-task accuracy)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pass it to the trainer or to evaluate()).")
        rows = [dataset[i] for i in range(len(dataset))]
        # Padding gives every process the same count (the last row repeated) so that the gather lines up.
        split = self.accelerator.split_between_processes(list(range(len(rows))), apply_padding=True)
        with (
            split as local_indices,
            eval_mode(self.adapter.denoiser),
            self._sampling_components(),
            self.policies.evaluation_weights(),
            self._evaluation_sampler(),
            compiled_blocks_settings(self.args.torch_compile),
        ):
            # Each prompt's noise is keyed by its index alone: the same at every evaluation, on any number of processes.
            generators = sample_generators(self.args.seed, 0, EVALUATION_NOISE, local_indices)
            steps = self.args.eval_num_inference_steps or self.args.num_inference_steps
            chunk = self.args.per_device_eval_batch_size
            funcs = self.reward_funcs + self.eval_reward_funcs
            names = self.reward_func_names + self.eval_reward_func_names
            local_rows = [rows[i] for i in local_indices]
            *_, rewards_per_func, dropped = self._sample_and_score(local_rows, generators, chunk, steps, funcs, names)
        rewards_per_func = self.accelerator.gather(rewards_per_func.to(self.accelerator.device)).cpu()[: len(rows)]
        dropped = self.accelerator.gather(dropped.to(self.accelerator.device)).cpu()[: len(rows)]
        rewards_per_func[dropped] = float("nan")  # unknown, so left out of every mean
        training = rewards_per_func[:, : len(self.reward_funcs)]
        rewards = (training * self.reward_weights.unsqueeze(0)).nansum(dim=1)[~dropped]
        metrics = {f"{metric_key_prefix}_reward": rewards.mean().item()}
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        for j, (func, name) in enumerate(zip(funcs, names, strict=True)):
            metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, j]).item()
            if hasattr(func, "summary"):
                scores = [None if math.isnan(value) else value for value in rewards_per_func[:, j].tolist()]
                for key, value in func.summary(scores, **columns).items():
                    metrics[f"{metric_key_prefix}_rewards/{name}/{key}"] = value
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training metrics gathered since the last log are averaged here, as in TRL's trainers.
        if not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **{key: sum(values) / len(values) for key, values in self._metrics.items() if values}}
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and resuming

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the trained policy (its EMA when `ema_decay > 0`) in diffusers' format: the LoRA
        (`pipeline.load_lora_weights(output_dir)`), or the fully fine-tuned denoiser in `output_dir/<denoiser>/`
        (`<Model>.from_pretrained(output_dir, subfolder=...)`)."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            with self.policies.evaluation_weights():
                denoiser = self.accelerator.unwrap_model(self.model)
                save_policy(denoiser, TRAINED_ADAPTER, output_dir, self.adapter, self.policies.lora_config)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            write_trainer_model_card(self, output_dir)

    def create_model_card(self, model_name: str | None = None, tags: str | list[str] | None = None, **kwargs) -> None:
        """Write the diffusers model card (`README.md`, with sample images in `images/`) to `output_dir`, titled
        `model_name` (default: the Hub id, or the folder's name); called by `push_to_hub`, and by every save."""
        if self.is_world_process_zero():
            write_trainer_model_card(self, self.args.output_dir, model_name, [tags] if isinstance(tags, str) else tags)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, resuming from whole checkpoints only (`trl_nft.checkpointing`): `resume_from_checkpoint`
        is a checkpoint folder, or `True` (or `"true"`, `"last"`, as the command line passes it) for the newest whole
        checkpoint in `output_dir`. A run resumed at its last step (`max_steps`) or later trains no further step."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if self.args.should_save:
            remove_interrupted_saves(self.args.output_dir)
        if checkpoint is not None:
            state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
            max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
            if state.global_step >= max_steps:
                # transformers' loop checks `max_steps` after each step, so it would take one more step from here.
                logger.warning(
                    f"{checkpoint} is at step {state.global_step} and this run ends at step {max_steps}: nothing left "
                    "to train (raise max_steps to train further)."
                )
                self._load_from_checkpoint(checkpoint)
                self.state = state
                return TrainOutput(state.global_step, 0.0, {})
        with compiled_blocks_settings(self.args.torch_compile):
            return super().train(checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial) -> None:
        # Whole or absent: the checkpoint is written in a temporary folder and then renamed into place. transformers'
        # `_save_checkpoint` writes `<run dir>/checkpoint-N`, so it is given the temporary folder as its run dir;
        # there it neither pushes to the Hub (an upload in the background would read a folder about to be renamed)
        # nor rotates the checkpoints (the others are not there): both happen here, once the checkpoint has its name.
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        save = self.args.should_save
        with atomic_checkpoint_dir(checkpoint_dir, save, self.accelerator.wait_for_everyone) as staging_dir:
            if save:  # the frozen policies (and, with an EMA, the raw trained weights); the top level: `save_model`'s
                denoiser = self.accelerator.unwrap_model(self.model)
                lora_config = self.policies.lora_config
                for folder, adapter_name, policy in self.policies.frozen(denoiser):
                    save_policy(policy, adapter_name, os.path.join(staging_dir, folder), self.adapter, lora_config)
                if self.policies.ema is not None:
                    trained_dir = os.path.join(staging_dir, TRAINED_POLICY_DIR)
                    save_policy(denoiser, TRAINED_ADAPTER, trained_dir, self.adapter, lora_config)
            self._get_output_dir = lambda trial: os.path.dirname(staging_dir)
            self._push_from_checkpoint = lambda checkpoint_folder: None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir, self._push_from_checkpoint  # the class's methods again
            if self.state.best_model_checkpoint == staging_dir:  # this checkpoint is the best: record its final name
                self.state.best_model_checkpoint = checkpoint_dir
                if save:
                    self.state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))
        if save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        if self.args.push_to_hub:
            self._push_from_checkpoint(checkpoint_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the trained and the frozen policies, and the EMA, from a checkpoint written by `_save_checkpoint`."""
        denoiser, policy_format = self.accelerator.unwrap_model(self.model), (self.adapter, self.policies.use_lora)
        trained_dir = os.path.join(resume_from_checkpoint, TRAINED_POLICY_DIR)
        if self.policies.ema is not None:  # the top level holds the EMA: load it through the trained weights first
            load_policy(denoiser, TRAINED_ADAPTER, resume_from_checkpoint, resume_from_checkpoint, *policy_format)
            copy_(self.policies.ema, self.policies.trained)
        if not os.path.isdir(trained_dir):  # written without an EMA: the top level holds the trained weights
            trained_dir = resume_from_checkpoint
        load_policy(denoiser, TRAINED_ADAPTER, trained_dir, resume_from_checkpoint, *policy_format)
        for folder, adapter_name, policy in self.policies.frozen(denoiser):
            directory = os.path.join(resume_from_checkpoint, folder)
            load_policy(policy, adapter_name, directory, resume_from_checkpoint, *policy_format)


def _take(batch: dict, index: torch.Tensor | slice) -> dict:
    """The images `index` of a rollout batch, along the image axis (the time grid is shared)."""

    def take(value):
        return {key: take(v) for key, v in value.items()} if isinstance(value, dict) else value[index]

    return {key: (value if key == "time_grid" else take(value)) for key, value in batch.items()}


def _slice_batch(batch: dict, index: int, parts: int) -> dict:
    """The `index`-th of `parts` equal slices along the image axis."""
    size = len(batch["latents"]) // parts
    return _take(batch, slice(index * size, (index + 1) * size))


def _result(scored: Future | tuple) -> tuple:
    """A scored chunk: the background thread's result, or the result itself."""
    return scored.result() if isinstance(scored, Future) else scored


@contextlib.contextmanager
def _quiet(*logger_names: str):
    """Within this context the loggers `logger_names` log errors only."""
    loggers = [stdlib_logging.getLogger(name) for name in logger_names]
    levels = [quieted.level for quieted in loggers]
    for quieted in loggers:
        quieted.setLevel(stdlib_logging.ERROR)
    try:
        yield
    finally:
        for quieted, level in zip(loggers, levels, strict=True):
            quieted.setLevel(level)
