"""FLUX.1 (MMDiT + single-stream blocks, rectified flow) through `FluxPipeline`: dev, schnell and their fine-tunes.

What is particular to FLUX.1, all read from diffusers' `FluxPipeline`:
- latents are packed: each 2 x 2 patch of the VAE's `[C, h, w]` latents is one token of `4 C` channels, so the rollout
  latents (and everything the trainer does with them) are `[B, h w / 4, 4 C]`; the transformer also takes the
  positions of those tokens (`img_ids`) and of the text tokens (`txt_ids`, all zero);
- the denoiser's timestep is the flow time `t` itself (the pipeline passes `timestep / 1000`);
- the schedule shifts with the image sequence length (`mu`, computed by the pipeline), so the time grid a rollout
  returns depends on the resolution;
- FLUX.1-dev is guidance-distilled: its guidance scale is an input embedding (`guidance`), not a CFG batch, so every
  rollout is one forward per step whatever the scale, and the training forwards take the same scale. FLUX.1-schnell is
  timestep-distilled and has no guidance input.
"""

import torch
from diffusers import FluxPipeline
from torch import nn

from .base import MMDIT_ATTENTION_TARGETS, DiffusionAdapter, Rollout, check_resolution_multiple, packed_grid_side


class FluxAdapter(DiffusionAdapter):
    pipeline_classes = (FluxPipeline,)
    denoiser_name = "transformer"
    # Flow-Factory's FLUX.1 targets for its NFT and GRPO recipes (`Flux1Adapter.default_target_modules`), which are
    # diffusers' DreamBooth-LoRA FLUX defaults: the joint blocks' attention and feed-forward projections. The `attn.*`
    # names also match the single-stream blocks' query, key and value projections.
    lora_target_modules = (
        *MMDIT_ATTENTION_TARGETS,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )

    prompt_token_limits = {"tokenizer": "model_max_length", "tokenizer_2": "max_sequence_length"}

    def __init__(self, pipeline: FluxPipeline, guidance_scale: float = 1.0, max_sequence_length: int = 128):
        super().__init__(pipeline, guidance_scale, max_sequence_length)
        # The pipeline refuses T5 prompts longer than 512 tokens; a tiny model's tokenizer may declare fewer.
        t5_tokenizer = pipeline.tokenizer_2
        self.max_sequence_length = min(max_sequence_length, 512, getattr(t5_tokenizer, "model_max_length", 512))

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (FLUX.1-dev), or has no guidance (schnell)."""
        return bool(self.pipeline.transformer.config.guidance_embeds)

    @property
    def classifier_free_guidance(self) -> bool:
        return False  # dev's guidance is an embedding, schnell has none: never a batch of negative prompts

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        scale = self.pipeline.vae_scale_factor
        check_resolution_multiple(resolution, scale * 2, "FLUX.1", f"VAE scale {scale} x the 2 x 2 latent packing")

    def check_guidance(self, guidance_scale: float) -> None:
        if guidance_scale > 1.0 and not self.pipeline.transformer.config.guidance_embeds:
            raise ValueError(
                f"guidance_scale={guidance_scale} is not supported by this FLUX.1 model: it is timestep-distilled "
                "(FLUX.1-schnell; its transformer has no guidance input) and samples without guidance. Set "
                "guidance_scale=1.0."
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.denoiser.device,
            max_sequence_length=self.max_sequence_length,
        )
        # `text_ids` are all zero and not batch-first: rebuilt where needed rather than carried with each image.
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def sample(self, conditioning, num_inference_steps, resolution, generator, **pipeline_inputs) -> Rollout:
        """`pipeline_inputs`: the family's further pipeline arguments (FLUX.1 Kontext: its condition)."""
        latents = self._pipeline_latents(
            conditioning,
            num_inference_steps,
            resolution,
            generator,
            max_sequence_length=self.max_sequence_length,
            **pipeline_inputs,
        )
        # The denoiser was queried at `timestep / 1000` for each scheduler timestep: those are the flow times.
        return Rollout(latents=latents, sigmas=self._visited_flow_times(latents.device))

    def _latent_side(self, packed: torch.Tensor) -> int:
        """The side of the (square) unpacked latent grid of `packed` latents `[B, h w / 4, 4 C]`."""
        return 2 * packed_grid_side(packed, "FLUX.1")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipeline, vae = self.pipeline, self.pipeline.vae
        resolution = self._latent_side(latents) * pipeline.vae_scale_factor
        latents = pipeline._unpack_latents(latents, resolution, resolution, pipeline.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _image_tokens(self, noisy_latents, conditioning, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's image tokens and their positions (`img_ids`): the target's (FLUX.1 Kontext adds its
        condition's)."""
        half_side = self._latent_side(noisy_latents) // 2
        image_ids = self.pipeline._prepare_latent_image_ids(
            len(noisy_latents), half_side, half_side, noisy_latents.device, dtype
        )
        return noisy_latents, image_ids

    def predict_velocity(self, model: nn.Module, noisy_latents, sigmas, conditioning) -> torch.Tensor:
        prompt_embeds = conditioning["prompt_embeds"]
        batch_size, device = len(noisy_latents), noisy_latents.device
        image_tokens, image_ids = self._image_tokens(noisy_latents, conditioning, prompt_embeds.dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=prompt_embeds.dtype)
        guidance = None
        if self.guidance_embeds:  # as the pipeline makes it: float32, one value per image
            guidance = torch.full((batch_size,), self.guidance_scale, device=device, dtype=torch.float32)
        velocity = model(
            hidden_states=image_tokens,
            timestep=sigmas.to(noisy_latents.dtype),
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return velocity[:, : noisy_latents.shape[1]]  # the target's tokens (a condition's follow them)
