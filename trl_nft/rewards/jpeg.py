"""JPEG (in)compressibility: the size of the image saved as a quality-95 JPEG, in kB (as in DDPO)."""

import io

from PIL import Image

from . import register_reward


def jpeg_size_kb(image: Image.Image) -> float:
    """Size in kB (1000 bytes) of `image` saved by PIL as JPEG at quality 95."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


@register_reward("jpeg_compressibility")
def jpeg_compressibility(images: list[Image.Image], prompts: list[str], **kwargs) -> list[float]:
    """Reward = -(JPEG size in kB): smaller files score higher."""
    return [-jpeg_size_kb(image) for image in images]


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(images: list[Image.Image], prompts: list[str], **kwargs) -> list[float]:
    """Reward = +(JPEG size in kB): larger files score higher."""
    return [jpeg_size_kb(image) for image in images]
