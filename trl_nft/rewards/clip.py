"""CLIP-based rewards: CLIP score, the LAION aesthetic predictor, PickScore and HPS v2.1, and the image preprocessing
of the CLIP family.

`clip_score`, `aesthetic` and `pickscore` run a transformers `CLIPModel` (shared by `load_clip` when two rewards name
the same checkpoint); `hpsv2` runs an open_clip model (the `hpsv2` extra).

Each reward's images are preprocessed as its reference implementation preprocessed them, to the float32 rounding:
`clip_processor_pixels` (transformers 4's `CLIPImageProcessor`: PickScore, DDPO's aesthetic scorer, CLIP score),
`openai_clip_pixels` (OpenAI CLIP's torchvision transform: ImageReward, GenEval's colour classifier) and
`hpsv2_pixels` (HPSv2's resize of the longer side and padding).
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import register_reward
from .base import RewardModel, resolve_checkpoint, resolve_file


# OpenAI CLIP's normalisation (open_clip's `OPENAI_DATASET_MEAN` and `OPENAI_DATASET_STD`).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """`(pixels - mean) / std` per channel of a float32 `[3, H, W]` tensor (torchvision's `Normalize`)."""
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def check_clip_image_processor(image_processor, checkpoint: str) -> None:
    """A `ValueError` naming `checkpoint` unless its image processor is configured as CLIP's (resize of the shortest
    edge, center crop, rescale, normalisation): the only configuration `clip_processor_pixels` reproduces."""
    steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
    if not all(getattr(image_processor, step) for step in steps) or not image_processor.size.get("shortest_edge"):
        raise ValueError(
            f"The image processor of {checkpoint!r} is not configured as CLIP's (size {image_processor.size}, "
            + ", ".join(f"{step}={getattr(image_processor, step)}" for step in steps)
            + '): give a CLIP processor (`size={"shortest_edge": ...}` and every step on) as processor_checkpoint.'
        )


def clip_processor_pixels(image_processor, images: list[Image.Image]) -> torch.Tensor:
    """`pixel_values` `[B, 3, height, width]` (float32) of `images`, as transformers 4's `CLIPImageProcessor` computed
    them with the settings of `image_processor` (a transformers CLIP image processor, see
    `check_clip_image_processor`): PIL's conversion to RGB (alpha dropped), PIL resize (`resample`, bicubic for CLIP)
    of the shorter side to `size["shortest_edge"]` and of the longer side to `int(shortest_edge * long / short)`,
    center crop to `crop_size` (offsets rounded down; zero padding where the image is smaller), `* rescale_factor` in
    float64 rounded to float32, `(x - image_mean) / image_std`.

    This is what PickScore's, DDPO's and Flow-GRPO's scorers ran (transformers 4). Transformers 5 resizes with
    torchvision (antialiased bicubic on tensors), which moves CLIP scores by about 1e-4, and composites transparent
    images onto white.
    """
    shortest_edge = image_processor.size["shortest_edge"]
    crop_height, crop_width = image_processor.crop_size["height"], image_processor.crop_size["width"]
    pixel_values = []
    for image in images:
        image = image.convert("RGB")
        width, height = image.size
        longest_edge = int(shortest_edge * max(width, height) / min(width, height))
        size = (shortest_edge, longest_edge) if width <= height else (longest_edge, shortest_edge)
        # Resized even at the same size, as transformers did (PIL then returns a copy).
        image = image.resize(size, image_processor.resample)
        left, top = (size[0] - crop_width) // 2, (size[1] - crop_height) // 2
        # PIL fills the part of the box outside the image with zeros, where transformers padded with zeros.
        image = image.crop((left, top, left + crop_width, top + crop_height))
        rescaled = (np.asarray(image, dtype=np.float64) * image_processor.rescale_factor).astype(np.float32)
        pixels = torch.from_numpy(rescaled).permute(2, 0, 1)
        pixel_values.append(_normalize(pixels, image_processor.image_mean, image_processor.image_std))
    return torch.stack(pixel_values)


def openai_clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's `_transform(size)` on one PIL image, as torchvision computes it (also open_clip's evaluation
    transform for the `openai` weights, and ImageReward's): resize the shorter side to `size` (PIL bicubic, the longer
    side to `int(size * long / short)`), center-crop `size` x `size` (offsets rounded), RGB, scale to [0, 1],
    normalise with the CLIP mean and std. Returns `[3, size, size]` float32."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    resized = (size, int(size * long / short)) if width <= height else (int(size * long / short), size)
    if resized != image.size:
        image = image.resize(resized, Image.BICUBIC)
    left, top = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return _normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def hpsv2_pixels(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """HPSv2's evaluation preprocessing of one PIL image (`image_transform(size, is_train=False,
    resize_longest_max=True)` in tgxs002/HPSv2's `hpsv2/src/open_clip/transform.py`, used by its `score` and by
    Flow-GRPO's `hpsv2_scorer.py`): RGB, to a float32 tensor in [0, 1], antialiased bicubic resize of the
    tensor so that the longer side is `size` (each side to `round(side * size / long)`), zero padding to `size` x
    `size` (`pad // 2` on the left and top, the rest on the right and bottom), normalisation with `mean` and `std`.
    Returns `[3, size, size]`.

    Two inputs on which HPSv2 fails are scored: an RGBA image (HPSv2 keeps its alpha as a fourth channel, which the
    model cannot take) is converted to RGB like any other mode, and an image whose longer side is already `size` is
    padded (HPSv2 skips the padding along with the resize, and the model fails on the non-square input).
    """
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    resized = (round(height * scale), round(width * scale))
    if resized != (height, width):
        pixels = F.interpolate(pixels[None], size=resized, mode="bicubic", align_corners=False, antialias=True)[0]
    pad_height, pad_width = size - resized[0], size - resized[1]
    pixels = F.pad(pixels, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2))
    return _normalize(pixels, mean, std)


