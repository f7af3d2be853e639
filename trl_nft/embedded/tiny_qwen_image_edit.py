"""`tiny-qwen-image-edit` and `tiny-qwen-image-edit-plus`: tiny random-weight Qwen-Image-Edit pipelines built offline.

A real `QwenImageEditPipeline` and `QwenImageEditPlusPipeline` (Qwen-Image-Edit-2509 / -2511) of `tiny-qwen-image`'s
text encoder and transformer, with what editing adds: the Qwen2.5-VL sees the condition images, so the tokenizer has
its vision tokens and the pipeline a `Qwen2VLProcessor` (as the Hub checkpoints: an image processor, a video processor
and the tokenizer), all built offline. Weights are a deterministic function of `seed`.

Both pipelines take every condition at a 1024² area (the VAE's input), whatever the target's size: for a tiny model
on a CPU that image, not the transformer, is the cost, so the VAE here downsamples 16 times with no residual block on
the way down (the VAE's first convolution at 1024² is then most of an encoding, about 1 s on one core), and the
condition is 32 x 32 tokens. The processor shows the VL encoder at most 112² pixels (16 vision tokens an image;
Qwen2.5-VL's own allows 3584²).
"""

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from .tiny import _as_loaded
from .tiny_qwen_image import (
    _LATENT_CHANNELS,
    _LATENT_STATISTICS,
    _SCHEDULER_CONFIG,
    _qwen2_5_vl,
    _qwen_image_transformer,
    _qwen_tokenizer,
)


TINY_QWEN_IMAGE_EDIT_RESOLUTION = 64
#: Qwen2.5-VL's chat and vision tokens (the pipelines' templates mark an image `<|vision_start|><|image_pad|>
#: <|vision_end|>`; the processor repeats `<|image_pad|>` once per vision token; the video token is the processor's).
_VISION_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _tiny_qwen_image_edit(pipeline_class, seed: int, **transformer_config):
    # Both pipelines share the system prompt; Edit-Plus names each image "Picture i: " before its vision tokens (in its
    # `_get_qwen_prompt_embeds`), so the tokenizer learns that word too.
    template = QwenImageEditPipeline(None, None, None, None, None, None).prompt_template_encode
    tokenizer = _qwen_tokenizer(template.format("Picture {}: {}"), _VISION_TOKENS)
    token_ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad")}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _qwen2_5_vl(
            tokenizer,
            image_token_id=token_ids["image_pad"],
            video_token_id=token_ids["video_pad"],
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        )
        transformer = _qwen_image_transformer(**transformer_config)
        vae = AutoencoderKLQwenImage(  # four spatial downsamplings: VAE scale 16 (see the module's docstring)
            base_dim=4,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1, 1],
            num_res_blocks=0,
            temperal_downsample=[False, True, True, True],
            **_LATENT_STATISTICS,
        )
    pipeline = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    pipeline.default_sample_size = TINY_QWEN_IMAGE_EDIT_RESOLUTION // pipeline.vae_scale_factor
    return _as_loaded(pipeline)


def build_tiny_qwen_image_edit(seed: int = 0) -> QwenImageEditPipeline:
    """Build the tiny Qwen-Image-Edit pipeline (one condition image a prompt; 64 px targets, 2 x 2 packed tokens) with
    weights fixed by `seed`."""
    return _tiny_qwen_image_edit(QwenImageEditPipeline, seed)


def build_tiny_qwen_image_edit_plus(seed: int = 0, zero_cond_t: bool = False) -> QwenImageEditPlusPipeline:
    """Build the tiny Qwen-Image-Edit-Plus pipeline (any number of condition images a prompt, as Qwen-Image-Edit-2509;
    with `zero_cond_t`, as -2511, whose transformer sees the condition tokens at time 0) with weights fixed by
    `seed`."""
    return _tiny_qwen_image_edit(QwenImageEditPlusPipeline, seed, zero_cond_t=zero_cond_t)
