"""The model families: one small adapter per family (`DiffusionAdapter` subclasses, selected by the pipeline's class),
the names users can type for their checkpoints, and model loading. Embedded models live in `trl_nft.embedded`."""

import difflib
import os

import torch
from diffusers import DiffusionPipeline

from ..embedded import EMBEDDED_MODELS
from .base import DiffusionAdapter, Rollout
from .flux import FluxAdapter
from .flux2_klein import Flux2KleinAdapter
from .flux_kontext import FluxKontextAdapter
from .qwen_image import QwenImageAdapter
from .qwen_image_edit import QwenImageEditAdapter, QwenImageEditPlusAdapter
from .sana import SanaAdapter
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .sdxl import StableDiffusionXLAdapter
from .wan import WanAdapter
from .wan_i2v import WanImageToVideoAdapter
from .z_image import ZImageAdapter


#: Adapters by model family, looked up by the pipeline's class.
ADAPTERS: list[type[DiffusionAdapter]] = [
    SD3Adapter,
    FluxAdapter,
    FluxKontextAdapter,
    QwenImageAdapter,
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    Flux2KleinAdapter,
    ZImageAdapter,
    SanaAdapter,
    WanAdapter,
    WanImageToVideoAdapter,
]


#: Short names a user can type for the supported families' Hub checkpoints.
MODEL_ALIASES = {
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-kontext-dev": "black-forest-labs/FLUX.1-Kontext-dev",
    "qwen-image": "Qwen/Qwen-Image",
    "qwen-image-edit": "Qwen/Qwen-Image-Edit",
    "qwen-image-edit-2509": "Qwen/Qwen-Image-Edit-2509",
    "qwen-image-edit-2511": "Qwen/Qwen-Image-Edit-2511",
    "flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "flux2-klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "z-image-turbo": "Tongyi-MAI/Z-Image-Turbo",
    "z-image": "Tongyi-MAI/Z-Image",
    "sana-1.6b": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    "wan2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-i2v-14b-480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "wan2.1-i2v-14b-720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
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


def get_adapter(pipeline: DiffusionPipeline, num_frames: int | None = None, **kwargs) -> DiffusionAdapter:
    """The adapter for `pipeline`'s model family; `kwargs` go to its constructor, and `num_frames` too for a family
    that generates videos (an error for one that does not)."""
    for adapter_class in ADAPTERS:
        if isinstance(pipeline, adapter_class.pipeline_classes):
            if adapter_class.produces_videos:
                kwargs["num_frames"] = num_frames
            elif num_frames is not None:
                raise ValueError(
                    f"num_frames={num_frames} applies to video models, but {type(pipeline).__name__} generates "
                    "images. Leave num_frames unset."
                )
            return adapter_class(pipeline, **kwargs)
    supported = ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.pipeline_classes)
    raise ValueError(f"{type(pipeline).__name__} is not supported yet; supported pipelines: {supported}.")


__all__ = [
    "ADAPTERS",
    "MODEL_ALIASES",
    "DiffusionAdapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "QwenImageEditPlusAdapter",
    "Rollout",
    "SD3Adapter",
    "SanaAdapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "WanAdapter",
    "WanImageToVideoAdapter",
    "ZImageAdapter",
    "get_adapter",
    "load_pipeline",
    "resolve_model_name",
]
