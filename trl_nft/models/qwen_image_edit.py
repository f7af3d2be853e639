"""Qwen-Image-Edit (`QwenImageEditPipeline`) and Qwen-Image-Edit-2509 / -2511 (`QwenImageEditPlusPipeline`).

All of Qwen-Image holds (`qwen_image.py`: Qwen2.5-VL prompt embeddings with a padding mask, packed latents of a video
VAE, `t` as the timestep, true CFG); what editing adds, read from diffusers' pipelines:
- the condition enters twice. The Qwen2.5-VL encoder sees it: the prompt template holds its vision tokens (Edit-Plus:
  "Picture i: " and the vision tokens of each image), so the prompt embeddings, and the negative prompt's under CFG,
  depend on the image. And the VAE encodes it at its mode, normalised and packed as the target's latents; its tokens
  are joined after the target's along the sequence, the transformer told each image's grid
  (`img_shapes=[[target, condition, ...]]`, each image at its own rotary frame index), and the output is cut back to
  the target's tokens, so the loss covers the generated image only. Edit-Plus takes several images a row, all joined;
- Qwen-Image-Edit-2511's transformer (`zero_cond_t=True`) modulates the condition tokens at time 0, which it tells
  from `img_shapes`: joining the condition as the pipeline does is all it takes;
- sizes: the pipelines fix their conditions' sizes, and so does this adapter, whatever the run's `resolution` (the
  target's): the VAE takes each condition at a 1024² area with its aspect ratio (sides multiples of 32), and the VL
  encoder that image (Edit) or one at a 384² area (Edit-Plus). The cost: a condition is 64² = 4096 tokens beside a
  512 px target's 1024, so a forward is about 5 times as long as Qwen-Image's at the same target, attention more,
  and each more image of a row adds as much; the VL encoder sees about 1.3k vision tokens an image (Edit-Plus: 190,
  its 384² image). Rows of different sizes (or counts) still batch: their latents are padded, and each forward runs
  the rows of one layout of condition grids together (the transformer takes one layout for a whole batch);
- rollouts run the stock pipeline from the stored conditioning, but the pipelines take a condition only as a PIL
  image (they read its `.size`), which they resize and encode on every call (handing back the condition at its VAE
  size would not do: for about 7 % of aspect ratios the pipeline's rounding resizes that again). So rollouts hand them
  a blank image and the transformer sees the rows' stored condition tokens in its place, at the cost of one wasted
  1024² VAE encoding per pipeline call. Edit-Plus samples one prompt a call (its pipeline takes no batch).
"""

import contextlib

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
)
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.utils import logging

from .condition_images import check_condition_counts
from .qwen_image import NEGATIVE_PROMPT, QwenImageAdapter


logger = logging.get_logger(__name__)

#: The conditioning's entries for the condition images: each row's images' packed latents, joined, `[B, n, 4 C]`, and
#: each image's grid of tokens (height, width), `[B, k, 2]`; both zero after the row's own, so that rows of any sizes
#: and counts have one shape.
CONDITION_KEYS = ("image_latents", "image_shapes")


