"""Wan 2.1 image-to-video through `WanImageToVideoPipeline`: Wan2.1-I2V-14B-480P and -720P and their fine-tunes. A
video is generated from a prompt and its first frame, the row's condition image (the dataset's `image` column).

Everything of Wan 2.1 text-to-video holds (`wan.py`: the video VAE's normalised latents, UMT5 prompts zero-padded,
timestep `1000 t`, CFG as two calls, any flow sampler). What image-to-video adds, read from the pipeline:
- the condition enters twice: CLIP's penultimate hidden states of the image, which the transformer takes as image
  tokens (`encoder_hidden_states_image`), and its VAE latents, joined to the noisy latents along the channels: 16 noise
  + 4 mask + 16 condition = 36 channels. The condition is a video of the image followed by black frames, encoded and
  normalised as the latents are, and the mask is 1 on the first latent frame and 0 after it (4 channels: the VAE's 4
  frames per latent frame). Only the 16 noise channels are generated, trained and decoded: frame 0 is generated too,
  as Wan 2.1 does (no frame is held fixed);
- the transformer splits its cross-attention context by position: all but the last 512 positions are image tokens,
  so the prompt always fills exactly 512 (zero-padded after the run's `max_sequence_length` tokens, as the pipeline's
  own default pads it);
- the pipeline takes the target's `height` and `width` and stretches the condition image to them for the VAE (no
  crop; its example resizes the image to the video's size first), so here each image is stretched to the run's square
  `resolution` first (give square images to keep their proportions), and both CLIP (whose processor resizes and
  centre-crops it to its own input) and the VAE see that image, as the pipeline does when given it;
- one pipeline call takes one condition image for its whole batch, and it encodes the image itself (it refuses
  precomputed `image_embeds` beside the image it needs for the VAE), so rollouts call it once per distinct image;
- Wan 2.2's models share the pipeline class (A14B: two transformers by `boundary_ratio` and no image encoder; TI2V-5B:
  `expand_timesteps`, frame 0 held fixed at time 0) and are refused.
"""

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch.nn import functional

from .base import Rollout
from .condition_images import check_condition_counts, resize_condition_images
from .wan import WanAdapter


#: Prompt positions in the transformer's cross-attention context, fixed in diffusers' `WanAttnProcessor` (the image
#: tokens are the positions before the last 512), not in a config.
PROMPT_POSITIONS = 512


