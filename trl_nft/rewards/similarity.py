"""Image-to-image similarity for edits: how much of the source image the edited image keeps (`image_similarity`).

Two embeddings are in use for this: CLIP's image embedding (CLIP-I) and a self-supervised ViT's class token (DINO,
DINOv2), which follows layout and identity more and semantics less; DreamBooth's evaluation reports both.
"""

import functools

import torch
from PIL import Image

from . import register_reward
from .base import RewardModel, resolve_checkpoint, source_images
from .clip import clip_image_embeds, load_clip


def class_token_embeds(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised class tokens `[B, hidden_size]` in float32: the first token of the model's last hidden state
    (after its final layer norm in DINO and DINOv2), the images preprocessed by the checkpoint's image processor."""
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    embeds = model(pixel_values=pixels.to(model.device, model.dtype)).last_hidden_state[:, 0].float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


@register_reward("image_similarity")
class ImageSimilarity(RewardModel):
    """The cosine similarity of the embeddings of each edited image and its source image (`condition_images`), in
    [-1, 1]: a preservation reward, highest for an edit that changes nothing, so weigh it against an instruction
    reward (e.g. `edit_judge`). A sample with several source images scores the mean of its similarities to each.

    The embedding follows the checkpoint:
    - a CLIP (`model_type` "clip"; the default, `openai/clip-vit-large-patch14`, shares its weights with
      `clip_score`): the projected image embedding, preprocessed as `clip_score` preprocesses (CLIP-I);
    - any other vision model that transformers' `AutoModel` loads, e.g. DINOv2 (`facebook/dinov2-base`) or DINO
      (`facebook/dino-vits16`): the class token of its last hidden state, the images preprocessed by the
      checkpoint's `AutoImageProcessor` (the DINO score).

    Needs `condition_images`: the trainer passes them in image-conditioned runs.
    """

    default_checkpoint = "openai/clip-vit-large-patch14"

    def load(self):
        """The embedding function of the checkpoint's kind: images -> L2-normalised float32 embeddings `[B, D]`."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        path = resolve_checkpoint(self.checkpoint, "image_similarity")
        if AutoConfig.from_pretrained(path).model_type == "clip":
            return functools.partial(
                clip_image_embeds, *load_clip(self.checkpoint, self.checkpoint, self.device, self.dtype)
            )
        model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        return functools.partial(class_token_embeds, model, AutoImageProcessor.from_pretrained(path))

    def score(self, embed, images: list[Image.Image], prompts: list[str], condition_images, **columns) -> list[float]:
        sources = source_images(condition_images, self.name)
        embeds = embed(list(images) + [image for row in sources for image in row])  # one forward for all
        results, source_embeds = embeds[: len(images)], embeds[len(images) :].split([len(row) for row in sources])
        return [(row @ result).mean().item() for result, row in zip(results, source_embeds, strict=True)]