@functools.cache
def load_clip(checkpoint: str, processor_checkpoint: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """A transformers `(CLIPModel, CLIPProcessor)` in eval mode on `device` in `dtype`, loaded once per process for
    each argument tuple, so that rewards on the same checkpoint share one copy of the weights. Only called from a
    reward's `load`, which `load_once` serialises."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(resolve_checkpoint(checkpoint, "CLIP"), dtype=dtype)
    processor = AutoProcessor.from_pretrained(resolve_checkpoint(processor_checkpoint, "CLIP processor"))
    check_clip_image_processor(processor.image_processor, processor_checkpoint)
    return model.to(device).eval(), processor


def clip_image_embeds(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised CLIP image embeddings `[B, projection_dim]` in float32 (pixels from `clip_processor_pixels`)."""
    pixels = clip_processor_pixels(processor.image_processor, images).to(model.device, model.dtype)
    embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


def clip_text_embeds(model, processor, prompts: list[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings `[B, projection_dim]` in float32; prompts are truncated to the text model's
    maximum length (77 tokens for the released CLIPs)."""
    max_length = model.config.text_config.max_position_embeddings
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tokens = {key: value.to(model.device) for key, value in tokens.items()}
    embeds = model.text_projection(model.text_model(**tokens).pooler_output).float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


def clip_cosine(model, processor, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """Cosine similarity `[B]` of each image's CLIP embedding with its prompt's."""
    return (clip_image_embeds(model, processor, images) * clip_text_embeds(model, processor, prompts)).sum(-1)


class _CLIPReward(RewardModel):
    """A reward on a transformers CLIP model; `load` returns `(model, processor)`. `processor_checkpoint` defaults to
    `default_processor_checkpoint`, or to the model's own checkpoint when the class sets none."""

    default_checkpoint = "openai/clip-vit-large-patch14"
    default_processor_checkpoint: str | None = None

    def __init__(self, checkpoint: str | None = None, processor_checkpoint: str | None = None, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.processor_checkpoint = processor_checkpoint or self.default_processor_checkpoint or self.checkpoint

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.processor_checkpoint)

    def load(self) -> tuple:
        return load_clip(self.checkpoint, self.processor_checkpoint, self.device, self.dtype)


@register_reward("clip_score")
class CLIPScore(_CLIPReward):
    """CLIP score: the cosine similarity of the CLIP image and prompt embeddings,
    `R = <e_img / |e_img|, e_txt / |e_txt|>` in [-1, 1] (`logits_per_image / 100` for the released CLIPs; matching
    image-prompt pairs score about 0.2-0.35 on ViT-L/14). Default model: `openai/clip-vit-large-patch14`.
    """

    def score(self, models, images, prompts, **columns) -> list[float]:
        return clip_cosine(*models, images, prompts).tolist()


@register_reward("pickscore")
class PickScore(_CLIPReward):
    """PickScore v1 (Kirstain et al., 2023), a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences:
    `R = exp(logit_scale) * cos(e_img, e_txt) / 26`, as in flow_grpo's scorer: the raw score is about 20-23 on
    generated images, so typical values are about 0.8-0.9. Default model `yuvalkirstain/PickScore_v1` with the
    processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (`processor_checkpoint`).
    """

    default_checkpoint = "yuvalkirstain/PickScore_v1"
    default_processor_checkpoint = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def score(self, models, images, prompts, **columns) -> list[float]:
        model, processor = models
        return (model.logit_scale.exp().float() * clip_cosine(model, processor, images, prompts) / 26).tolist()


def preference_mlp(input_size: int) -> nn.Sequential:
    """The scoring head shared by ImageReward and the LAION improved aesthetic predictor: linear layers
    `input_size`-1024-128-64-16-1 with dropout and no activations, as released (indices included, so released state
    dicts load unchanged)."""
    return nn.Sequential(
        nn.Linear(input_size, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class AestheticMLP(nn.Module):
    """The head of the LAION improved aesthetic predictor, with the key layout of its state dicts
    (`layers.0.weight`, ...)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = preference_mlp(input_size)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


@register_reward("aesthetic")
class AestheticScore(_CLIPReward):
    """LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor,
    `sac+logos+ava1-l14-linearMSE.pth`): an MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained to predict
    the mean human rating on a 1-10 scale (most images score 4-7). The prompt is not used, as in DDPO.

    `checkpoint` is the CLIP (default `openai/clip-vit-large-patch14`, shared with `clip_score`); `head_checkpoint`
    is a Hub repository holding `sac+logos+ava1-l14-linearMSE.pth` (default `camenduru/improved-aesthetic-predictor`),
    a local folder holding it, or a local state-dict file of any name (e.g. `aesthetic-model.pth` of
    `trl-lib/ddpo-aesthetic-predictor`). The head's input size follows the CLIP's projection dim.
    """

    default_head_checkpoint = "camenduru/improved-aesthetic-predictor"
    head_filename = "sac+logos+ava1-l14-linearMSE.pth"

    def __init__(self, checkpoint: str | None = None, head_checkpoint: str | None = None, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.head_checkpoint = head_checkpoint or self.default_head_checkpoint

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.head_checkpoint)

    def load(self) -> tuple:
        model, processor = super().load()
        head = AestheticMLP(model.config.projection_dim)
        path = resolve_file(self.head_checkpoint, "Aesthetic head", self.head_filename)
        head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model, processor, head.to(self.device, self.dtype).eval()

    def score(self, models, images, prompts, **columns) -> list[float]:
        model, processor, head = models
        embeds = clip_image_embeds(model, processor, images).to(self.dtype)
        return head(embeds).squeeze(-1).float().tolist()


@register_reward("hpsv2")
class HPSv2(RewardModel):
    """Human Preference Score v2.1 (Wu et al., 2023): an open_clip ViT-H/14 fine-tuned on HPD v2 human preferences;
    `R = <f_img / |f_img|, f_txt / |f_txt|>`, the diagonal of `image_features @ text_features.T` in
    tgxs002/HPSv2's `img_score.py` (about 0.2-0.35 on real images). Images are preprocessed as HPSv2 does (see
    `hpsv2_pixels`): bicubic resize of the longer side to the model's size, zero padding to a square, CLIP
    normalisation.

    `checkpoint`: a Hub repository holding `HPS_v2.1_compressed.pt` (default `xswu/HPSv2`), a local folder holding
    it, or a local `.pt` file (a dict with the open_clip state dict under `"state_dict"`). `model_name`: the open_clip
    architecture (default `"ViT-H-14"`). Needs open_clip: `pip install "trl-nft[hpsv2]"`.
    """

    default_checkpoint = "xswu/HPSv2"
    filename = "HPS_v2.1_compressed.pt"

    def __init__(self, checkpoint: str | None = None, model_name: str = "ViT-H-14", **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.model_name = model_name

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.model_name)

    def load(self) -> tuple:
        try:
            import open_clip
        except ImportError as error:
            raise ImportError('The "hpsv2" reward needs open_clip: pip install "trl-nft[hpsv2]"') from error

        path = resolve_file(self.checkpoint, "HPSv2", self.filename)
        # open_clip's own loader reads {"state_dict": ...} checkpoints as released by HPSv2.
        model = open_clip.create_model(self.model_name, pretrained=path, device=self.device)
        model = model.to(dtype=self.dtype).eval()
        config = open_clip.get_model_preprocess_cfg(model)
        height, width = config["size"]
        if height != width:
            raise ValueError(f"hpsv2: HPSv2 pads images to a square; {self.model_name!r} takes {height} x {width}.")
        return model, open_clip.get_tokenizer(self.model_name), (height, config["mean"], config["std"])

    def score(self, models, images, prompts, **columns) -> list[float]:
        model, tokenizer, preprocessing = models
        pixels = torch.stack([hpsv2_pixels(image, *preprocessing) for image in images]).to(self.device, self.dtype)
        image_features = model.encode_image(pixels, normalize=True).float()
        text_features = model.encode_text(tokenizer(prompts).to(self.device), normalize=True).float()
        return (image_features * text_features).sum(-1).tolist()
