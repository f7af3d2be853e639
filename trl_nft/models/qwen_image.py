"""Qwen-Image (20B MMDiT, rectified flow, Qwen2.5-VL text encoder) through `QwenImagePipeline`.

What is particular to Qwen-Image, all read from diffusers' `QwenImagePipeline`:
- prompts are encoded by Qwen2.5-VL inside a chat template; the pipeline drops the template's first
  `prompt_template_encode_start_idx` tokens (the system instruction) and pads the batch, so the conditioning is the
  prompt's hidden states and a padding mask (`prompt_embeds_mask`);
- latents come from a video VAE (one frame) normalised by per-channel `latents_mean` / `latents_std`, and are packed:
  each 2 x 2 patch of the `[C, h, w]` latents is one token of `4 C` channels, so the rollout latents (and everything the
  trainer does with them) are `[B, h w / 4, 4 C]`; the transformer also takes the latent grid (`img_shapes`);
- the denoiser's timestep is the flow time `t` itself (the pipeline passes `timestep / 1000`), and the schedule shifts
  with the image sequence length (`mu`, computed by the pipeline), so a rollout's time grid depends on the resolution;
- guidance is true classifier-free guidance (`true_cfg_scale`): a second pass on a negative prompt every step, whose
  combination the pipeline rescales to the conditional prediction's norm. The trainer's `guidance_scale` is that
  `true_cfg_scale`; 1 samples CFG-free, one pass per step.
"""

import inspect

import torch
from diffusers import QwenImagePipeline
from torch import nn

from .base import MMDIT_ATTENTION_TARGETS, DiffusionAdapter, Rollout, check_resolution_multiple, packed_grid_side


#: The negative prompt of Qwen-Image's CFG: " ", as the pipeline's docstring suggests and Flow-GRPO passes.
NEGATIVE_PROMPT = " "


