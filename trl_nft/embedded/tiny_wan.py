"""`tiny-wan`: a tiny random-weight Wan 2.1 text-to-video pipeline built entirely offline.

A real `WanPipeline` (a `UMT5EncoderModel` text encoder, a `WanTransformer3DModel`, the causal video VAE
`AutoencoderKLWan` with Wan 2.1's latent normalisation, Wan 2.1's UniPC scheduler config) with `tiny-sd3`'s offline
T5 tokenizer (Wan's tokenizer is UMT5's, a T5 tokenizer with another vocabulary: the pipeline only calls it), only very
small; weights are a deterministic function of `seed`. Its native videos are 5 frames of 32 x 32 px: the VAE
compresses 4 frames into one latent frame after the first (2 latent frames) and 8 x 8 pixels into one latent pixel, and
the transformer patchifies 2 x 2 latent pixels, so a video is 2 x 2 x 2 tokens.
"""

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .tiny import _as_loaded, _t5_tokenizer


TINY_WAN_RESOLUTION = 32
TINY_WAN_NUM_FRAMES = 5  # 4 k + 1 frames: the first frame, then one latent frame per 4 frames
_TEXT_DIM = 32  # the text encoder's hidden size, which the transformer's `text_dim` must match
#: Wan-AI/Wan2.1-T2V-1.3B-Diffusers' `scheduler/scheduler_config.json` (the rest are diffusers' defaults): UniPC on
#: flow sigmas, shifted by 3 (Wan's value for 480p).
_SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
#: The tiny transformer's layout (the image-to-video model, `tiny_wan_i2v.py`, adds its image inputs to it).
TINY_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,  # rotary dimensions: 8 for time, 4 each for height and width
    in_channels=16,
    out_channels=16,
    text_dim=_TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def build_tiny_wan(seed: int = 0) -> WanPipeline:
    """Build the tiny Wan 2.1 pipeline (5 frames of 32 px, 16 latent channels, VAE scale 4 in time and 8 in space,
    2 x 2 patches) with weights fixed by `seed`."""
    tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=_TEXT_DIM,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=0,
            )
        )
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
        # Wan 2.1's VAE layout (16 latent channels, scale 8 in space, 4 in time after the first frame, its
        # `latents_mean` and `latents_std` by default) with few channels and one residual block per level.
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=0, temperal_downsample=[False, True, True]
        )
    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**_SCHEDULER_CONFIG),
        transformer=transformer,
    )
    # The pipeline fixes its native size (480 x 832 px, 81 frames) in its call's defaults; the adapter reads these:
    # 32 px (in latent pixels, as the image pipelines' `default_sample_size`) and 5 frames.
    pipeline.default_sample_size = TINY_WAN_RESOLUTION // pipeline.vae_scale_factor_spatial
    pipeline.default_num_frames = TINY_WAN_NUM_FRAMES
    return _as_loaded(pipeline)
