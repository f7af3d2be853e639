"""Embedded models: pipelines that need no download. The tiny random-weight pipelines are built offline from configs
(`tiny.py`, for tests and quick starts); `digits-sd3`, `digits-sd3-turbo`, `digits-sd` and `digits-edit` are small
pretrained pipelines shipped in the package, with the seeded builders that wrote them (`digits_sd3.py`,
`digits_sd3_turbo.py`, `digits_sd.py`, `digits_edit.py`)."""

import importlib
import importlib.resources as resources
from collections.abc import Callable, Iterator, Mapping


class LazyBuilders(Mapping):
    """Name -> builder function, each given as `"module:function"` of this package and imported when it is looked up:
    listing or checking the names (`trl nft` does, before it launches) imports neither torch nor diffusers."""

    def __init__(self, targets: dict[str, str]):
        self.targets = targets

    def __getitem__(self, name: str) -> Callable:
        module, function = self.targets[name].split(":")
        return getattr(importlib.import_module(f".{module}", __name__), function)

    def __contains__(self, name: object) -> bool:
        return name in self.targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


#: Names that build a pipeline offline instead of loading one.
EMBEDDED_MODELS = LazyBuilders(
    {
        "tiny-sd3": "tiny:build_tiny_sd3",
        "tiny-sd": "tiny:build_tiny_sd",
        "tiny-sdxl": "tiny:build_tiny_sdxl",
        "tiny-flux": "tiny_flux:build_tiny_flux",  # guidance-distilled, as FLUX.1-dev
        # instruction editing: one condition image per row
        "tiny-flux-kontext": "tiny_flux_kontext:build_tiny_flux_kontext",
        "tiny-qwen-image": "tiny_qwen_image:build_tiny_qwen_image",
        # instruction editing: one condition image per row
        "tiny-qwen-image-edit": "tiny_qwen_image_edit:build_tiny_qwen_image_edit",
        # as Qwen-Image-Edit-2509: any number per row
        "tiny-qwen-image-edit-plus": "tiny_qwen_image_edit:build_tiny_qwen_image_edit_plus",
        "tiny-flux2-klein": "tiny_flux2_klein:build_tiny_flux2_klein",  # step-distilled, as FLUX.2-klein-4B
        "tiny-z-image": "tiny_z_image:build_tiny_z_image",
        "tiny-sana": "tiny_sana:build_tiny_sana",
        "tiny-wan": "tiny_wan:build_tiny_wan",  # text-to-video: 5 frames of 32 px by default
        "tiny-wan-i2v": "tiny_wan_i2v:build_tiny_wan_i2v",  # image-to-video: one first frame per row
        # A pretrained 16 px SD3 on scikit-learn's handwritten digits, shipped in the package (`digits_sd3.py`).
        "digits-sd3": "digits_sd3:load_digits_sd3",
        "digits-sd": "digits_sd:load_digits_sd",  # its SD1.x counterpart, for the DDPO comparison (`digits_sd.py`)
        # digits-sd3 step-distilled to 2 steps, the test bed for distilled models (`digits_sd3_turbo.py`).
        "digits-sd3-turbo": "digits_sd3_turbo:load_digits_sd3_turbo",
        # A pretrained 16 px FLUX.1 Kontext that redraws a source digit per an instruction (`digits_edit.py`).
        "digits-edit": "digits_edit:load_digits_edit",
    }
)
# The builders (and tiny.py's constant) as attributes of this package, imported on first use.
_LAZY_ATTRIBUTES = {
    **{target.split(":")[1]: target.split(":")[0] for target in EMBEDDED_MODELS.targets.values()},
    "TINY_SD3_RESOLUTION": "tiny",
}


def __getattr__(name: str):
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)


#: Training settings that make a short run learn visibly on an embedded pretrained model, in the package's `presets/`:
#: `trl nft --model NAME` starts from them when no `--config` is given (flags still override any of them).
MODEL_PRESETS = {
    "digits-sd3": "digits_sd3.yaml",
    "digits-sd3-turbo": "digits_sd3_turbo.yaml",
    "digits-edit": "digits_edit.yaml",
}


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
    "load_digits_edit",
    "load_digits_sd",
    "load_digits_sd3",
    "load_digits_sd3_turbo",
    "model_preset",
]
