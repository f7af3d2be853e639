"""`tiny-flux-kontext`: a tiny random-weight FLUX.1 Kontext pipeline built entirely offline.

A real `FluxKontextPipeline` of `tiny-flux`'s components (CLIP and T5 text encoders, a `FluxTransformer2DModel` with
FLUX.1-dev's guidance input, an `AutoencoderKL`, FLUX.1-dev's scheduler): FLUX.1 Kontext [dev] is FLUX.1-dev's
architecture, fed the condition image's tokens beside the target's. 64 px; weights are a deterministic function of
`seed` (the same as `tiny-flux`'s for the same seed).
"""

from diffusers import FluxKontextPipeline

from .tiny_flux import tiny_flux_pipeline


def build_tiny_flux_kontext(seed: int = 0) -> FluxKontextPipeline:
    """Build the tiny FLUX.1 Kontext pipeline (64 px targets and conditions, 4 x 4 packed tokens each) with weights
    fixed by `seed`."""
    return tiny_flux_pipeline(FluxKontextPipeline, seed, guidance_embeds=True)
