"""Tiny random reward models saved to disk, for loading through the rewards' real loaders (no network)."""

import json
import os

import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    Dinov2Config,
    Dinov2Model,
)

from trl_nft.embedded.tiny import _clip_text_config, _clip_tokenizer


TINY_CLIP_IMAGE_SIZE = 32
TINY_OPEN_CLIP_NAME = "trl-nft-tiny-open-clip"


def save_tiny_clip(path, seed: int = 0) -> str:
    """Save a tiny random transformers `CLIPModel` (projection dim 16, 32 px images) with its processor (offline
    character tokenizer, `CLIPImageProcessor` sized for it) to `path`; returns `path` as a string."""
    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=TINY_CLIP_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def save_tiny_dinov2(path, seed: int = 0) -> str:
    """Save a tiny random transformers `Dinov2Model` (hidden size 32, 32 px images, 8 px patches) with an image
    processor of DINOv2's kind (`BitImageProcessor`: shortest edge resized, center crop, ImageNet normalisation)
    sized for it to `path`; returns `path` as a string."""
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config).eval()
    model.save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return str(path)


def save_tiny_aesthetic_head(path, input_size: int = 16, seed: int = 0) -> str:
    """Save a random state dict with the layout and layer sizes of the LAION aesthetic predictor's head
    (`layers.{0,2,4,6,7}.{weight,bias}`) to the file `path`; returns `path` as a string."""
    sizes = {0: (1024, input_size), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, bound: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

    state_dict = {}
    for index, (out_features, in_features) in sizes.items():
        bound = (3 / in_features) ** 0.5  # unit variance per input, so the output varies visibly between images
        state_dict[f"layers.{index}.weight"] = uniform(out_features, in_features, bound=bound)
        state_dict[f"layers.{index}.bias"] = uniform(out_features, bound=bound)
    torch.save(state_dict, path)
    return str(path)


def save_tiny_hpsv2(path, seed: int = 0) -> tuple[str, str]:
    """Register a tiny open_clip architecture (32 px, embed dim 16; open_clip's own BPE tokenizer) and save a random
    model of it under `path` as `HPS_v2.1_compressed.pt`, in the released format (`{"state_dict": ...}`). Returns the
    checkpoint folder and the architecture name."""
    import open_clip

    os.makedirs(path, exist_ok=True)
    config_file = os.path.join(path, f"{TINY_OPEN_CLIP_NAME}.json")
    with open(config_file, "w") as f:
        json.dump(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": TINY_CLIP_IMAGE_SIZE,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 8,
                },
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            },
            f,
        )
    open_clip.add_model_config(config_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_OPEN_CLIP_NAME)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, os.path.join(path, "HPS_v2.1_compressed.pt"))
    return str(path), TINY_OPEN_CLIP_NAME
