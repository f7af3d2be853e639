"""`tiny-sana`: a tiny random-weight SANA pipeline built entirely offline.

A real `SanaPipeline` (a `Gemma2Model` text encoder, a `SanaTransformer2DModel` with linear self-attention, the deep
compression autoencoder `AutoencoderDC`, SANA's flow DPM-Solver scheduler config) with an offline Gemma tokenizer,
only very small (about 76k parameters, most of them in the DC-AE); weights are a deterministic function of `seed`.

SANA's DC-AE downsamples 32 times, which would leave a 64 px image 2 x 2 latents. The tiny DC-AE has four levels
instead of six (VAE scale 8), so a 64 px image is 8 x 8 latents, 64 tokens for the transformer (whose patches are
1 x 1, as SANA's); its blocks follow SANA's DC-AE in kind (residual blocks with batch norms and ReLU in the outer
levels, EfficientViT blocks with RMS norms in the inner ones).
"""

import inspect
import re
import string

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from .tiny import _as_loaded


TINY_SANA_RESOLUTION = 64
_VAE_SCALE = 8  # four DC-AE levels: three downsamplings
_LATENT_CHANNELS = 4
_TEXT_DIM = 16  # the text encoder's hidden size, which the transformer's `caption_channels` must match
_INNER_DIM = 16  # the transformer's width: heads x head dimension, also its cross-attention width
#: SANA's DC-AE latent normalisation (mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers, `scaling_factor`).
_SCALING_FACTOR = 0.41407
#: SANA's scheduler, as diffusers' `scripts/convert_sana_to_diffusers.py` writes it for the 512 px to 2K checkpoints
#: (Efficient-Large-Model/Sana_1600M_1024px_diffusers): DPM-Solver++(2M) on flow sigmas shifted by 3, the rest
#: diffusers' defaults.
_SCHEDULER_CONFIG = dict(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
#: Gemma's special tokens, at Gemma's ids.
_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
#: Single-character tokens: Gemma's word-start marker, the newline that joins the instruction's lines, and the
#: printable ASCII characters (the pipeline lowercases prompts, not the instruction).
_CHARACTERS = ["▁", "\n", *string.ascii_letters, *string.digits, *string.punctuation]


def _gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's tokenizer, offline: byte-fallback BPE over characters (spaces become the word-start marker "▁"),
    adding `<bos>` and padding with `<pad>`, whose merges make each word of SANA's complex human instruction one token
    ("▁" and the word, as Gemma's vocabulary has them).

    `SanaPipeline` prepends that instruction (the default of its `complex_human_instruction`) to every prompt and keeps
    `<bos>` and the last `max_sequence_length - 1` tokens. Character by character it would be 1 057 tokens, which the
    tiny text encoder would read for every prompt; word by word it is 174, the scale of a subword vocabulary's count,
    and a prompt's own words are characters, or words the instruction shares ("▁a", "▁cat").
    """
    instruction = "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
    vocab = {token: i for i, token in enumerate([*_SPECIAL_TOKENS, *_CHARACTERS])}
    merges = []
    # The instruction's words as the tokenizer's normaliser writes them: an optional "▁", then no "▁" or newline.
    for word in re.findall(r"▁?[^▁\n]+", instruction.replace(" ", "▁")):
        for end in range(2, len(word) + 1):  # build each word left to right, one character per merge
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def build_tiny_sana(seed: int = 0) -> SanaPipeline:
    """Build the tiny SANA pipeline (64 px, 4 latent channels, VAE scale 8, so 8 x 8 latent tokens) with weights fixed
    by `seed`."""
    tokenizer = _gemma_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                hidden_size=_TEXT_DIM,
                intermediate_size=32,
                num_hidden_layers=2,  # one sliding-window layer and one global layer, as Gemma-2 alternates them
                num_attention_heads=2,
                num_key_value_heads=1,  # grouped-query attention, as Gemma-2's
                head_dim=8,
                query_pre_attn_scalar=8,  # Gemma-2-2B scales its queries by its head dimension
            )
        )
        transformer = SanaTransformer2DModel(
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_attention_heads=2,
            attention_head_dim=_INNER_DIM // 2,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=_INNER_DIM // 2,
            cross_attention_dim=_INNER_DIM,
            caption_channels=_TEXT_DIM,
            sample_size=TINY_SANA_RESOLUTION // _VAE_SCALE,  # the native latent side: the adapter's native resolution
            patch_size=1,
        )
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=_LATENT_CHANNELS,
            attention_head_dim=8,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8, 16, 16),
            decoder_block_out_channels=(8, 8, 16, 16),
            encoder_layers_per_block=(1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (5,), (5,)),
            downsample_block_type="Conv",  # SANA's DC-AE: strided convolutions down, interpolation up
            upsample_block_type="interpolate",
            decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
            decoder_act_fns=("relu", "relu", "silu", "silu"),
            scaling_factor=_SCALING_FACTOR,
        )
    pipeline = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**_SCHEDULER_CONFIG),
    )
    return _as_loaded(pipeline)
