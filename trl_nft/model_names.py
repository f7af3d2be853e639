"""The model names users can type (`trl nft --model NAME`, `DiffusionNFTTrainer(model=NAME)`) besides Hub ids and
local folders: short names for the supported families' Hub checkpoints, and the embedded models (`trl_nft.embedded`).
Importing this module imports neither torch nor diffusers, so that `trl nft` checks a name before it imports them."""

import difflib
import os

from .embedded import EMBEDDED_MODELS


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
