"""Condition images: the `image` column of a prompt dataset, for the families that edit an image or animate one.

A row's `image` holds one image or a list of them, each a PIL image, a `datasets.Image` value (decoded: a PIL image;
undecoded: a dict with `bytes` or `path`), or a path. A dataset read from a JSONL / CSV file or a folder holds paths
relative to that file or folder: `resolve_image_paths` makes them absolute when the dataset is loaded. `image` is an
ordinary column name: it still reaches the reward functions as a column, and the rewards also get the opened images
as the keyword `condition_images` (one RGB PIL image per sample, a list of them for a multi-image row).
"""

import hashlib
import io
import os

from datasets import Dataset
from PIL import Image, UnidentifiedImageError


#: The dataset column that holds a row's condition image(s).
CONDITION_COLUMN = "image"
#: The keyword under which reward functions receive the opened condition images.
CONDITION_IMAGES_KEYWORD = "condition_images"


def open_condition_images(value) -> list[Image.Image]:
    """The condition images of one row's `image` value, as RGB PIL images (a `ValueError` or `OSError` saying which
    entry could not be opened)."""
    entries = value if isinstance(value, list | tuple) else [value]
    if not entries:
        raise ValueError("the image list is empty")
    return [_open_one(entry).convert("RGB") for entry in entries]


def _open_one(entry) -> Image.Image:
    if isinstance(entry, Image.Image):
        return entry
    if isinstance(entry, dict) and entry.get("bytes") is not None:  # an undecoded `datasets.Image`
        return _load(io.BytesIO(entry["bytes"]), "the image bytes")
    if isinstance(entry, dict) and entry.get("path") is not None:
        entry = entry["path"]
    if isinstance(entry, str | os.PathLike):
        path = os.path.expanduser(os.fspath(entry))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no image file {os.fspath(entry)!r}")
        return _load(path, repr(os.fspath(entry)))
    raise TypeError(f"an image must be a PIL image, a datasets.Image value or a path, got {type(entry).__name__}")


def _load(source, what: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what} is not an image PIL can read ({error})") from error
    return image


def row_condition_images(rows: list[dict]) -> list[list[Image.Image]] | None:
    """Each row's condition images, or None when the rows have no `image` column."""
    if not rows or CONDITION_COLUMN not in rows[0]:
        return None
    return [open_condition_images(row[CONDITION_COLUMN]) for row in rows]


def reward_condition_images(rows: list[dict], images: list[list[Image.Image]]) -> list:
    """What rewards receive as `condition_images`: per row its image, or its list of images when the row's `image`
    value is a list."""
    return [
        opened if isinstance(row[CONDITION_COLUMN], list | tuple) else opened[0]
        for row, opened in zip(rows, images, strict=True)
    ]


def reward_columns(rows: list[dict]) -> dict[str, list]:
    """The keyword lists reward functions receive beside the samples and the prompts: every dataset column but
    `prompt`, and for rows with condition images, `condition_images`."""
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    images = row_condition_images(rows)
    if images is not None:
        columns[CONDITION_IMAGES_KEYWORD] = reward_condition_images(rows, images)
    return columns


def fingerprint(images: list[Image.Image]) -> str:
    """A key that identifies condition images by their pixels: the prompt-embedding cache keys on it, beside the
    prompt, and rows sharing a prompt and an image are encoded once."""
    digest = hashlib.sha1()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def check_condition_images(dataset: Dataset, name: str) -> None:
    """Open every row's condition images (when `dataset` has an `image` column), so that a file that cannot be read
    is an error naming its row before the model loads, not in the middle of a run."""
    if CONDITION_COLUMN not in dataset.column_names:
        return
    values = _column_values(dataset)
    for index in range(len(dataset)):
        try:  # a `datasets.Image` column decodes as it is read
            open_condition_images(next(values))
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"{name} row {index}: its '{CONDITION_COLUMN}' cannot be opened: {error}.") from None


def check_image_conditioning(dataset: Dataset, name: str, image_conditioning: str, most: int | None, model: str):
    """A `ValueError` unless `dataset`'s rows suit a family whose `image_conditioning` is "none", "optional" or
    "required" and that takes at most `most` condition images a row (`DiffusionAdapter`'s attributes)."""
    has_images = CONDITION_COLUMN in dataset.column_names
    if image_conditioning == "none" and has_images:
        raise ValueError(
            f"{name} has an '{CONDITION_COLUMN}' column, but {model} generates from text alone and takes no condition "
            "images. Train an image-conditioned model (docs/editing.md lists them), or rename or remove the column."
        )
    if image_conditioning == "required" and not has_images:
        raise ValueError(
            f"{model} edits or animates an image: every row of {name} needs its condition image in an "
            f"'{CONDITION_COLUMN}' column (a PIL image, a datasets.Image or a path; columns now: {dataset.column_names})."
        )
    if has_images and most is not None:
        for index, value in enumerate(_column_values(dataset)):
            count = len(value) if isinstance(value, list | tuple) else 1
            if count > most:
                raise ValueError(
                    f"{name} row {index} has {count} condition images, but {model} takes at most {most} a row. "
                    "Give fewer images, or train a model that takes several (e.g. qwen-image-edit-2509)."
                )


def _column_values(dataset: Dataset):
    """The `image` values one row at a time (a whole `datasets.Image` column at once could fill the memory)."""
    for row in dataset.select_columns([CONDITION_COLUMN]):
        yield row[CONDITION_COLUMN]


def resolve_image_paths(dataset: Dataset, base_dir: str) -> Dataset:
    """`dataset` with relative paths in its `image` column made relative to `base_dir` (the folder of the file the
    rows were read from); other values unchanged."""
    if CONDITION_COLUMN not in dataset.column_names or "Image(" in str(dataset.features[CONDITION_COLUMN]):
        return dataset  # images already (an image folder's `datasets.Image` column), not paths

    return dataset.map(_absolute_paths, fn_kwargs={"base_dir": base_dir}, desc="Finding the condition images")


def _absolute_paths(row: dict, base_dir: str) -> dict:
    def absolute(value):
        if isinstance(value, list):
            return [absolute(entry) for entry in value]
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
            return os.path.join(base_dir, value)
        return value

    return {CONDITION_COLUMN: absolute(row[CONDITION_COLUMN])}
