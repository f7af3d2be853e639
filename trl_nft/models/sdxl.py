"""Stable Diffusion XL (UNet, VP schedule, epsilon or v prediction) through `StableDiffusionXLPipeline`.

The diffusion is that of SD1.x, so the VP -> flow mapping (`trl_nft.models.sd`) applies unchanged. What SDXL adds is
its conditioning: two CLIP text encoders whose hidden states are concatenated, and the UNet's `added_cond_kwargs`, the
pooled embedding of the second encoder (`text_embeds`) and the size micro-conditioning (`time_ids`: original size, crop
corner, target size), built here as the pipeline builds them for an uncropped square image.
"""

import torch
from diffusers import StableDiffusionXLPipeline

from .sd import StableDiffusionAdapter


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    pipeline_classes = (StableDiffusionXLPipeline,)

    prompt_token_limits = {"tokenizer": "model_max_length", "tokenizer_2": "model_max_length"}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.denoiser.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=self.classifier_free_guidance,
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.classifier_free_guidance:
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        if not (vae.dtype == torch.float16 and vae.config.force_upcast):
            return super().decode(latents)
        # SDXL's VAE overflows in float16 (its config says `force_upcast`): decode in float32, as the pipeline does.
        vae.to(dtype=torch.float32)
        try:
            return super().decode(latents)
        finally:
            vae.to(dtype=torch.float16)

    def _unet_kwargs(self, conditioning: dict[str, torch.Tensor], latents: torch.Tensor) -> dict:
        pooled = conditioning["pooled_prompt_embeds"]
        height, width = (side * self.pipeline.vae_scale_factor for side in latents.shape[-2:])
        time_ids = self.pipeline._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=conditioning["prompt_embeds"].dtype,
            text_encoder_projection_dim=pooled.shape[-1],
        )
        time_ids = time_ids.to(latents.device).repeat(len(latents), 1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
