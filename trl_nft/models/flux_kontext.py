"""FLUX.1 Kontext (instruction editing with FLUX.1's transformer) through `FluxKontextPipeline`.

All of FLUX.1 holds (`flux.py`: packed latents, `t` as the timestep, the dynamic shift, Kontext-dev's guidance
embedding); what Kontext adds, read from diffusers' `FluxKontextPipeline`:
- one condition image per prompt, encoded by the VAE at its mode (`sample_mode="argmax"`) and normalised as the
  target's latents (shift, then scale), packed 2 x 2 like them and joined after them along the sequence; its tokens'
  positions are the target's grid at first coordinate 1 (the target's is 0), and the transformer's output is cut back
  to the target's tokens, so the loss covers the generated image only;
- the schedule's shift follows the target's sequence length alone, and the pipeline always hands the scheduler its
  own sigmas with the shift `mu` (FLUX.1's drops its sigmas for a flow-sigma scheduler; Kontext's does not), which
  DPM-Solver++ cannot take: rollouts default to UniPC, also a second-order multistep solver, on the same time grid;
- the pipeline resizes the condition to Kontext's preferred resolutions (unless `_auto_resize=False`) and the target to
  a `max_area` of 1024² pixels: here the condition is resized to the run's `resolution` (square, as the target; said
  once in the log), and rollouts hand the pipeline the condition's latents (which it neither resizes nor encodes again)
  and `max_area=resolution²`, so that it resizes nothing.
"""

import inspect

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from .base import Rollout, packed_grid_side
from .condition_images import check_condition_counts, resize_condition_images
from .flux import FluxAdapter


#: The conditioning's entries for the condition image: its packed latents `[B, n, 4 C]` and their positions `[B, n, 3]`
#: (the same for every row: the conditions all have the target's size).
CONDITION_KEYS = ("image_latents", "image_ids")


class FluxKontextAdapter(FluxAdapter):
    pipeline_classes = (FluxKontextPipeline,)
    default_sampler = "UniPCMultistepScheduler"
    image_conditioning = "required"
    max_condition_images = 1

    def set_sampler(self, sampler=None, sampler_kwargs: dict | None = None) -> None:
        super().set_sampler(sampler, sampler_kwargs)
        scheduler = self.pipeline.scheduler
        if not {"sigmas", "mu"} <= set(inspect.signature(scheduler.set_timesteps).parameters):
            raise ValueError(
                f"sampler={type(scheduler).__name__!r} cannot sample FLUX.1 Kontext: FluxKontextPipeline always "
                "passes the scheduler its own sigmas and a shift `mu`. Use UniPCMultistepScheduler (the default) or "
                "FlowMatchEulerDiscreteScheduler (the model's own), by class name."
            )

    def pipeline_size_arguments(self, resolution: int) -> dict:
        # Left to itself the pipeline grows the target to a 1024² area and resizes a condition to Kontext's sizes.
        area = {"max_area": resolution * resolution, "_auto_resize": False}
        return {**super().pipeline_size_arguments(resolution), **area}

    @torch.no_grad()
    def encode_conditions(
        self, prompts: list[str], images: list[list[Image.Image]] | None = None, resolution: int | None = None
    ) -> dict[str, torch.Tensor]:
        check_condition_counts(prompts, images, self.max_condition_images, "FLUX.1 Kontext")
        pipeline, resolution = self.pipeline, resolution or self.default_resolution()
        conditioning = self.encode_prompts(prompts)
        dtype = conditioning["prompt_embeds"].dtype
        resized = resize_condition_images(images, resolution, pipeline.image_processor, "FLUX.1 Kontext")
        pixels = pipeline.image_processor.preprocess([row[0] for row in resized], resolution, resolution)
        # As the pipeline: in the prompt embeddings' dtype, the VAE's mode, shifted and scaled.
        latents = pipeline._encode_vae_image(pixels.to(self.denoiser.device, dtype), generator=None)
        batch_size, channels, height, width = latents.shape
        image_ids = pipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, latents.device, dtype)
        image_ids[..., 0] = 1  # the target's grid, at first coordinate 1
        conditioning["image_latents"] = pipeline._pack_latents(latents, batch_size, channels, height, width)
        conditioning["image_ids"] = image_ids.expand(batch_size, -1, -1)
        return conditioning

    @torch.no_grad()
    def sample(self, conditioning, num_inference_steps, resolution, generator) -> Rollout:
        pipeline = self.pipeline
        packed = conditioning["image_latents"]
        side = 2 * packed_grid_side(packed, "FLUX.1 Kontext") * pipeline.vae_scale_factor
        # The pipeline takes a condition's latents, unpacked, as its `image` and packs them itself.
        image = pipeline._unpack_latents(packed, side, side, pipeline.vae_scale_factor)
        prompts = {key: value for key, value in conditioning.items() if key not in CONDITION_KEYS}
        return super().sample(
            prompts, num_inference_steps, resolution, generator, image=image, max_area=resolution * resolution
        )

    def _image_tokens(self, noisy_latents, conditioning, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        target, target_ids = super()._image_tokens(noisy_latents, conditioning, dtype)
        # As the pipeline: the condition's tokens after the target's, and their positions likewise (`img_ids` has no
        # batch dimension: every row's are the same).
        tokens = torch.cat([target, conditioning["image_latents"].to(target.dtype)], dim=1)
        return tokens, torch.cat([target_ids, conditioning["image_ids"][0]])
