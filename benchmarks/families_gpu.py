"""One DiffusionNFT iteration of FLUX.1-dev and of Qwen-Image at their real architectures, on one GPU.

Each family's pipeline is built offline from its published component configs with random weights (the GPU machine has
no network), directly on the GPU in bf16 (no fp32 copy on the CPU first):

- **flux-dev** (`FluxPipeline`): FLUX.1-dev's transformer (19 joint + 38 single-stream blocks, width 3072, guidance
  embedding, 11.9B parameters), CLIP-L's text model, the T5-XXL encoder, the 16-channel FLUX VAE, its scheduler config;
- **qwen-image** (`QwenImagePipeline`): Qwen-Image's transformer (60 dual-stream blocks, width 3072, 20.4B), the
  Qwen2.5-VL-7B language model as text encoder, the video VAE `AutoencoderKLQwenImage`, its scheduler config.

Random weights cost the same FLOPs as trained ones, so the timings hold for the real models; the reward is the cheap
JPEG one, so the numbers are the trainer's and the model's, not a reward model's. Tokenizers are trl-nft's tiny
offline ones, so the text encoders' vocabularies (embedding tables only) are small, and the prompts reach the real
lengths: FLUX pads CLIP to 77 tokens and T5 to the preset's `max_sequence_length` (512, also the pipeline's default);
Qwen-Image pads only to the longest prompt of the batch, so its tokenizer learns the benchmark prompts' words and each
word is one token, about as many tokens as Qwen's own BPE gives (16 per prompt after the pipeline drops the template's
system part).

Each family runs `--iterations` (default 1) DiffusionNFT iterations through the real `DiffusionNFTTrainer`, with the
pipeline instance as `model=`: bf16, native 1024 px (`--resolution`), one group of `--num_images` (4) images,
`--num_inference_steps` (10) rollout steps, the JPEG reward, LoRA on the family's default targets, and the recipe's
cost-setting fields read from its preset (`examples/configs/flux_dev_pickscore.yaml`,
`examples/configs/qwen_image_pickscore.yaml`: LoRA rank 64 / alpha 128, sampler, guidance, training-time fraction,
kl_coef, EMA). On a GPU, the tiny version of the same family runs first through the same code, so that CUDA's
one-time start-up costs (context, libraries, kernel loading) stay out of the measured iteration.

Reported per family: seconds per image of the rollout, of the training and of the whole iteration (the trainer's own
`timing/*_seconds`, `rollout/images_per_second` and `train/sample_steps_per_second` from `trainer.state.log_history`,
and the wall-clock of the step), and the peak GPU memory (`torch.cuda.max_memory_allocated`, reset per family). Each
family runs inside try/except, so an out-of-memory error in one still runs the others (the error is recorded), and the
JSON is written after each iteration and each family, so a run cut short still leaves numbers.

    python benchmarks/families_gpu.py                          # on the GPU; JSON to $OUT/families_gpu.json
    python benchmarks/families_gpu.py --tiny --device cpu      # same code path, tiny dims, on CPU (~15 s)
    python benchmarks/families_gpu.py --families qwen-image --resolution 512 --activation_checkpointing off

Run it as a script (`python benchmarks/...`), which puts this folder on the import path for `overhead.py`.
"""

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import yaml
from datasets import Dataset
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from overhead import PROMPTS, environment, synchronized_clock, write_results
from peft import LoraConfig
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PrinterCallback,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    TrainerCallback,
)

