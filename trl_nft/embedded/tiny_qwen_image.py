"""`tiny-qwen-image`: a tiny random-weight Qwen-Image pipeline built entirely offline.

A real `QwenImagePipeline` (a `Qwen2_5_VLForConditionalGeneration` text encoder with its vision tower, a
`QwenImageTransformer2DModel`, the video VAE `AutoencoderKLQwenImage`, Qwen-Image's scheduler config) with an offline
Qwen2 tokenizer, only very small (about 360k parameters, most of them in the VAE); weights are a deterministic function
of `seed`.
"""

import re

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .tiny import _as_loaded


TINY_QWEN_IMAGE_RESOLUTION = 64
_LATENT_CHANNELS = 4  # packed 2 x 2: the transformer sees 16 channels per token
_TEXT_DIM = 32  # the text encoder's hidden size, which the transformer's `joint_attention_dim` must match
#: The chat tokens Qwen-Image's prompt template uses (`<|endoftext|>` is the Qwen2 tokenizer's pad and end token).
_CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
#: Qwen/Qwen-Image's `scheduler/scheduler_config.json` (the rest are diffusers' defaults): the shift grows with the
#: image sequence length (`mu`, set by the pipeline), and the schedule is stretched to end at t = 0.02.
_SCHEDULER_CONFIG = dict(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
#: The first channels' statistics of Qwen-Image's VAE (diffusers' defaults), so that decoding de-normalises.
_LATENT_STATISTICS = dict(
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
)


def _qwen_tokenizer(
    template: str, special_tokens: list[str] = _CHAT_TOKENS, chat_template: str | None = None
) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer (Qwen2's pre-tokenizer over all 256 byte symbols, so every text encodes) whose merges
    make each word of the prompt `template` one token, as Qwen2's vocabulary does; `special_tokens` stay whole, and
    `chat_template` is what `apply_chat_template` renders (Qwen-Image's pipeline formats its template itself).

    The pipeline drops the first `prompt_template_encode_start_idx` (34) tokens of every encoded prompt: the chat
    template's system part, as the real tokenizer splits it. With single-byte tokens that part would be about 150
    tokens long, and the dropped 34 would leave most of the instruction in every prompt's embedding; with the template's
    words as tokens it is exactly 34 here too, so the embedding holds, as in Qwen-Image, the prompt and the template's
    closing tokens, never nothing.
    """
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", *special_tokens, *symbols])}
    merges = []
    pre_tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[]).backend_tokenizer.pre_tokenizer  # Qwen2's word split
    segments = re.split("|".join(map(re.escape, [*special_tokens, "{}"])), template)  # special tokens stand alone
    words = [word for segment in segments for word, _ in pre_tokenizer.pre_tokenize_str(segment)]
    for word in words:
        for end in range(2, len(word) + 1):  # build each word left to right, one symbol per merge
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    # An earlier word's merge can split a later word first (" consistency" loses "co" to "color" and stays in pieces):
    # join such a word's first two pieces until it is whole. Each added merge ranks last, so no earlier word changes.
    for word in words:
        while len(pieces := [token.value for token in BPE(vocab, merges).tokenize(word)]) > 1:
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            merges.append((pieces[0], pieces[1]))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=special_tokens, chat_template=chat_template)


#: Qwen3's chat tokens: the turn markers and the thinking block's.
_QWEN3_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
#: The part of Qwen3's chat template that text-to-image pipelines render: the user's turn, then (with
#: `add_generation_prompt`) the assistant's turn opened, its thinking block left empty when `enable_thinking=False`.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _qwen3_tokenizer() -> Qwen2Tokenizer:
    """Qwen3's tokenizer, offline, as the FLUX.2-klein and Z-Image pipelines use it: `_qwen_tokenizer` with Qwen3's
    chat tokens and chat template, the template's words ("user", "assistant") one token each."""
    rendered = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    return _qwen_tokenizer(rendered, _QWEN3_TOKENS, _QWEN3_CHAT_TEMPLATE)


def _qwen2_5_vl(tokenizer: Qwen2Tokenizer, **vision_token_ids: int) -> Qwen2_5_VLForConditionalGeneration:
    """A tiny Qwen2.5-VL (a 2-layer text model and a 1-block vision tower) for `tokenizer`; `vision_token_ids` are the
    ids of the tokenizer's vision tokens (`image_token_id`, ...), for the pipelines that show it images."""
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                # as Qwen2.5-VL's: `<|endoftext|>` begins and pads, `<|im_end|>` ends
                bos_token_id=tokenizer.pad_token_id,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                hidden_size=_TEXT_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                # multimodal RoPE: the (temporal, height, width) sections split the 8 frequencies of a 16-dim head
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=_TEXT_DIM,
                fullatt_block_indexes=[0],
            ),
            **vision_token_ids,
        )
    )


def _qwen_image_transformer(**config) -> QwenImageTransformer2DModel:
    """A tiny `QwenImageTransformer2DModel` (2 blocks of 2 heads of 16) for packed latents of `_LATENT_CHANNELS`;
    `config` adds options (Qwen-Image-Edit-2511's `zero_cond_t`)."""
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=_LATENT_CHANNELS * 4,
        out_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_DIM,
        axes_dims_rope=(8, 4, 4),  # frame, height, width: they sum to the head dimension
        **config,
    )


def build_tiny_qwen_image(seed: int = 0) -> QwenImagePipeline:
    """Build the tiny Qwen-Image pipeline (64 px, 4 latent channels, VAE scale 8, so 4 x 4 packed tokens) with weights
    fixed by `seed`."""
    # The tokenizer learns its words from the pipeline's prompt template, which `QwenImagePipeline.__init__` sets.
    tokenizer = _qwen_tokenizer(QwenImagePipeline(None, None, None, None, None).prompt_template_encode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _qwen2_5_vl(tokenizer)
        transformer = _qwen_image_transformer()
        vae = AutoencoderKLQwenImage(  # three spatial downsamplings: VAE scale 8, as Qwen-Image's
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            **_LATENT_STATISTICS,
        )
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # The pipeline hard-codes 128 latent pixels (1024 px); the VAE's three downsamplings make its scale 8, as Qwen-Image's.
    pipeline.default_sample_size = TINY_QWEN_IMAGE_RESOLUTION // pipeline.vae_scale_factor
    return _as_loaded(pipeline)
