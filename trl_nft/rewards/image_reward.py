"""ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
https://github.com/THUDM/ImageReward): a BLIP model fine-tuned on 137k expert comparisons of generated images.

The model is rebuilt on transformers' BLIP modules (`BlipVisionModel`, `BlipTextModel`) and loads the released
`ImageReward.pt` (original BLIP key names) by renaming its keys, following transformers'
`convert_blip_original_pytorch_to_hf.py`. This avoids the `image-reward` package, which downloads the BERT tokenizer
when the model is built, pins an old `timm` and needs `fairscale`.
"""

import json
import math
import os
import re
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from . import register_reward
from .base import RewardModel, resolve_checkpoint, resolve_file
from .clip import openai_clip_pixels, preference_mlp


# transformers' BLIP modules are imported where they are used: registering the reward must stay cheap (`trl nft` lists
# and checks the registered rewards before it imports transformers).
if TYPE_CHECKING:
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

# `ImageReward.mean` and `ImageReward.std` of ImageReward-v1.0: the raw MLP output is standardised with them.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
_MAX_PROMPT_TOKENS = 35
# BLIP's ViT-B/16 and ViT-L/16 both use 64-dim heads (768 / 12, 1024 / 16); the checkpoint does not store the count.
_VIT_HEAD_DIM = 64

# Original BLIP ViT names (after `blip.visual_encoder.`) -> `BlipVisionModel` names.
_VISION_RENAMES = [
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"cls_token$", "embeddings.class_embedding"),
    (r"pos_embed$", "embeddings.position_embedding"),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"norm\.", "post_layernorm."),
]
# In the checkpoint but not used to score: BLIP's contrastive projections and the text position-id buffer.
_UNUSED_KEYS = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")


def _rename_vision_key(key: str) -> str:
    for pattern, replacement in _VISION_RENAMES:
        renamed, count = re.subn(f"^{pattern}", replacement, key)
        if count:
            return renamed
    return key  # reported as unexpected by the strict load