import trl_nft
from trl_nft import DiffusionNFTTrainer, NFTConfig
from trl_nft.embedded.tiny import _clip_tokenizer, _t5_tokenizer
from trl_nft.embedded.tiny_qwen_image import _SCHEDULER_CONFIG as QWEN_IMAGE_SCHEDULER_CONFIG
from trl_nft.embedded.tiny_qwen_image import _qwen_tokenizer
from trl_nft.models import get_adapter


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1-dev. The numbers are black-forest-labs/FLUX.1-dev's published configs, as quoted in public repositories:
# transformer/config.json (19 + 38 blocks, 24 heads x 128, joint_attention_dim 4096, pooled_projection_dim 768,
# guidance_embeds true, axes_dims_rope [16, 56, 56]), vae/config.json (block_out_channels [128, 256, 512, 512], 2 layers
# per block, 32 norm groups, 16 latent channels, no quant convs, scaling 0.3611 / shift 0.1159, force_upcast),
# scheduler/scheduler_config.json (below); text_encoder is openai/clip-vit-large-patch14's text model (12 layers of 768,
# quick-GELU, vocabulary 49408) and text_encoder_2 google/t5-v1_1-xxl's encoder (24 layers, d_model 4096, d_ff 10240,
# 64 heads of 64, gated-GELU, vocabulary 32128). The same facts are in the ComfyUI/x-flux `flux-dev` params (depth 19,
# depth_single_blocks 38, hidden 3072, ae ch 128 / ch_mult [1, 2, 4, 4] / z_channels 16).
FLUX_DEV = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "transformer": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24),
    "rope_axes": (16, 56, 56),  # text/time, height, width: they sum to the head dimension
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
    "published_vocab": {"clip": 49408, "t5": 32128},
    "resolution": 1024,
}
# The same structure (guidance embedding, joint + single blocks, 4-level VAE with 16 latent channels, gated-GELU T5)
# with tiny dimensions, for checking the code path on a CPU.
FLUX_TINY = {
    "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "t5": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8),
    "transformer": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2),
    "rope_axes": (4, 6, 6),
    "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64),
    "published_vocab": None,
    "resolution": 64,
}
#: FLUX.1-dev's scheduler/scheduler_config.json: the shift grows with the image sequence length (`mu`, from 0.5 at 256
#: tokens to 1.15 at 4096, computed by the pipeline).
FLUX_DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_LATENT_CHANNELS = 16  # packed 2 x 2 into 64 transformer input channels

# ---------------------------------------------------------------------------------------------------------------------
# Qwen-Image. Qwen/Qwen-Image's published configs, as quoted in public repositories (e.g. loaders that validate them):
# transformer/config.json (60 layers, 24 heads x 128, joint_attention_dim 3584, in 64 / out 16 channels, patch 2,
# axes_dims_rope [16, 56, 56], guidance_embeds false; 20.43B parameters), vae/config.json (base_dim 96, z_dim 16,
# dim_mult [1, 2, 4, 4], 2 res blocks, no attention scales, temporal downsampling [false, true, true], the per-channel
# latents_mean / latents_std below, which are also diffusers' defaults), scheduler/scheduler_config.json (trl-nft's
# tiny-qwen-image uses the same dict), text_encoder/config.json: Qwen2.5-VL-7B-Instruct (hidden 3584, 28 layers, 28
# heads, 4 key-value heads, intermediate 18944, vocabulary 152064, untied lm_head, rope_theta 1e6, mrope_section
# [16, 24, 24], max_position_embeddings 128000, RMS eps 1e-6) and its vision tower (depth 32, hidden 1280, intermediate
# 3420, 16 heads, patch 14, window 112, full attention in blocks 7, 15, 23, 31, out_hidden_size 3584).
QWEN_IMAGE = {
    "text": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    "transformer": dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56)),
    "vae": dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    "published_vocab": 152064,
    "resolution": 1024,
}
QWEN_IMAGE_TINY = {
    "text": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        # the (temporal, height, width) sections split the 8 rotary frequencies of a 16-dim head
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    ),
    "transformer": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(8, 4, 4)),
    "vae": dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "published_vocab": None,
    "resolution": 64,
}
#: Qwen2.5-VL-7B's vision tower, counted on the meta device only: text-to-image never calls it (`QwenImagePipeline`
#: passes no pixels to the text encoder), so the pipelines that run carry the smallest tower the class builds
#: (`MINIMAL_VISION`, one block of width 16, about 0.3M parameters) instead of these 0.67B.
QWEN_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
MINIMAL_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, fullatt_block_indexes=[0])
QWEN_IMAGE_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
QWEN_IMAGE_LATENTS_MEAN += [0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
QWEN_IMAGE_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]
QWEN_IMAGE_LATENTS_STD += [3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]