class QwenImageAdapter(DiffusionAdapter):
    pipeline_classes = (QwenImagePipeline,)
    denoiser_name = "transformer"
    # Flow-GRPO's Qwen-Image LoRA targets (`scripts/train_qwenimage_edit_plus.py`, the same transformer): both streams'
    # attention projections and feed-forward layers. Flow-Factory's Qwen-Image adapter (its NFT and GRPO recipes) lists
    # the same layers, but spells the feed-forward outputs `*_mlp.net.2.proj`, which name no diffusers module.
    # DPM-Solver++, the usual default, cannot follow the sigmas this pipeline passes; UniPC is 2nd-order multistep too.
    default_sampler = "UniPCMultistepScheduler"
    lora_target_modules = (
        *MMDIT_ATTENTION_TARGETS,
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )

    prompt_token_limits = {"tokenizer": "max_sequence_length"}
    per_prompt_encoding = False  # the pipeline pads each batch to its longest prompt

    def __init__(self, pipeline: QwenImagePipeline, guidance_scale: float = 1.0, max_sequence_length: int = 128):
        super().__init__(pipeline, guidance_scale, max_sequence_length)
        # The pipeline refuses a longer budget than its tokenizer's (1024 tokens after the template).
        self.max_sequence_length = min(max_sequence_length, pipeline.tokenizer_max_length)

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        scale = self.pipeline.vae_scale_factor
        check_resolution_multiple(
            resolution,
            scale * 2,
            "Qwen-Image",
            f"VAE scale {scale} x the 2 x 2 latent packing; the pipeline would silently resize any other size",
        )

    def check_guidance(self, guidance_scale: float) -> None:
        # diffusers keeps `guidance_embeds` for future guidance-distilled checkpoints, but the transformer's time
        # embedding takes no guidance input: such a transformer fails on its first forward, whatever the scale.
        if self.pipeline.transformer.config.guidance_embeds:
            raise ValueError(
                "This Qwen-Image transformer is guidance-distilled (guidance_embeds=True in its config), which diffusers' "
                f"QwenImageTransformer2DModel cannot run at any guidance_scale (got guidance_scale={guidance_scale}). "
                "Use a checkpoint with guidance_embeds=False, such as Qwen/Qwen-Image, whose guidance is true CFG "
                f"(guidance_scale > 1 samples against the negative prompt {NEGATIVE_PROMPT!r})."
            )

    def set_sampler(self, sampler=None, sampler_kwargs: dict | None = None) -> None:
        super().set_sampler(sampler, sampler_kwargs)
        scheduler = self.pipeline.scheduler
        # `QwenImagePipeline` always hands the scheduler its own sigmas (`set_timesteps(sigmas=..., mu=...)`).
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"sampler={type(scheduler).__name__!r} cannot sample Qwen-Image: QwenImagePipeline passes its own "
                "sigmas to the scheduler, which this one does not take (DPM-Solver++ and DEIS do not). Use "
                "UniPCMultistepScheduler (the default: multistep, 2nd order) or FlowMatchEulerDiscreteScheduler (the "
                "model's own)."
            )

    def pipeline_guidance(self) -> dict[str, float]:
        # The pipeline's own `guidance_scale` feeds guidance-distilled models only: CFG is `true_cfg_scale`.
        return {"true_cfg_scale": self.guidance_scale}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = self._encode(prompts)
        conditioning = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if self.classifier_free_guidance:
            negative_embeds, negative_mask = self._encode([NEGATIVE_PROMPT])
            conditioning.update(
                negative_prompt_embeds=negative_embeds.expand(len(prompts), -1, -1),
                negative_prompt_embeds_mask=negative_mask.expand(len(prompts), -1),
            )
        return conditioning

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's encoding of `prompts` and its padding mask (the pipeline returns `None` for a batch without
        padding; the trainer slices the mask with the embeddings, so it stays a tensor here)."""
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.denoiser.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def sample(self, conditioning, num_inference_steps, resolution, generator) -> Rollout:
        shift_terminal = self.pipeline.scheduler.config.get("shift_terminal")
        if shift_terminal and num_inference_steps < 2:
            # diffusers stretches the schedule so that its last time is `shift_terminal`: from the single time 1 it
            # divides 0 by 0, and the rollout is NaN.
            raise ValueError(
                f"num_inference_steps={num_inference_steps} cannot sample this Qwen-Image model: its schedule ends at "
                f"t = {shift_terminal} (shift_terminal), which needs at least 2 steps. Set num_inference_steps (and "
                "eval_num_inference_steps) to 2 or more."
            )
        latents = self._pipeline_latents(
            conditioning,
            num_inference_steps,
            resolution,
            generator,
            max_sequence_length=self.max_sequence_length,
        )
        # The denoiser was queried at `timestep / 1000` for each scheduler timestep: those are the flow times.
        return Rollout(latents=latents, sigmas=self._visited_flow_times(latents.device))

    def _latent_grid(self, packed: torch.Tensor) -> tuple[int, int]:
        """The resolution (pixels) of the square image of `packed` latents `[B, h w / 4, 4 C]`, and the side of their
        grid of 2 x 2 patches (`h / 2`)."""
        patches_per_side = packed_grid_side(packed, "Qwen-Image")
        return patches_per_side * 2 * self.pipeline.vae_scale_factor, patches_per_side

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipeline, vae = self.pipeline, self.pipeline.vae
        resolution, _ = self._latent_grid(latents)
        latents = pipeline._unpack_latents(latents, resolution, resolution, pipeline.vae_scale_factor).to(vae.dtype)
        # The VAE's per-channel statistics, as the pipeline applies them: `z * std + mean`.
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
        images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]  # the one frame
        return pipeline.image_processor.postprocess(images, output_type="pt").float()

    def predict_velocity(self, model: nn.Module, noisy_latents, sigmas, conditioning) -> torch.Tensor:
        _, patches_per_side = self._latent_grid(noisy_latents)
        return self._transformer_call(
            model, noisy_latents, sigmas, conditioning, [(1, patches_per_side, patches_per_side)]
        )

    @staticmethod
    def _transformer_call(model: nn.Module, hidden_states, sigmas, conditioning, img_shapes) -> torch.Tensor:
        """The pipeline's call of its transformer on `hidden_states`, whose tokens are the grids `img_shapes`
        (frames, height, width), the same for every row."""
        mask = conditioning["prompt_embeds_mask"]
        return model(
            hidden_states=hidden_states,
            timestep=sigmas.to(hidden_states.dtype),
            guidance=None,
            # As the pipeline: a batch without padding runs unmasked attention (and keeps fused attention kernels).
            encoder_hidden_states_mask=None if mask.all() else mask,
            encoder_hidden_states=conditioning["prompt_embeds"],
            img_shapes=[img_shapes] * len(hidden_states),
            return_dict=False,
        )[0]
