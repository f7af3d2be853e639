"""Model loading and the registry of model-family adapters."""

import os

import torch
from diffusers import DiffusionPipeline

from .base import DiffusionAdapter, Rollout
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .tiny import TINY_SD3_RESOLUTION, build_tiny_sd, build_tiny_sd3


#: Adapters by model family, looked up by the pipeline's class.
ADAPTERS: list[type[DiffusionAdapter]] = [SD3Adapter, StableDiffusionAdapter]

#: Names that build a pipeline offline instead of loading one.
EMBEDDED_MODELS = {"tiny-sd3": build_tiny_sd3, "tiny-sd": build_tiny_sd}


def load_pipeline(model: str | DiffusionPipeline, torch_dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Return a diffusers pipeline for `model`: an instance (used as is), an embedded name such as `"tiny-sd3"`, a local
    folder or a Hub id (both through `DiffusionPipeline.from_pretrained`)."""
    if isinstance(model, DiffusionPipeline):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a Hub id, a local folder or a diffusers.DiffusionPipeline, got {type(model)}.")
    if model in EMBEDDED_MODELS:
        pipeline = EMBEDDED_MODELS[model]()
        return pipeline if torch_dtype == torch.float32 else pipeline.to(dtype=torch_dtype)
    if not os.path.isdir(model) and model.count("/") != 1:
        raise ValueError(
            f"model={model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local folder, nor a Hub "
            "id of the form 'owner/name'."
        )
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
    "TINY_SD3_RESOLUTION",
    "DiffusionAdapter",
    "Rollout",
    "SD3Adapter",
    "StableDiffusionAdapter",
    "build_tiny_sd",
    "build_tiny_sd3",
    "get_adapter",
    "load_pipeline",
]