@contextlib.contextmanager
def creating_on(device: str, dtype: torch.dtype):
    """Modules created inside get their parameters directly on `device` in `dtype`: half the memory and time of fp32
    weights that are then cast, and no copy through the CPU."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default_dtype)


def _as_loaded(pipeline: DiffusionPipeline, resolution: int) -> DiffusionPipeline:
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them (T5's dropout is active in train mode)
    # Both pipelines fix their native size (1024 px) in code, not in a config; the tiny models' is smaller.
    pipeline.default_sample_size = resolution // pipeline.vae_scale_factor
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_flux_pipeline(sizes: dict, device: str, dtype: torch.dtype, published: bool = False) -> FluxPipeline:
    """A FLUX.1-dev pipeline with random weights on `device`. `published` builds the text encoders' embedding tables at
    the released vocabulary sizes (for counting parameters on the meta device; the tiny tokenizers do not fit them)."""
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    vocab = sizes["published_vocab"] if published else {"clip": len(clip_tokenizer), "t5": len(t5_tokenizer)}
    with creating_on(device, dtype):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab["clip"],
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=sizes["clip"]["hidden_size"],
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
                **sizes["clip"],
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=vocab["t5"],
                feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=0,
                **sizes["t5"],
            )
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=FLUX_LATENT_CHANNELS * 4,
            joint_attention_dim=sizes["t5"]["d_model"],
            pooled_projection_dim=sizes["clip"]["hidden_size"],  # CLIP's pooled output
            guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
            axes_dims_rope=sizes["rope_axes"],
            **sizes["transformer"],
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=FLUX_LATENT_CHANNELS,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            force_upcast=True,
            **sizes["vae"],
        )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return _as_loaded(pipeline, sizes["resolution"])


def build_qwen_image_pipeline(
    sizes: dict, device: str, dtype: torch.dtype, published: bool = False
) -> QwenImagePipeline:
    """A Qwen-Image pipeline with random weights on `device`. `published` builds the text encoder with Qwen2.5-VL-7B's
    vocabulary and vision tower (for counting parameters on the meta device)."""
    # The pipeline drops the template's first 34 tokens (its system part, as Qwen's tokenizer splits it): the tiny
    # tokenizer makes each word of the template one token so that this holds, and here each word of the prompts too.
    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
    tokenizer = _qwen_tokenizer(template + " ".join(PROMPTS))
    text_dim = sizes["text"]["hidden_size"]
    vision = QWEN_VL_7B_VISION if published else MINIMAL_VISION
    with creating_on(device, dtype):
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=sizes["published_vocab"] if published else len(tokenizer),
                    # as Qwen2.5-VL's: `<|endoftext|>` begins and pads, `<|im_end|>` ends
                    bos_token_id=tokenizer.pad_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    hidden_act="silu",
                    **sizes["text"],
                ),
                vision_config=dict(out_hidden_size=text_dim, **vision),
                tie_word_embeddings=False,  # Qwen2.5-VL-7B's lm_head is its own matrix
            )
        )
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=len(QWEN_IMAGE_LATENTS_MEAN) * 4,
            out_channels=len(QWEN_IMAGE_LATENTS_MEAN),
            joint_attention_dim=text_dim,
            guidance_embeds=False,  # Qwen-Image's guidance is true CFG
            **sizes["transformer"],
        )
        vae = AutoencoderKLQwenImage(
            z_dim=len(QWEN_IMAGE_LATENTS_MEAN),
            attn_scales=[],
            temperal_downsample=[False, True, True],  # three spatial downsamplings: VAE scale 8
            latents_mean=QWEN_IMAGE_LATENTS_MEAN,
            latents_std=QWEN_IMAGE_LATENTS_STD,
            **sizes["vae"],
        )
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _as_loaded(pipeline, sizes["resolution"])


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    title: str
    build: Callable[..., DiffusionPipeline]
    sizes: dict
    tiny_sizes: dict
    preset: str  # the recipe whose cost-setting fields the benchmark takes


FAMILIES = {
    "flux-dev": Family(
        "flux-dev", "FLUX.1-dev", build_flux_pipeline, FLUX_DEV, FLUX_TINY, "examples/configs/flux_dev_pickscore.yaml"
    ),
    "qwen-image": Family(
        "qwen-image",
        "Qwen-Image",
        build_qwen_image_pipeline,
        QWEN_IMAGE,
        QWEN_IMAGE_TINY,
        "examples/configs/qwen_image_pickscore.yaml",
    ),
}
#: The preset fields that set what one image costs (LoRA size, sampler, CFG passes, training times, reference forward,
#: EMA) or how the update is made; batch sizes, resolution, steps, evaluation and logging are the benchmark's own.
PRESET_FIELDS = (
    "lora_r",
    "lora_alpha",
    "sampler",
    "guidance_scale",
    "train_timestep_fraction",
    "kl_coef",
    "nft_beta",
    "loss_type",
    "advantage_clip",
    "ema_decay",
    "max_sequence_length",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "old_policy_decay_schedule",
    "old_policy_decay_rate",
    "old_policy_decay_max",
)


def preset_fields(family: Family) -> dict:
    with open(os.path.join(REPO, family.preset)) as f:
        preset = yaml.safe_load(f)
    return {key: preset[key] for key in PRESET_FIELDS if key in preset}


def parameter_counts(family: Family, sizes: dict) -> dict[str, dict[str, float]]:
    """Parameters (billions) of each component, built on the meta device (instant, no memory): as released (published
    vocabularies, Qwen2.5-VL's vision tower) and as this benchmark builds them (tiny vocabularies, minimal tower)."""
    counts = {}
    for label, published in (("published", True), ("built", False)):
        if published and sizes["published_vocab"] is None:
            continue  # the tiny models have no released version
        pipeline = family.build(sizes, "meta", torch.bfloat16, published=published)
        counts[label] = {
            name: round(sum(p.numel() for p in module.parameters()) / 1e9, 6)
            for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module)
        }
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Activation checkpointing. Backpropagating through the transformer keeps the tensors autograd saves in every block. On
# the meta device (`--estimate_activations`: the adapter's own `predict_velocity`, LoRA r64 on the default targets,
# bf16, attention saving what flash attention saves) that is 5.65 MB per token for FLUX.1-dev and 8.18 MB for
# Qwen-Image: 26 GB per 1024 px FLUX image (4096 image + 512 T5 tokens) and 34 GB per Qwen-Image image (4096 + ~16),
# before autocast's fp32 intermediates (norms, modulation), for which `AUTOCAST_MARGIN` allows. The weights, LoRA
# copies and optimizer state come first: FLUX 33.4 GB of bf16 weights + 4.3 GB for six fp32 copies of its 179M LoRA
# parameters (trained, old, EMA, gradient, two AdamW moments), Qwen-Image 54.2 GB + 10.2 GB (425M LoRA parameters).
# So on a 141 GB H200, 4 images at 1024 px need ~175 GB (FLUX) and ~240 GB (Qwen-Image) without checkpointing: neither
# fits, and `auto` turns checkpointing on for both. With it only each block's input stays (~1.6 GB per image) and one
# block is recomputed at a time in the backward pass: about one more forward per training time (~25 % more training
# time), and ~50 GB (FLUX) and ~75 GB (Qwen-Image) in all. At 512 px both fit without it (~85 and ~110 GB).
ACTIVATION_MB_PER_TOKEN = {"flux-dev": 5.65, "qwen-image": 8.18}
STATIC_GB = {"flux-dev": 37.7, "qwen-image": 64.4}
AUTOCAST_MARGIN = 1.3
QWEN_PROMPT_TOKENS = 16  # what the benchmark prompts take after the pipeline drops the template's system part


