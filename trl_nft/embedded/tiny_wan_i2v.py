"""`tiny-wan-i2v`: a tiny random-weight Wan 2.1 image-to-video pipeline built entirely offline.

A real `WanImageToVideoPipeline` with `tiny-wan`'s tokenizer, UMT5 text encoder, causal video VAE and scheduler
(`tiny_wan.py`), a tiny `CLIPVisionModel` image encoder with its `CLIPImageProcessor`, and a `WanTransformer3DModel`
laid out as Wan2.1-I2V-14B's: 36 input channels (16 noise + 4 first-frame mask + 16 condition latents), 16 output
channels, CLIP's penultimate hidden states projected as image tokens (`image_dim`), which every block's cross-attention
reads through its own key and value projections (`added_kv_proj_dim`, the transformer's width); weights are a
deterministic function of `seed`. Its native videos are `tiny-wan`'s: 5 frames of 32 x 32 px.
"""

import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from .tiny import _as_loaded
from .tiny_wan import TINY_WAN_TRANSFORMER, build_tiny_wan


_IMAGE_SIZE = 32  # CLIP's input side: 4 x 4 patches of 8 px, plus the class token, make 17 image tokens
_IMAGE_DIM = 16  # CLIP's hidden size, which the transformer's `image_dim` must match


def build_tiny_wan_i2v(seed: int = 0) -> WanImageToVideoPipeline:
    """Build the tiny Wan 2.1 image-to-video pipeline (5 frames of 32 px, 16 latent channels and 20 condition channels,
    17 CLIP image tokens) with weights fixed by `seed`."""
    text_to_video = build_tiny_wan(seed)  # its tokenizer, text encoder, VAE and scheduler
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=_IMAGE_DIM,
                intermediate_size=32,
                num_hidden_layers=2,  # the pipeline reads the penultimate layer's hidden states
                num_attention_heads=2,
                image_size=_IMAGE_SIZE,
                patch_size=8,
            )
        )
        width = TINY_WAN_TRANSFORMER["num_attention_heads"] * TINY_WAN_TRANSFORMER["attention_head_dim"]
        transformer = WanTransformer3DModel(
            **{**TINY_WAN_TRANSFORMER, "in_channels": 36, "image_dim": _IMAGE_DIM, "added_kv_proj_dim": width}
        )
    pipeline = WanImageToVideoPipeline(
        tokenizer=text_to_video.tokenizer,
        text_encoder=text_to_video.text_encoder,
        vae=text_to_video.vae,
        scheduler=text_to_video.scheduler,
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
        ),
        image_encoder=image_encoder,
        transformer=transformer,
    )
    # As `tiny-wan`: its native size and frame count, which the pipeline fixes in its call's defaults.
    pipeline.default_sample_size = text_to_video.default_sample_size
    pipeline.default_num_frames = text_to_video.default_num_frames
    return _as_loaded(pipeline)
