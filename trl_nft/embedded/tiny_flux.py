"""`tiny-flux`: a tiny random-weight FLUX.1 pipeline built entirely offline.

A real `FluxPipeline` (a CLIP text encoder for the pooled embedding, T5 for the sequence, a `FluxTransformer2DModel`
with joint and single-stream blocks, an `AutoencoderKL`) with `tiny-sd3`'s offline tokenizers, only very small; weights
are a deterministic function of `seed`. `guidance_embeds=True` (the default) makes it guidance-distilled like
FLUX.1-dev, `False` has no guidance input like FLUX.1-schnell.
"""

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from .tiny import _as_loaded, _clip_text_config, _clip_tokenizer, _t5_config, _t5_tokenizer, tiny_vae


TINY_FLUX_RESOLUTION = 64
_LATENT_CHANNELS = 4  # packed 2 x 2: the transformer sees 16 channels per token


#: FLUX.1-dev's `scheduler/scheduler_config.json`: the shift grows with the image sequence length (`mu`, which the
#: pipeline sets).
FLUX_SCHEDULER_CONFIG = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Build the tiny FLUX.1 pipeline (64 px, 4 latent channels, VAE scale 8, so 4 x 4 packed tokens) with weights
    fixed by `seed`; `guidance_embeds` gives it FLUX.1-dev's guidance input (else it is schnell-like)."""
    return tiny_flux_pipeline(FluxPipeline, seed, guidance_embeds)


def tiny_flux_pipeline(pipeline_class: type[DiffusionPipeline], seed: int, guidance_embeds: bool) -> DiffusionPipeline:
    """A `pipeline_class` (`FluxPipeline`, or a pipeline of the same components such as `FluxKontextPipeline`) of the
    tiny FLUX.1 components, their weights fixed by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tokenizer = _clip_tokenizer()
        t5_tokenizer = _t5_tokenizer()
        text_encoder = CLIPTextModel(_clip_text_config(clip_tokenizer))
        t5_config = _t5_config(t5_tokenizer)
        text_encoder_2 = T5EncoderModel(t5_config)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),  # text/time, height, width: they sum to the head dimension
        )
        vae = tiny_vae(latent_channels=_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    pipeline = pipeline_class(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    # The pipeline fixes its native size (1024 px) in code, not in a config: the tiny model's is 64 px.
    pipeline.default_sample_size = TINY_FLUX_RESOLUTION // pipeline.vae_scale_factor
    return _as_loaded(pipeline)
