"""Model loading and the registry of model-family adapters."""

import difflib
import importlib.resources as resources
import os

import torch
from diffusers import DiffusionPipeline

from .base import DiffusionAdapter, Rollout
from .digits import load_digits_sd3
from .digits_sd import load_digits_sd
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .sdxl import StableDiffusionXLAdapter
from .tiny import TINY_SD3_RESOLUTION, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl


#: Adapters by model family, looked up by the pipeline's class.
ADAPTERS: list[type[DiffusionAdapter]] = [SD3Adapter, StableDiffusionAdapter, StableDiffusionXLAdapter]

#: Names that build a pipeline offline instead of loading one.
EMBEDDED_MODELS = {
    "tiny-sd3": build_tiny_sd3,
    "tiny-sd": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    # A pretrained 16 px SD3 on scikit-learn's handwritten digits, shipped in the package (`models/digits.py`).
    "digits-sd3": load_digits_sd3,
    "digits-sd": load_digits_sd,  # its SD1.x counterpart, for the DDPO comparison (`models/digits_sd.py`)
}

#: Training settings that make a short run learn visibly on an embedded pretrained model, in the package's `presets/`:
#: `trl nft --model NAME` starts from them when no `--config` is given (flags still override any of them).
MODEL_PRESETS = {"digits-sd3": "digits_sd3.yaml"}


def model_preset(model: str) -> str | None:
    """The path of `model`'s preset file (`MODEL_PRESETS`), or None when it has none."""
    if model not in MODEL_PRESETS:
        return None
    return str(resources.files("trl_nft").joinpath("presets", MODEL_PRESETS[model]))


#: Short names a user can type for the supported families' Hub checkpoints.
MODEL_ALIASES = {
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2.1": "stabilityai/stable-diffusion-2-1",
}


def resolve_model_name(model: str) -> str:
    """`model` with an alias (`MODEL_ALIASES`) replaced by its Hub id; embedded names, local folders and Hub ids
    (`owner/name`) unchanged. Anything else is an error that suggests the closest known names."""
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]
    if model in EMBEDDED_MODELS or os.path.isdir(model) or model.count("/") == 1:
        return model
    known = [*MODEL_ALIASES, *EMBEDDED_MODELS]
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"model={model!r} is not a known model name, a local folder, or a Hub id of the form 'owner/name'.{hint} "
        f"Known names: {', '.join(known)}."
    )


def load_pipeline(model: str | DiffusionPipeline, torch_dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Return a diffusers pipeline for `model`: an instance (used as is), an embedded name such as `"tiny-sd3"`, a local
    folder or a Hub id (both through `DiffusionPipeline.from_pretrained`)."""
    if isinstance(model, DiffusionPipeline):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a Hub id, a local folder or a diffusers.DiffusionPipeline, got {type(model)}.")
    model = resolve_model_name(model)
    if model in EMBEDDED_MODELS:
        pipeline = EMBEDDED_MODELS[model]()
        return pipeline if torch_dtype == torch.float32 else pipeline.to(dtype=torch_dtype)
    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)


def get_adapter(pipeline: DiffusionPipeline, **kwargs) -> DiffusionAdapter:
    """The adapter for `pipeline`'s model family; `kwargs` go to its constructor."""
    for adapter_class in ADAPTERS:
        if isinstance(pipeline, adapter_class.pipeline_classes):
            return adapter_class(pipeline, **kwargs)
    supported = ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.pipeline_classes)
    raise ValueError(f"{type(pipeline).__name__} is not supported yet; supported pipelines: {supported}.")


__all__ = [
    "ADAPTERS",
    "EMBEDDED_MODELS",
    "MODEL_ALIASES",
    "MODEL_PRESETS",
    "TINY_SD3_RESOLUTION",
    "DiffusionAdapter",
    "Rollout",
    "SD3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "build_tiny_sd",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "load_digits_sd3",
    "get_adapter",
    "load_pipeline",
    "model_preset",
    "resolve_model_name",
]
