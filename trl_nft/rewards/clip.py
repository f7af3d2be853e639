"""CLIP-based rewards: CLIP score, the LAION aesthetic predictor, PickScore and HPS v2.1.

`clip_score`, `aesthetic` and `pickscore` run a transformers `CLIPModel` (shared by `load_clip` when two rewards name
the same checkpoint); `hpsv2` runs an open_clip model (the `hpsv2` extra).
"""

import functools

import torch
from PIL import Image
from torch import nn

from . import register_reward
from .base import RewardModel, resolve_checkpoint, resolve_file


@functools.cache
def load_clip(checkpoint: str, processor_checkpoint: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """A transformers `(CLIPModel, CLIPProcessor)` in eval mode on `device` in `dtype`, loaded once per process for
    each argument tuple, so that rewards on the same checkpoint share one copy of the weights. Only called from a
    reward's `load`, which `load_once` serialises."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(resolve_checkpoint(checkpoint, "CLIP"), dtype=dtype)
    processor = AutoProcessor.from_pretrained(resolve_checkpoint(processor_checkpoint, "CLIP processor"))
    return model.to(device).eval(), processor


def clip_image_embeds(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised CLIP image embeddings `[B, projection_dim]` in float32."""
    pixels = processor.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    pixels = pixels["pixel_values"].to(model.device, model.dtype)
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
    tgxs002/HPSv2's `img_score.py` (about 0.2-0.35 on real images). Images are preprocessed as HPSv2 does: to tensor,
    bicubic resize of the shorter side, center crop, CLIP normalisation.

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
        from torchvision import transforms

        path = resolve_file(self.checkpoint, "HPSv2", self.filename)
        # open_clip's own loader reads {"state_dict": ...} checkpoints as released by HPSv2.
        model = open_clip.create_model(self.model_name, pretrained=path, device=self.device)
        model = model.to(dtype=self.dtype).eval()
        config = open_clip.get_model_preprocess_cfg(model)
        preprocess = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Resize(min(config["size"]), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(config["size"]),
                transforms.Normalize(config["mean"], config["std"]),
            ]
        )
        return model, open_clip.get_tokenizer(self.model_name), preprocess

    def score(self, models, images, prompts, **columns) -> list[float]:
        model, tokenizer, preprocess = models
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in images]).to(self.device, self.dtype)
        image_features = model.encode_image(pixels, normalize=True).float()
        text_features = model.encode_text(tokenizer(prompts).to(self.device), normalize=True).float()
        return (image_features * text_features).sum(-1).tolist()