class WanImageToVideoAdapter(WanAdapter):
    pipeline_classes = (WanImageToVideoPipeline,)
    # Wan 2.1's, and the cross-attention's key and value projections of the image tokens: diffusers' LoRA loader takes
    # a LoRA without them for a text-to-video one and pads it with zeros for them, with a warning.
    lora_target_modules = (*WanAdapter.lora_target_modules, "attn2.add_k_proj", "attn2.add_v_proj")
    image_conditioning = "required"
    max_condition_images = 1
    supported_models = "a Wan 2.1 image-to-video model (model='wan2.1-i2v-14b-480p' or 'wan2.1-i2v-14b-720p')"

    def __init__(
        self,
        pipeline: WanImageToVideoPipeline,
        guidance_scale: float = 1.0,
        max_sequence_length: int = 128,
        num_frames: int | None = None,
    ):
        super().__init__(pipeline, guidance_scale, max_sequence_length, num_frames)
        if pipeline.image_encoder is None or pipeline.image_processor is None:
            raise ValueError(
                "This WanImageToVideoPipeline has no `image_encoder` or `image_processor`, which Wan 2.1 "
                "image-to-video encodes the condition image with (CLIP): load the model with both components."
            )
        self.max_sequence_length = min(self.max_sequence_length, PROMPT_POSITIONS)

    def _wan_2_2_feature(self, pipeline) -> str | None:
        feature = super()._wan_2_2_feature(pipeline)
        if feature is None and pipeline.transformer.config.image_dim is None:
            return "a transformer without CLIP image tokens"  # as Wan 2.2's image-to-video experts
        return feature

    def pipeline_call_code(self, num_inference_steps: int) -> tuple[list[str], dict[str, str]]:
        # The pipeline pads the prompt to `max_sequence_length` positions, and rollouts to the 512 the transformer
        # takes: its default (512) samples as they do, for every prompt of up to the run's length.
        imports, arguments = super().pipeline_call_code(num_inference_steps)
        return imports, {key: value for key, value in arguments.items() if key != "max_sequence_length"}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # Zero-padded to the 512 prompt positions the transformer expects, as a prompt of the run's length is by the
        # pipeline.
        return {
            key: functional.pad(embeds, (0, 0, 0, PROMPT_POSITIONS - embeds.shape[1]))
            for key, embeds in super().encode_prompts(prompts).items()
        }

    @torch.no_grad()
    def encode_conditions(
        self, prompts: list[str], images: list[list[Image.Image]] | None = None, resolution: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The prompts (`prompt_embeds`), and each row's condition image stretched to `resolution` (for rollouts:
        `image`, `[B, H, W, 3]` uint8), its CLIP tokens (`image_embeds`) and its mask and VAE latents (`condition`,
        20 channels)."""
        check_condition_counts(prompts, images, self.max_condition_images, "Wan 2.1 image-to-video")
        resolution = resolution or self.default_resolution()
        self.check_resolution(resolution)
        pipeline, device = self.pipeline, self.denoiser.device
        # Stretched as the pipeline's `video_processor.preprocess(image, height, width)` stretches it for the VAE
        # (which then leaves it as it is): what the pipeline is given at sampling.
        resized = resize_condition_images(images, resolution, pipeline.video_processor, "Wan 2.1 image-to-video")
        stretched = [image for (image,) in resized]
        pixels = pipeline.video_processor.preprocess(stretched, height=resolution, width=resolution)
        # The pipeline's own mask and condition latents, one image at a time (its `prepare_latents` repeats one image
        # over the batch); the noise is drawn at sampling, and a placeholder keeps it from drawing any here.
        condition = [
            pipeline.prepare_latents(
                pixels[row : row + 1].to(device, torch.float32),
                1,
                pipeline.vae.config.z_dim,
                resolution,
                resolution,
                self.num_frames,
                torch.float32,
                device,
                latents=torch.empty(0),
            )[1]
            for row in range(len(stretched))
        ]
        return {
            **self.encode_prompts(prompts),
            "image": torch.from_numpy(np.stack([np.asarray(image) for image in stretched])).to(device),
            "image_embeds": pipeline.encode_image(stretched, device),
            "condition": torch.cat(condition),
        }

    @torch.no_grad()
    def sample(self, conditioning, num_inference_steps, resolution, generator) -> Rollout:
        pipeline = self.pipeline
        latent_side = resolution // pipeline.vae_scale_factor_spatial
        latent_frames = (self.num_frames - 1) // pipeline.vae_scale_factor_temporal + 1
        shape = (len(conditioning["image"]), pipeline.vae.config.z_dim, latent_frames, latent_side, latent_side)
        # The noise the pipeline would draw for the whole batch (per sample from its own generator, when given one
        # each), drawn once so that the calls below, one per condition image, start each sample from its own.
        noise = randn_tensor(shape, generator=generator, device=pipeline._execution_device, dtype=torch.float32)
        latents = torch.empty_like(noise)
        for rows in self._rows_by_condition_image(conditioning["image"]):
            inputs = {key: value[rows] for key, value in conditioning.items() if key.endswith("prompt_embeds")}
            inputs["image"] = Image.fromarray(conditioning["image"][rows[0]].cpu().numpy())
            latents[rows] = self._pipeline_frames(
                {**inputs, "latents": noise[rows]}, num_inference_steps, resolution, generator=None
            )
        return Rollout(latents=latents, sigmas=self._visited_flow_times(latents.device))

    @staticmethod
    def _rows_by_condition_image(images: torch.Tensor) -> list[torch.Tensor]:
        """The indices of the rows that share a condition image, group by group."""
        groups: list[list[int]] = []
        for row in range(len(images)):
            for group in groups:
                if torch.equal(images[group[0]], images[row]):
                    group.append(row)
                    break
            else:
                groups.append([row])
        return [torch.tensor(group) for group in groups]

    def _transformer_inputs(self, noisy_latents, conditioning) -> dict[str, torch.Tensor]:
        # As the pipeline: the noisy latents, then the mask and condition latents, along the channels; the image
        # tokens beside the prompt. The velocity has the noisy latents' 16 channels.
        return {
            "hidden_states": torch.cat([noisy_latents, conditioning["condition"]], dim=1),
            "encoder_hidden_states": conditioning["prompt_embeds"],
            "encoder_hidden_states_image": conditioning["image_embeds"],
        }
