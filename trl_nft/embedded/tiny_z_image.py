"""`tiny-z-image`: a tiny random-weight Z-Image pipeline built entirely offline.

A real `ZImagePipeline` (a `Qwen3Model` text encoder, a `ZImageTransformer2DModel` with its noise and context
refiners, the FLUX.1-style `AutoencoderKL`, Z-Image-Turbo's scheduler config) with an offline Qwen3 tokenizer and
chat template, only very small (about 440k parameters, most of them in the transformer's timestep embedding, whose
hidden width Z-Image fixes at 1024); weights are a deterministic function of `seed`.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from .tiny import _as_loaded, tiny_vae
from .tiny_qwen_image import _qwen3_tokenizer


TINY_Z_IMAGE_RESOLUTION = 64
_LATENT_CHANNELS = 4  # patchified 2 x 2 by the transformer: 16 channels per token
_TEXT_DIM = 16  # the text encoder's hidden size, which the transformer's `cap_feat_dim` must match
#: Tongyi-MAI/Z-Image-Turbo's `scheduler/scheduler_config.json`: a constant shift of 3, no dynamic shifting.
_SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=False)


def build_tiny_z_image(seed: int = 0) -> ZImagePipeline:
    """Build the tiny Z-Image pipeline (64 px, 4 latent channels, VAE scale 8, so 4 x 4 patches) with weights fixed
    by `seed`."""
    tokenizer = _qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,  # as Qwen3's: `<|endoftext|>`
                hidden_size=_TEXT_DIM,
                intermediate_size=32,
                num_hidden_layers=2,  # the pipeline reads the second-to-last hidden states
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
            )
        )
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=_LATENT_CHANNELS,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=_TEXT_DIM,
            axes_dims=[8, 4, 4],  # text/frame, height, width: they sum to the head dimension
            # RoPE table sizes: captions of up to ~250 tokens (the frame axis), 32 x 32 patches (512 px)
            axes_lens=[256, 32, 32],
        )
        # Z-Image's VAE normalisation (FLUX.1's VAE)
        vae = tiny_vae(latent_channels=_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159)
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # The pipeline fixes its native size (1024 px) in code; the adapter reads this one (latent pixels): 64 px.
    pipeline.default_sample_size = TINY_Z_IMAGE_RESOLUTION // pipeline.vae_scale_factor
    return _as_loaded(pipeline)