class QwenImageEditAdapter(QwenImageAdapter):
    pipeline_classes = (QwenImageEditPipeline,)
    image_conditioning = "required"
    max_condition_images = 1
    # The edit pipelines never cut a prompt: their encoding takes no `max_sequence_length`.
    prompt_token_limits = {}
    _model = "Qwen-Image-Edit"

    @torch.no_grad()
    def encode_conditions(
        self, prompts: list[str], images: list[list[Image.Image]] | None = None, resolution: int | None = None
    ) -> dict[str, torch.Tensor]:
        check_condition_counts(prompts, images, self.max_condition_images, self._model)
        vae_images = [[self._vae_image(image) for image in row] for row in images]
        prompt_images = [
            [self._prompt_image(image, vae_image) for image, vae_image in zip(row, vae_row, strict=True)]
            for row, vae_row in zip(images, vae_images, strict=True)
        ]
        conditioning = self._encode_rows(prompts, prompt_images, "prompt_embeds")
        if self.classifier_free_guidance:  # the pipelines show the VL encoder the images with the negative prompt too
            negative = self._encode_rows([NEGATIVE_PROMPT] * len(prompts), prompt_images, "negative_prompt_embeds")
            conditioning.update(negative)
        conditioning.update(self._condition_latents(vae_images, conditioning["prompt_embeds"].dtype))
        return conditioning

    def _vae_image(self, image: Image.Image) -> Image.Image:
        """`image` as the pipeline resizes it for its VAE: its aspect ratio at a 1024² area."""
        width, height = calculate_dimensions(VAE_IMAGE_SIZE, image.width / image.height)
        if image.size != (width, height):
            logger.warning_once(
                f"{self._model} takes each condition image at a 1024² area with its aspect ratio (sides multiples of "
                "32), as its pipeline resizes it, whatever the run's resolution: 1024 x 1024, 1184 x 896, ..."
            )
        return self.pipeline.image_processor.resize(image, height, width)

    def _prompt_image(self, image: Image.Image, vae_image: Image.Image) -> Image.Image:
        """What the VL encoder sees of a condition `image` (`vae_image`: at the VAE's size): the VAE's image."""
        return vae_image

    def _encode_rows(self, prompts: list[str], images: list[list[Image.Image]], key: str) -> dict[str, torch.Tensor]:
        """The pipeline's encoding of each prompt with its row's images, a row a call (Edit-Plus's pipeline takes no
        batch), zero-padded to the longest: `{key: [B, L, D], key + "_mask": [B, L]}`."""
        device = self.denoiser.device
        rows = [
            self.pipeline.encode_prompt(prompt=[prompt], image=row_images, device=device)[0][0]  # no padding: no mask
            for prompt, row_images in zip(prompts, images, strict=True)
        ]
        lengths = torch.tensor([len(row) for row in rows], device=device)
        embeds = pad_sequence(rows, batch_first=True)
        return {key: embeds, f"{key}_mask": (torch.arange(embeds.shape[1], device=device) < lengths[:, None]).long()}

    def _condition_latents(self, images: list[list[Image.Image]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The `CONDITION_KEYS` of rows of condition images at the VAE's size."""
        pipeline, device = self.pipeline, self.denoiser.device
        latents, shapes = [], []
        for row in images:
            row_latents, row_shapes = [], []
            for image in row:
                # As the pipeline: the VAE's mode in the prompt embeddings' dtype, normalised, packed 2 x 2.
                pixels = pipeline.image_processor.preprocess(image, image.height, image.width).unsqueeze(2)
                encoded = pipeline._encode_vae_image(pixels.to(device, dtype), generator=None)
                _, channels, _, height, width = encoded.shape
                row_latents.append(pipeline._pack_latents(encoded, 1, channels, height, width)[0])
                row_shapes.append((height // 2, width // 2))
            latents.append(torch.cat(row_latents))
            shapes.append(torch.tensor(row_shapes, device=device))
        return {"image_latents": pad_sequence(latents, batch_first=True), "image_shapes": pad_sequence(shapes, True)}

    @staticmethod
    def _layouts(shapes: torch.Tensor) -> dict[tuple, list[int]]:
        """The rows of each layout of condition grids (the row's images' `(height, width)`, in order)."""
        layouts = {}
        for row, grids in enumerate(shapes.tolist()):
            layouts.setdefault(tuple((height, width) for height, width in grids if height), []).append(row)
        return layouts

    def _rollout_groups(self, shapes: torch.Tensor) -> list[tuple[tuple, list[int]]]:
        """The rows each rollout call of the pipeline samples together, with their layout: those of one layout."""
        return list(self._layouts(shapes).items())

    @staticmethod
    def _joined(target: torch.Tensor, conditioning: dict, grids: tuple, side: int) -> tuple[torch.Tensor, list]:
        """The transformer's `hidden_states` (the target's tokens, then the rows' condition tokens, all of one layout
        of `grids`) and each row's `img_shapes` (the target's `side` x `side` grid, then the conditions')."""
        tokens = sum(height * width for height, width in grids)
        condition = conditioning["image_latents"][:, :tokens].to(target.dtype)
        return torch.cat([target, condition], dim=1), [(1, side, side), *((1, *grid) for grid in grids)]

    @torch.no_grad()
    def _pipeline_latents(self, conditioning, num_inference_steps, resolution, generator, **extra):
        prompt_keys = [key for key in conditioning if key not in CONDITION_KEYS]
        side = resolution // (2 * self.pipeline.vae_scale_factor)
        rows, latents = [], []
        for grids, group in self._rollout_groups(conditioning["image_shapes"]):
            index = torch.tensor(group, device=conditioning["image_shapes"].device)
            part = {key: value[index] for key, value in conditioning.items()}
            with self._conditions_joined(part, grids, side):
                latents.append(
                    super()._pipeline_latents(
                        {key: part[key] for key in prompt_keys},
                        num_inference_steps,
                        resolution,
                        [generator[row] for row in group] if isinstance(generator, list) else generator,
                        image=Image.new("RGB", (32, 32)),  # a blank the transformer never sees
                        **extra,
                    )
                )
            rows += group
        latents = torch.cat(latents)
        return latents[torch.tensor(rows, device=latents.device).argsort()]  # back in the rows' order

    @contextlib.contextmanager
    def _conditions_joined(self, conditioning: dict[str, torch.Tensor], grids: tuple, side: int):
        """Within this context the pipeline's transformer calls (conditional and CFG passes) take the rows' own
        condition tokens and grids after the target's, in place of those of the image the pipeline was handed; the
        pipeline cuts the output back to the target's tokens itself."""

        def join(module, args, kwargs):
            target = kwargs["hidden_states"][:, : side * side]
            hidden_states, img_shapes = self._joined(target, conditioning, grids, side)
            return args, {**kwargs, "hidden_states": hidden_states, "img_shapes": [img_shapes] * len(target)}

        handle = self.denoiser.register_forward_pre_hook(join, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def predict_velocity(self, model: nn.Module, noisy_latents, sigmas, conditioning) -> torch.Tensor:
        _, side = self._latent_grid(noisy_latents)
        rows, velocities = [], []
        for grids, group in self._layouts(conditioning["image_shapes"]).items():
            index = torch.tensor(group, device=noisy_latents.device)
            part = {key: value[index] for key, value in conditioning.items()}
            hidden_states, img_shapes = self._joined(noisy_latents[index], part, grids, side)
            velocity = self._transformer_call(model, hidden_states, sigmas[index], part, img_shapes)
            velocities.append(velocity[:, : noisy_latents.shape[1]])  # the target's tokens
            rows += group
        return torch.cat(velocities)[torch.tensor(rows, device=noisy_latents.device).argsort()]


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    pipeline_classes = (QwenImageEditPlusPipeline,)
    # The pipeline takes any number (Qwen suggests 1 to 3 for Qwen-Image-Edit-2509).
    max_condition_images = None
    _model = "Qwen-Image-Edit-Plus"

    def _prompt_image(self, image: Image.Image, vae_image: Image.Image) -> Image.Image:
        # Edit-Plus shows the VL encoder each image at a 384² area with its aspect ratio.
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
        return self.pipeline.image_processor.resize(image, height, width)

    def _rollout_groups(self, shapes: torch.Tensor) -> list[tuple[tuple, list[int]]]:
        # `QwenImageEditPlusPipeline` samples one prompt a call.
        return [(grids, [row]) for grids, group in self._layouts(shapes).items() for row in group]
