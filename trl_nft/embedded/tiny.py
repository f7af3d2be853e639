"""Embedded models: tiny random-weight pipelines built entirely offline (`tiny-sd3`, the default, `tiny-sd` and
`tiny-sdxl`), and the tokenizers and text-encoder configs the other families' tiny builders share.

Nothing here touches the network: the tokenizers are built from an in-memory vocabulary and every module from a
config, so `DiffusionNFTTrainer(model="tiny-sd3", ...)` works on a fresh machine without a Hub cache. The pipeline is
a real `StableDiffusion3Pipeline` (real CLIP and T5 encoders, a real `SD3Transformer2DModel` and `AutoencoderKL`), only
very small; weights are a deterministic function of `seed`.
"""

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)


TINY_SD3_RESOLUTION = 64
_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
#: The scaled-linear betas SD1.x and SDXL train with.
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _clip_tokenizer() -> CLIPTokenizer:
    # Byte-level BPE with no merges: every word becomes its characters, the last one marked with "</w>".
    special = ["<|startoftext|>", "<|endoftext|>"]
    pieces = special + list(_CHARACTERS) + [c + "</w>" for c in _CHARACTERS]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    # Unigram vocabulary of single characters (with and without the word-start marker "▁").
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARACTERS] + [("▁" + c, -2.5) for c in _CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _t5_config(tokenizer: T5Tokenizer) -> T5Config:
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )


def tiny_vae(vae_class: type = AutoencoderKL, **config):
    """A tiny four-level VAE (scale 8) for 64 px images, without the quantisation convolutions (as SD3's and FLUX's);
    `config` sets the latent channels and the latent normalisation."""
    return vae_class(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=TINY_SD3_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **config,
    )


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build the tiny SD3 pipeline (64 px, 16 latent channels, VAE scale 8) with weights fixed by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tokenizer = _clip_tokenizer()
        t5_tokenizer = _t5_tokenizer()

        text_encoder = CLIPTextModelWithProjection(_clip_text_config(clip_tokenizer, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(clip_tokenizer, projection_dim=32))
        text_encoder_3 = T5EncoderModel(_t5_config(t5_tokenizer))
        transformer = SD3Transformer2DModel(
            sample_size=TINY_SD3_RESOLUTION // 8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=16,
        )
        vae = tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE normalisation
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    return _as_loaded(pipeline)


def build_tiny_sd(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """Build a tiny SD1.x-style pipeline (64 px, 4 latent channels, VAE scale 4, UNet with cross-attention, DDIM with
    SD's scaled-linear betas) with weights fixed by `seed`; `prediction_type` is `"epsilon"` or `"v_prediction"`."""
    components = _tiny_unet_components(
        seed,
        xl=False,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    scheduler = DDIMScheduler(
        **_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type
    )
    pipeline = StableDiffusionPipeline(
        **components, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return _as_loaded(pipeline)


def build_tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
    """Build a tiny SDXL pipeline (64 px, 4 latent channels, VAE scale 4; two CLIP encoders whose hidden states are
    concatenated, a UNet with SDXL's `text_time` added conditioning, Euler with SDXL's scheduler config) with weights
    fixed by `seed`; `prediction_type` is `"epsilon"` or `"v_prediction"`."""
    components = _tiny_unet_components(
        seed,
        xl=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # the two encoders' hidden states (32 each), concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 time ids (original size, crop corner, target size) embedded in 8 each, and the pooled embedding (32)
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS, steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type
    )
    return _as_loaded(StableDiffusionXLPipeline(**components, scheduler=scheduler, add_watermarker=False))


def _tiny_unet_components(seed: int, xl: bool, **unet_blocks) -> dict:
    """The modules of the tiny SD1.x (`xl=False`) or SDXL pipeline, drawn from `seed` in a fixed order: the CLIP text
    encoder (SDXL: and a second one with a projection, for the pooled embedding), a two-level UNet for 16 x 16 latents
    (`unet_blocks`: its block types and conditioning), the VAE (4 latent channels, scale 4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _clip_tokenizer()
        components = {"tokenizer": tokenizer, "text_encoder": CLIPTextModel(_clip_text_config(tokenizer))}
        if xl:
            components["tokenizer_2"] = tokenizer
            components["text_encoder_2"] = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=32))
        components["unet"] = UNet2DConditionModel(
            sample_size=TINY_SD3_RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_head_dim=8,
            norm_num_groups=8,
            **unet_blocks,
        )
        components["vae"] = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=TINY_SD3_RESOLUTION,
            **(dict(scaling_factor=0.13025, force_upcast=True) if xl else {}),  # SDXL's VAE config
        )
    return components


def _as_loaded(pipeline):
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as `from_pretrained` leaves them: T5's dropout would make prompts random
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