def split_image_reward_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original ImageReward state dict as the state dicts of (`BlipVisionModel`, `BlipTextModel`, the MLP).

    `blip.visual_encoder.*` is renamed to transformers' ViT names, `blip.text_encoder.*` (BLIP's BERT, the same names as
    `BlipTextModel`) and `mlp.layers.*` lose their prefix; the unused projections are dropped; any other key is an
    error.
    """
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state_dict.items():
        if _UNUSED_KEYS.fullmatch(key):
            continue
        if key.startswith("blip.visual_encoder."):
            vision[_rename_vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            mlp[key.removeprefix("mlp.layers.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unexpected keys in the ImageReward checkpoint: {unknown}.")
    if "embeddings.position_embedding" not in vision:
        raise ValueError("The ImageReward checkpoint has no `blip.visual_encoder.pos_embed`.")
    return vision, text, mlp


def _vision_config(vision: dict[str, torch.Tensor]) -> "BlipVisionConfig":
    # BLIP's ViT sizes, read from the weights' shapes (the original hard-codes ViT-L/16 at 224 px).
    _, num_positions, hidden_size = vision["embeddings.position_embedding"].shape
    patch_size = vision["embeddings.patch_embedding.weight"].shape[-1]
    num_layers = len({key.split(".")[2] for key in vision if key.startswith("encoder.layers.")})
    from transformers import BlipVisionConfig

    return BlipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // _VIT_HEAD_DIM,
        image_size=math.isqrt(num_positions - 1) * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )


def _text_config(med_config: dict, encoder_hidden_size: int) -> "BlipTextConfig":
    # BLIP_Pretrain sets `encoder_width` (the width of the cross-attended image embeddings) to the ViT's width.
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_hidden_size,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config["hidden_act"],
        layer_norm_eps=med_config["layer_norm_eps"],
        pad_token_id=med_config["pad_token_id"],
        bos_token_id=None,  # generation ids: unused by the encoder
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers (`add_cross_attention` in BLIP's med.py)
    )


def _load_strictly(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The ImageReward checkpoint does not fit the {what}: missing {missing}, unexpected {unexpected}."
        )


class ImageRewardModel(nn.Module):
    """ImageReward-v1.0: `BlipVisionModel` (ViT-L/16) -> image embeddings; `BlipTextModel` (BERT with cross-attention to
    them) on the prompt -> hidden state of the first ([CLS]) token -> MLP 768-1024-128-64-16-1 (linear layers, no
    activation; dropout is inactive in eval) -> `(raw - 0.16717362830052426) / 1.0333394966054072`."""

    def __init__(self, vision_config: "BlipVisionConfig", text_config: "BlipTextConfig"):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        # The original `MLP.layers`, indices included, so the checkpoint's `mlp.layers.{0,2,4,6,7}` load unchanged.
        self.mlp = preference_mlp(text_config.hidden_size)

    @classmethod
    def from_original(cls, state_dict: dict[str, torch.Tensor], med_config: dict) -> "ImageRewardModel":
        """The model with the weights of an original ImageReward state dict (`ImageReward.pt`) and its BERT config
        (`med_config.json`); every weight must be in the state dict and every key of it used (or known unused)."""
        vision, text, mlp = split_image_reward_state_dict(state_dict)
        vision_config = _vision_config(vision)
        model = cls(vision_config, _text_config(med_config, vision_config.hidden_size))
        _load_strictly(model.vision_model, vision, "image encoder")
        _load_strictly(model.text_encoder, text, "text encoder (check med_config.json)")
        _load_strictly(model.mlp, mlp, "MLP")
        return model.eval()

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        # Bidirectional self-attention on the prompt; every image embedding is attended (no cross-attention mask).
        text_states = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        features = text_states[:, 0].to(self.mlp[0].weight.dtype)
        return (self.mlp(features).squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


@register_reward("image_reward")
class ImageReward(RewardModel):
    """ImageReward-v1.0 score of each (image, prompt), as `ImageReward.score` computes it: a human-preference score,
    unbounded, higher is better, the raw MLP output standardised with the authors' constants (mean 0.1672, std 1.0333).
    Definition: see `ImageRewardModel`; prompts are tokenised like the original (`bert-base-uncased` with `[DEC]` and
    `[ENC]` added, padded/truncated to 35 tokens), images preprocessed by ImageReward's `_transform`
    (OpenAI CLIP's, `openai_clip_pixels`; 224 px).

    Args:
        checkpoint: the Hub repository holding `ImageReward.pt` and `med_config.json` (default `THUDM/ImageReward`),
            a local folder holding both, or a local `.pt` file with `med_config.json` beside it.
        tokenizer: the BERT tokenizer, a Hub id or a local folder (default `bert-base-uncased`).
        batch_size, device, dtype: see `RewardModel`.
    """

    default_checkpoint = "THUDM/ImageReward"

    def __init__(self, checkpoint: str | None = None, tokenizer: str = "bert-base-uncased", **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.tokenizer = tokenizer

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.tokenizer)

    def checkpoints(self) -> list[str]:
        return [*super().checkpoints(), self.tokenizer]

    def load(self) -> tuple[ImageRewardModel, "BertTokenizer"]:
        weights = resolve_file(self.checkpoint, "ImageReward", "ImageReward.pt")
        is_file = os.path.isfile(os.path.expanduser(self.checkpoint))
        config_source = (os.path.dirname(weights) or ".") if is_file else self.checkpoint
        with open(resolve_file(config_source, "ImageReward", "med_config.json")) as file:
            med_config = json.load(file)
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        model = ImageRewardModel.from_original(state_dict, med_config).to(self.device, self.dtype)
        model.mlp.float()  # the original MLP runs on `.float()` features
        from transformers import BertTokenizer

        tokenizer = BertTokenizer.from_pretrained(resolve_checkpoint(self.tokenizer, "ImageReward tokenizer"))
        # BLIP's `init_tokenizer` adds these (ids 30522, 30523 in the 30524-token embedding).
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return model, tokenizer

    def score(self, models, images: list[Image.Image], prompts: list[str], **columns) -> list[float]:
        model, tokenizer = models
        size = model.vision_model.config.image_size
        pixel_values = torch.stack([openai_clip_pixels(image, size) for image in images]).to(self.device, self.dtype)
        text = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=_MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        return model(pixel_values, text.input_ids, text.attention_mask).tolist()
