"""The model families: one small adapter per family (`DiffusionAdapter` subclasses, selected by the pipeline's class)
and model loading. The names users can type for their checkpoints live in `trl_nft.model_names`, embedded models in
`trl_nft.embedded`."""

import diffusers
import torch
from diffusers import DiffusionPipeline

from ..embedded import EMBEDDED_MODELS
from ..model_names import MODEL_ALIASES, resolve_model_name
from ..quantization import Quantization
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


def load_pipeline(
    model: str | DiffusionPipeline, torch_dtype: torch.dtype = torch.float32, quantization: Quantization | None = None
) -> DiffusionPipeline:
    """Return a diffusers pipeline for `model`: an instance (used as is), an embedded name such as `"tiny-sd3"`, a local
    folder or a Hub id (both through `DiffusionPipeline.from_pretrained`). With `quantization`, its frozen base is
    loaded quantized (`trl_nft.quantization`; an instance or an embedded model is saved and loaded again)."""
    if not isinstance(model, str | DiffusionPipeline):
        raise TypeError(f"model must be a Hub id, a local folder or a diffusers.DiffusionPipeline, got {type(model)}.")
    if isinstance(model, str):
        model = resolve_model_name(model)
        if model in EMBEDDED_MODELS:
            model = EMBEDDED_MODELS[model]()
            if quantization is None and torch_dtype != torch.float32:
                model.to(dtype=torch_dtype)
    if quantization is not None:
        return quantization.load(model, torch_dtype, denoiser_name)
    if isinstance(model, DiffusionPipeline):
        return model
    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)


def denoiser_name(pipeline_class_name: str) -> str:
    """The component name of the denoiser of the pipeline class `pipeline_class_name` (`"transformer"`, `"unet"`)."""
    pipeline_class = getattr(diffusers, pipeline_class_name, None)
    for adapter_class in ADAPTERS:
        if isinstance(pipeline_class, type) and issubclass(pipeline_class, adapter_class.pipeline_classes):
            return adapter_class.denoiser_name
    supported = ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.pipeline_classes)
    raise ValueError(f"{pipeline_class_name} is not supported yet; supported pipelines: {supported}.")


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
    "denoiser_name",
    "get_adapter",
    "load_pipeline",
    "resolve_model_name",
]
