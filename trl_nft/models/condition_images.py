"""What the image-conditioned adapters share about a row's condition images: how many it may carry, and their size.

The target is `resolution` pixels square for every family; a family whose pipeline takes conditions of any size resizes
them to the target's size with the pipeline's own resize, so that rows of mixed sizes batch, and says so in the log
once instead of resizing silently (the pipelines' own resizing, e.g. FLUX.1 Kontext's to its preferred resolutions,
is kept off).
"""

from PIL import Image
from transformers.utils import logging


logger = logging.get_logger(__name__)


def check_condition_counts(
    prompts: list[str], images: list[list[Image.Image]] | None, most: int | None, model: str
) -> None:
    """A `ValueError` when rows carry no condition images (`images` None: the dataset has no 'image' column), or naming
    the first row (by its prompt) that carries more than `most`."""
    if images is None:
        raise ValueError(
            f"{model} edits or animates an image: every row needs its condition image in the dataset's 'image' column "
            "(a PIL image, a datasets.Image or a path)."
        )
    for prompt, row_images in zip(prompts, images, strict=True):
        if most is not None and len(row_images) > most:
            raise ValueError(
                f"The row with prompt {prompt!r} has {len(row_images)} condition images in its 'image' column, but "
                f"{model} takes at most {most} per row. Give each row at most {most} image(s)."
            )


def resize_condition_images(
    images: list[list[Image.Image]], side: int, image_processor, model: str
) -> list[list[Image.Image]]:
    """Each row's images resized to `side` x `side` pixels by the pipeline's `image_processor` (its `resize`, as the
    pipeline resizes a condition); the first time a size changes, a warning says so."""
    if any(image.size != (side, side) for row in images for image in row):
        logger.warning_once(
            f"{model} condition images are resized to {side} x {side} pixels, the size it takes them at for this "
            "run's `resolution`, without keeping their aspect ratio. Crop or pad the dataset's images to squares to "
            "keep it."
        )
    return [[image_processor.resize(image, side, side) for image in row] for row in images]
