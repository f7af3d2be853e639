"""Loaders of the usual prompt sets, each a `datasets.Dataset` with a `prompt` column (plus what its reward needs).

`path_or_id` is a local file (`.txt`: one prompt per line; `.jsonl`/`.json`, `.csv`, `.parquet`), a local dataset
folder, or a Hub dataset id; all go through `datasets.load_dataset` (with the matching builder for a file). Relative
paths in an `image` column (condition images, for editing models) are read relative to the file or folder.
"""

import os

from datasets import Dataset, load_dataset

from ..conditions import resolve_image_paths
from ..prompt_formats import quoted_text


#: The `datasets` builder that reads each kind of prompt file.
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_source(path_or_id: str, split: str = "train") -> Dataset:
    """`split` of a Hub dataset or a local dataset folder, or the rows of a local file (a `.txt` file gives one `text`
    row per line). A local path that does not exist is an error naming it, not a Hub lookup."""
    path = os.path.expanduser(path_or_id)
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(f"Cannot read prompts from {path_or_id!r}: use one of {', '.join(FILE_BUILDERS)}.")
        dataset = load_dataset(FILE_BUILDERS[extension], data_files=path, split="train")
        return resolve_image_paths(dataset, os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        return resolve_image_paths(load_dataset(path, split=split), os.path.abspath(path))
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise FileNotFoundError(f"Prompt file {path_or_id!r} does not exist (nor is it a Hub dataset id).")
    return load_dataset(path, split=split)


def _column(dataset: Dataset, names: tuple[str, ...], source: str) -> list:
    for name in names:
        if name in dataset.column_names:
            return dataset[name]
    raise ValueError(f"{source}: no {' or '.join(map(repr, names))} column; columns: {dataset.column_names}.")


def ocr_prompts(path_or_id: str, split: str = "train") -> Dataset:
    """Text-rendering prompts (Flow-GRPO's `dataset/ocr/{train,test}.txt` format: one prompt per line, the text to
    render between double quotes), with their `ocr_text` column: that quoted text, which the `ocr` reward reads.

    Takes the `prompt` column (`text` for a `.txt` file); blank lines are skipped. A prompt without quoted text is an
    error listing the first ones: the `ocr` reward could not score it.
    """
    source = load_prompt_source(path_or_id, split)
    prompts = [
        prompt.strip() for prompt in _column(source, ("prompt", "text"), path_or_id) if prompt and prompt.strip()
    ]
    texts = [quoted_text(prompt) for prompt in prompts]
    missing = [prompt for prompt, text in zip(prompts, texts, strict=True) if text is None]
    if missing:
        examples = "; ".join(repr(prompt) for prompt in missing[:3])
        raise ValueError(
            f"ocr_prompts({path_or_id!r}): {len(missing)} of {len(prompts)} prompts quote no text (between double "
            f"quotes), e.g. {examples}."
        )
    return Dataset.from_dict({"prompt": prompts, "ocr_text": texts})


def pickapic_prompts(path_or_id: str = "yuvalkirstain/pickapic_v2_no_images", split: str = "train") -> Dataset:
    """Pick-a-Pic v2 captions (Kirstain et al., 2023), deduplicated in order of first appearance, empty ones dropped.

    The default is the caption-only copy of `yuvalkirstain/pickapic_v2` (same rows, without the ~250 GB of images);
    any source with a `caption` (or `prompt`) column works.
    """
    source = load_prompt_source(path_or_id, split)
    captions = (caption.strip() for caption in _column(source, ("caption", "prompt"), path_or_id) if caption)
    return Dataset.from_dict({"prompt": list(dict.fromkeys(caption for caption in captions if caption))})


def drawbench_prompts(path_or_id: str = "sayakpaul/drawbench", split: str = "train") -> Dataset:
    """DrawBench (Saharia et al., 2022, the Imagen paper): 200 prompts in 11 categories, as `prompt` and `category`
    (from the `Prompts` and `Category` columns)."""
    source = load_prompt_source(path_or_id, split)
    return Dataset.from_dict(
        {
            "prompt": _column(source, ("Prompts", "prompt"), path_or_id),
            "category": _column(source, ("Category", "category"), path_or_id),
        }
    )
