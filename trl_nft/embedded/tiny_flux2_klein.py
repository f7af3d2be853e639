"""`tiny-flux2-klein`: a tiny random-weight FLUX.2 [klein] pipeline built entirely offline.

A real `Flux2KleinPipeline` (a `Qwen3ForCausalLM` text encoder deep enough for the three layers the pipeline reads, a
`Flux2Transformer2DModel` with double- and single-stream blocks, the batch-normalised VAE `AutoencoderKLFlux2`,
FLUX.2's scheduler config) with an offline Qwen3 tokenizer and chat template, only very small (about 200k
parameters); weights are a deterministic function of `seed`. `is_distilled=True` (the default) makes it step-distilled
like FLUX.2-klein-4B, `False` a base checkpoint like FLUX.2-klein-base-4B, whose guidance is CFG.
"""

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from .tiny import _as_loaded, tiny_vae
from .tiny_flux import FLUX_SCHEDULER_CONFIG
from .tiny_qwen_image import _qwen3_tokenizer


TINY_FLUX2_KLEIN_RESOLUTION = 64
_LATENT_CHANNELS = 4  # patchified 2 x 2: the transformer sees 16 channels per token
_TEXT_DIM = 16  # the text encoder's hidden size; the pipeline concatenates three layers' for the transformer
#: The pipeline concatenates the hidden states after layers 9, 18 and 27 (`text_encoder_out_layers`): the encoder
#: needs at least 27 layers; 28 keep layer 27's intermediate, as in Qwen3-4B's 36.
_TEXT_LAYERS = 28
#: FLUX.2's `scheduler/scheduler_config.json` (diffusers' FLUX.2 checkpoints): FLUX.1's, but the
#: shift is exponential in `mu`, which `Flux2KleinPipeline` computes from the image sequence length and the steps.
_SCHEDULER_CONFIG = dict(FLUX_SCHEDULER_CONFIG, time_shift_type="exponential")


def build_tiny_flux2_klein(seed: int = 0, is_distilled: bool = True) -> Flux2KleinPipeline:
    """Build the tiny FLUX.2-klein pipeline (64 px, 4 latent channels, VAE scale 8, so 4 x 4 packed tokens) with
    weights fixed by `seed`; `is_distilled` makes it step-distilled (no guidance), else a base model (CFG)."""
    tokenizer = _qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                # as Qwen3's: `<|endoftext|>` pads, `<|im_end|>` ends
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                hidden_size=_TEXT_DIM,
                intermediate_size=32,
                num_hidden_layers=_TEXT_LAYERS,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                tie_word_embeddings=True,
            )
        )
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * _TEXT_DIM,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),  # time, height, width, text position: they sum to the head dimension
            guidance_embeds=False,  # as FLUX.2-klein's: the pipeline passes no guidance
        )
        vae = tiny_vae(AutoencoderKLFlux2, latent_channels=_LATENT_CHANNELS)
        # Batch-norm statistics other than a fresh layer's 0 and 1, so that (de-)normalising the latents matters.
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    # The pipeline fixes its native size (1024 px) in code, not in a config: the tiny model's is 64 px.
    pipeline.default_sample_size = TINY_FLUX2_KLEIN_RESOLUTION // pipeline.vae_scale_factor
    return _as_loaded(pipeline)
