"""Embedded models: pipelines that need no download. The tiny random-weight pipelines are built offline from configs
(`tiny.py`, for tests and quick starts); `digits-sd3` and `digits-sd` are small pretrained pipelines shipped in the
package, with the seeded builders that wrote them (`digits_sd3.py`, `digits_sd.py`)."""

import importlib.resources as resources

from .digits_sd import load_digits_sd
from .digits_sd3 import load_digits_sd3
from .tiny import TINY_SD3_RESOLUTION, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
from .tiny_flux import build_tiny_flux
from .tiny_flux2_klein import build_tiny_flux2_klein
from .tiny_flux_kontext import build_tiny_flux_kontext
from .tiny_qwen_image import build_tiny_qwen_image
from .tiny_qwen_image_edit import build_tiny_qwen_image_edit, build_tiny_qwen_image_edit_plus
from .tiny_sana import build_tiny_sana
from .tiny_wan import build_tiny_wan
from .tiny_wan_i2v import build_tiny_wan_i2v
from .tiny_z_image import build_tiny_z_image


#: Names that build a pipeline offline instead of loading one.
EMBEDDED_MODELS = {
    "tiny-sd3": build_tiny_sd3,
    "tiny-sd": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-flux": build_tiny_flux,  # guidance-distilled, as FLUX.1-dev
    "tiny-flux-kontext": build_tiny_flux_kontext,  # instruction editing: one condition image per row
    "tiny-qwen-image": build_tiny_qwen_image,
    "tiny-qwen-image-edit": build_tiny_qwen_image_edit,  # instruction editing: one condition image per row
    "tiny-qwen-image-edit-plus": build_tiny_qwen_image_edit_plus,  # as Qwen-Image-Edit-2509: any number per row
    "tiny-flux2-klein": build_tiny_flux2_klein,  # step-distilled, as FLUX.2-klein-4B
    "tiny-z-image": build_tiny_z_image,
    "tiny-sana": build_tiny_sana,
    "tiny-wan": build_tiny_wan,  # text-to-video: 5 frames of 32 px by default
    "tiny-wan-i2v": build_tiny_wan_i2v,  # image-to-video: one first frame per row
    # A pretrained 16 px SD3 on scikit-learn's handwritten digits, shipped in the package (`digits_sd3.py`).
    "digits-sd3": load_digits_sd3,
    "digits-sd": load_digits_sd,  # its SD1.x counterpart, for the DDPO comparison (`digits_sd.py`)
}

#: Training settings that make a short run learn visibly on an embedded pretrained model, in the package's `presets/`:
#: `trl nft --model NAME` starts from them when no `--config` is given (flags still override any of them).
MODEL_PRESETS = {"digits-sd3": "digits_sd3.yaml"}


def model_preset(model: str) -> str | None:
    """The path of `model`'s preset file (`MODEL_PRESETS`), or None when it has none."""
    if model not in MODEL_PRESETS:
        return None
    return str(resources.files("trl_nft").joinpath("presets", MODEL_PRESETS[model]))


__all__ = [
    "EMBEDDED_MODELS",
    "MODEL_PRESETS",
    "TINY_SD3_RESOLUTION",
    "build_tiny_flux",
    "build_tiny_flux2_klein",
    "build_tiny_flux_kontext",
    "build_tiny_qwen_image",
    "build_tiny_qwen_image_edit",
    "build_tiny_qwen_image_edit_plus",
    "build_tiny_sana",
    "build_tiny_sd",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "build_tiny_wan",
    "build_tiny_wan_i2v",
    "build_tiny_z_image",
    "load_digits_sd",
    "load_digits_sd3",
    "model_preset",
]