def text_tokens(family: str, max_sequence_length: int) -> int:
    # FLUX pads T5 to `max_sequence_length`; Qwen-Image pads only to the longest prompt.
    return max_sequence_length if family == "flux-dev" else QWEN_PROMPT_TOKENS


def training_memory_gb(family: str, resolution: int, num_images: int, max_sequence_length: int) -> float:
    """Estimated GPU memory of a training micro-step without activation checkpointing."""
    tokens = (resolution // 16) ** 2 + text_tokens(family, max_sequence_length)
    activations = ACTIVATION_MB_PER_TOKEN[family] * tokens * num_images / 1e3 * AUTOCAST_MARGIN
    return STATIC_GB[family] + activations


H200_MEMORY_GB = 150.7  # what torch reports for the H200 of the GPU machine (140.4 GiB)


def needs_checkpointing(family: Family, args: argparse.Namespace, tiny: bool, max_sequence_length: int) -> bool:
    """`--activation_checkpointing auto`: on where the estimate does not fit in 90 % of the GPU's memory. A tiny run
    (the CPU check, the GPU warm-up) decides as the full-size run at its default resolution on an H200 would, so that it
    takes the same code path."""
    if args.activation_checkpointing != "auto":
        return args.activation_checkpointing == "on"
    if tiny:
        resolution, memory_gb = family.sizes["resolution"], H200_MEMORY_GB
    else:
        resolution = args.resolution or family.sizes["resolution"]
        memory_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    return training_memory_gb(family.name, resolution, args.num_images, max_sequence_length) > 0.9 * memory_gb


@contextlib.contextmanager
def flash_like_attention():
    """Within this context, PyTorch's SDPA runs the flash-attention op, which saves for backward what it saves on a GPU
    (queries, keys, values, output, log-sum-exp) and has a meta kernel. The math backend that the meta device would
    otherwise take saves the whole attention matrix, which no GPU run keeps."""
    original = torch.nn.functional.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, scale=scale
        )[0]

    torch.nn.functional.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def estimate_activations(family: Family, resolution: int, checkpointing: bool) -> dict:
    """Bytes autograd saves for one image's policy forward through the adapter's `predict_velocity`, counted on the meta
    device with saved-tensor hooks: LoRA (the preset's rank) on the family's default targets, bf16, no autocast; frozen
    weights (and views of them) are not counted, a tensor saved twice counts once."""
    preset = preset_fields(family)
    pipeline = family.build(family.sizes, "meta", torch.bfloat16)
    adapter = get_adapter(pipeline, guidance_scale=1.0, max_sequence_length=preset["max_sequence_length"])
    denoiser = adapter.denoiser.requires_grad_(False)
    with creating_on("meta", torch.bfloat16):
        lora = LoraConfig(
            r=preset["lora_r"], lora_alpha=preset["lora_alpha"], target_modules=list(adapter.lora_target_modules)
        )
        denoiser.add_adapter(lora)
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        text = text_tokens(family.name, preset["max_sequence_length"])
        latents = torch.randn(1, (resolution // 16) ** 2, 64)
        embeds = torch.randn(1, text, pipeline.transformer.config.joint_attention_dim)
        if family.name == "flux-dev":
            conditioning = {
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": torch.randn(1, pipeline.transformer.config.pooled_projection_dim),
            }
        else:
            conditioning = {
                "prompt_embeds": embeds,
                "prompt_embeds_mask": torch.ones(1, text, dtype=torch.long, device="cpu"),
            }
        saved: dict[int, int] = {}
        keep = []  # saved tensors stay alive, so their ids stay unique

        def pack(tensor):
            base = tensor
            while base._base is not None:
                base = base._base
            if not isinstance(base, torch.nn.Parameter) and id(base) not in saved:
                keep.append(base)
                saved[id(base)] = base.numel() * base.element_size()
            return tensor

        with flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            adapter.predict_velocity(denoiser, latents, torch.ones(1), conditioning)
    trained = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    return {
        "resolution": resolution,
        "tokens": latents.shape[1] + text,
        "activation_checkpointing": checkpointing,
        "saved_gb_per_image": sum(saved.values()) / 1e9,
        "saved_mb_per_token": sum(saved.values()) / 1e6 / (latents.shape[1] + text),
        "lora_parameters": trained,
    }


def checkpointing_field(enabled: bool) -> dict:
    """transformers renamed `gradient_checkpointing` to `activation_checkpointing`; the GPU image may have either."""
    names = {field.name for field in dataclasses.fields(NFTConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


# ---------------------------------------------------------------------------------------------------------------------
# One family


class IterationRecorder(TrainerCallback):
    """Times each optimizer step (one DiffusionNFT iteration: rollout, reward, training, update) on a synchronised
    clock, and hands the step's record, with the trainer's own timings from its log, to `on_iteration`."""

    def __init__(self, device: torch.device, num_images: int, on_iteration: Callable[[dict], None]):
        self.device, self.num_images, self.on_iteration = device, num_images, on_iteration
        self._start = self._seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = synchronized_clock(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        self._seconds = synchronized_clock(self.device) - self._start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "timing/train_seconds" not in logs:
            return
        n = self.num_images
        record = {
            "step": state.global_step,
            "rollout_seconds": logs["timing/rollout_seconds"],
            "reward_seconds": logs["timing/reward_seconds"],
            "train_seconds": logs["timing/train_seconds"],
            "iteration_seconds": self._seconds,
            "rollout_images_per_second": logs["rollout/images_per_second"],
            "train_sample_steps_per_second": logs["train/sample_steps_per_second"],
            "rollout_seconds_per_image": logs["timing/rollout_seconds"] / n,
            "train_seconds_per_image": logs["timing/train_seconds"] / n,
            "iteration_seconds_per_image": self._seconds / n,
            "loss": logs.get("loss"),
        }
        if self.device.type == "cuda":
            record["peak_memory_gib_so_far"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        print(
            f"  step {record['step']}: rollout {record['rollout_seconds']:.2f} s, train {record['train_seconds']:.2f} s, "
            f"iteration {record['iteration_seconds']:.2f} s",
            flush=True,
        )
        self.on_iteration(record)


def run_family(
    family: Family, args: argparse.Namespace, *, tiny: bool, bf16: bool, on_update: Callable[[dict], None]
) -> dict:
    """Build the family's pipeline, run `args.iterations` DiffusionNFT iterations through the trainer, and return (and
    pass to `on_update` as it goes) the settings, timings and memory; an error is recorded in the result."""
    sizes = family.tiny_sizes if tiny else family.sizes
    resolution = args.resolution or sizes["resolution"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    preset = preset_fields(family)
    if args.train_timestep_fraction is not None:
        preset["train_timestep_fraction"] = args.train_timestep_fraction
    checkpointing = needs_checkpointing(family, args, tiny, preset.get("max_sequence_length", 128))
    num_train_times = max(1, int(args.num_inference_steps * preset.get("train_timestep_fraction", 0.99)))
    result = {
        "family": family.name,
        "model": f"{family.title} architecture{' (tiny dims)' if tiny else ''}, random weights",
        "settings": {
            "device": args.device,
            "dtype": "bf16" if bf16 else "fp32",
            "resolution": resolution,
            "num_images": args.num_images,
            "num_generations": args.num_images,
            "num_inference_steps": args.num_inference_steps,
            "num_train_times": num_train_times,
            "iterations": args.iterations,
            "activation_checkpointing": checkpointing,
            "reward": "jpeg_compressibility",
            "preset": family.preset,
            **preset,
        },
        "iterations": [],
        "error": None,
    }
    print(
        f"[{family.name}] {result['model']}, {args.device}, {result['settings']['dtype']}, {resolution} px, "
        f"{args.num_images} images x {args.num_inference_steps} steps, {num_train_times} training times, "
        f"LoRA r{preset.get('lora_r')}, activation checkpointing {'on' if checkpointing else 'off'}",
        flush=True,
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipeline = trainer = None
    try:
        result["parameters_billions"] = parameter_counts(family, sizes)
        print(f"[{family.name}] parameters (billions): {result['parameters_billions']}", flush=True)
        start = time.perf_counter()
        pipeline = family.build(sizes, args.device, dtype)
        result["build_seconds"] = synchronized_clock(device) - start
        with tempfile.TemporaryDirectory() as output_dir:
            config = NFTConfig(
                output_dir=output_dir,
                use_cpu=device.type == "cpu",
                bf16=bf16,
                resolution=resolution,
                per_device_train_batch_size=args.num_images,  # one group, sampled and trained as one batch
                num_generations=args.num_images,
                gradient_accumulation_steps=1,
                num_inference_steps=args.num_inference_steps,
                max_steps=args.iterations,
                logging_steps=1,  # one log_history entry (with its timings) per iteration
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                sample_logging_steps=0,
                seed=0,
                **checkpointing_field(checkpointing),
                **preset,
            )
            trainer = DiffusionNFTTrainer(
                model=pipeline,
                reward_funcs="jpeg_compressibility",
                args=config,
                train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            )
            pipeline = None  # the trainer holds it
            result["trained_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            if device.type == "cuda":
                result["memory_gib_after_setup"] = torch.cuda.memory_allocated(device) / 2**30
            print(f"[{family.name}] built in {result['build_seconds']:.1f} s; training", flush=True)

            def record(iteration: dict) -> None:
                result["iterations"].append(iteration)
                on_update(result)

            trainer.remove_callback(PrinterCallback)  # the per-step log dicts would drown the progress lines
            trainer.add_callback(IterationRecorder(device, args.num_images, record))
            trainer.train()
            # Whether the Trainer really turned diffusers' gradient checkpointing on (it does so inside `train()`).
            result["checkpointing_active"] = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
        if not result["iterations"]:
            raise RuntimeError("the trainer logged no iteration timings")
        result["last"] = result["iterations"][-1]
    except Exception as error:  # an out-of-memory error in one family must not stop the others
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
        print(f"[{family.name}] FAILED: {result['error']}", flush=True)
    finally:
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30  # with fragmentation
        # Free everything before the next family builds its own (the trainer's callbacks refer back to it: cycles).
        if trainer is not None:
            trainer.accelerator.free_memory()
        del pipeline, trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            result["memory_gib_after_free"] = torch.cuda.memory_allocated(device) / 2**30
    on_update(result)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report


def format_table(results: dict) -> str:
    lines = [
        "| family | px | images | steps | train times | ckpt | rollout s/img | train s/img | iteration s/img | "
        "rollout img/s | train sample-steps/s | peak GiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results["families"]:
        s = result["settings"]
        last = result.get("last")
        peak = result.get("peak_memory_gib")
        cells = [
            result["family"],
            s["resolution"],
            s["num_images"],
            s["num_inference_steps"],
            s["num_train_times"],
            "on" if s["activation_checkpointing"] else "off",
        ]
        if last:
            cells += [
                f"{last['rollout_seconds_per_image']:.3f}",
                f"{last['train_seconds_per_image']:.3f}",
                f"{last['iteration_seconds_per_image']:.3f}",
                f"{last['rollout_images_per_second']:.2f}",
                f"{last['train_sample_steps_per_second']:.2f}",
            ]
        else:
            cells += [""] * 5
        cells += [
            "" if peak is None else f"{peak:.1f}",
            "ok" if result["error"] is None else result["error"][:80].replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def versions(device: str) -> dict:
    info = environment(device)
    for package in ("accelerate", "trl", "datasets", "pyarrow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    info["trl_nft_path"] = os.path.dirname(trl_nft.__file__)  # the carried wheel, on the GPU machine
    if device == "cuda":
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="flux-dev,qwen-image", help="Comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument(
        "--tiny", action="store_true", help="Same architectures with tiny dims (checks the code path)."
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="Default: bf16 on cuda, fp32 on cpu.")
    parser.add_argument("--resolution", type=int, default=None, help="Image side in pixels (default: 1024, tiny 64).")
    parser.add_argument("--num_images", type=int, default=4, help="Images per iteration, one group (>= 2).")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="Rollout sampler steps.")
    parser.add_argument("--iterations", type=int, default=1, help="Iterations per family (the last is reported).")
    parser.add_argument(
        "--train_timestep_fraction",
        type=float,
        default=None,
        help="Fraction of the rollout's times trained on (default: each preset's, FLUX 0.25, Qwen-Image 0.99).",
    )
    parser.add_argument(
        "--activation_checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on where the memory estimate does not fit the GPU (both families at 1024 px x 4 images on an "
        "H200; neither at 512 px); with --tiny, as the full-size run at 1024 px on an H200 (on).",
    )
    parser.add_argument(
        "--warmup",
        choices=("auto", "on", "off"),
        default="auto",
        help="Run each family's tiny version first, unmeasured (auto: on cuda, not with --tiny).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu).")
    parser.add_argument(
        "--estimate_activations",
        action="store_true",
        help="Only print the activation-memory estimates behind `auto` (meta device, any machine, a few seconds).",
    )
    default_output = os.path.join(
        os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results"), "families_gpu.json"
    )
    parser.add_argument("--output", default=default_output)
    args = parser.parse_args()

    names = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    if args.estimate_activations:
        for name in names:
            resolution = args.resolution or FAMILIES[name].sizes["resolution"]
            for checkpointing in (False, True):
                print(name, json.dumps(estimate_activations(FAMILIES[name], resolution, checkpointing)), flush=True)
            length = preset_fields(FAMILIES[name]).get("max_sequence_length", 128)
            total = training_memory_gb(name, resolution, args.num_images, length)
            print(f"{name}: ~{total:.0f} GB for {args.num_images} images without checkpointing", flush=True)
        return
    if args.device == "cpu" and not args.tiny:
        parser.error("the real architectures need a GPU; on a CPU, check the code path with --tiny.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU.")
    if args.num_images < 2:
        parser.error("--num_images must be at least 2 (a group needs two images to compare).")
    # On a shared CPU, one thread degrades gracefully when other jobs oversubscribe the cores (see overhead.py).
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    bf16 = (args.dtype or ("bf16" if args.device == "cuda" else "fp32")) == "bf16"
    warmup = args.warmup == "on" or (args.warmup == "auto" and args.device == "cuda" and not args.tiny)

    results = {"environment": versions(args.device), "command": vars(args), "families": [], "warmups": []}
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, {results['environment']['gpu_memory_gib']:.0f} GiB", flush=True)

    def update(slot: list, index: int) -> Callable[[dict], None]:
        def write(result: dict) -> None:
            slot[index:] = [result]
            write_results(results, args.output)

        return write

    for name in names:
        family = FAMILIES[name]
        if warmup:
            warm_args = argparse.Namespace(**{**vars(args), "resolution": None, "iterations": 1})
            index = len(results["warmups"])
            run_family(family, warm_args, tiny=True, bf16=bf16, on_update=update(results["warmups"], index))
        index = len(results["families"])
        run_family(family, args, tiny=args.tiny, bf16=bf16, on_update=update(results["families"], index))
        print(format_table({"families": results["families"][-1:]}), flush=True)

    print(format_table(results), flush=True)
    ran = ", ".join(
        f"{r['family']} at {r['settings']['resolution']} px{' (tiny dims)' if args.tiny else ''}"
        for r in results["families"]
    )
    print(f"ran: {ran}; results in {args.output}", flush=True)
    if any(result["error"] for result in results["families"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
