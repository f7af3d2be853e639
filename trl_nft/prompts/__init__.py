"""Prompt sets as `datasets.Dataset`s with the columns rewards need: a `prompt` column, plus `tag`/`metadata` for
GenEval and `ocr_text` for OCR."""

from .geneval import geneval_prompts, load_geneval_metadata
from .loaders import drawbench_prompts, load_prompt_source, ocr_prompts, pickapic_prompts


__all__ = [
    "drawbench_prompts",
    "geneval_prompts",
    "load_geneval_metadata",
    "load_prompt_source",
    "ocr_prompts",
    "pickapic_prompts",
]
