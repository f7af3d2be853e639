"""ImageReward: the released checkpoint layout loads into transformers' BLIP, and scores match the original model."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer

from trl_nft import DiffusionNFTTrainer, get_reward
from trl_nft.rewards.image_reward import ImageRewardModel


# A tiny ImageReward: ViT of width 128 (two 64-dim heads, as BLIP's ViT), 16 px patches on 32 px images, two blocks;
# BERT of width 32 with 4 heads and two layers; the MLP keeps its original 1024-128-64-16-1 sizes.
VISION_WIDTH, VISION_LAYERS, VISION_HEADS, PATCH, IMAGE_SIZE = 128, 2, 2, 16, 32
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, TEXT_FFN, TEXT_POSITIONS = 32, 2, 4, 64, 40
WORDS = ["a", "photo", "of", "object", "number", "red", "cat", "dog", "blue"] + list("0123456789")
WORDS += ["##" + digit for digit in "0123456789"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.mean / ImageReward.std in THUDM/ImageReward


def original_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of `ImageReward.state_dict()` in THUDM/ImageReward (BLIP_Pretrain + MLP)."""
    d, h = VISION_WIDTH, TEXT_WIDTH
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, d),
        "blip.visual_encoder.pos_embed": (1, (IMAGE_SIZE // PATCH) ** 2 + 1, d),
        "blip.visual_encoder.patch_embed.proj.weight": (d, 3, PATCH, PATCH),
        "blip.visual_encoder.patch_embed.proj.bias": (d,),
        "blip.visual_encoder.norm.weight": (d,),
        "blip.visual_encoder.norm.bias": (d,),
    }
    for i in range(VISION_LAYERS):
        block = f"blip.visual_encoder.blocks.{i}."
        for name, shape in [
            ("norm1", (d,)),
            ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)),
            ("norm2", (d,)),
            ("mlp.fc1", (4 * d, d)),
            ("mlp.fc2", (d, 4 * d)),
        ]:
            shapes[block + name + ".weight"] = shape
            shapes[block + name + ".bias"] = shape[:1]
    text = "blip.text_encoder."
    shapes[text + "embeddings.word_embeddings.weight"] = (vocab_size, h)
    shapes[text + "embeddings.position_embeddings.weight"] = (TEXT_POSITIONS, h)
    shapes[text + "embeddings.LayerNorm.weight"] = shapes[text + "embeddings.LayerNorm.bias"] = (h,)
    for i in range(TEXT_LAYERS):
        layer = f"{text}encoder.layer.{i}."
        for name, shape in [
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("attention.output.LayerNorm", (h,)),
            ("crossattention.self.query", (h, h)),
            ("crossattention.self.key", (h, d)),  # encoder_width = vision width
            ("crossattention.self.value", (h, d)),
            ("crossattention.output.dense", (h, h)),
            ("crossattention.output.LayerNorm", (h,)),
            ("intermediate.dense", (TEXT_FFN, h)),
            ("output.dense", (h, TEXT_FFN)),
            ("output.LayerNorm", (h,)),
        ]:
            shapes[layer + name + ".weight"] = shape
            shapes[layer + name + ".bias"] = shape[:1]
    for name, shape in [("blip.vision_proj", (256, d)), ("blip.text_proj", (256, h))]:  # unused by the score
        shapes[name + ".weight"], shapes[name + ".bias"] = shape, shape[:1]
    for index, (fan_out, fan_in) in zip(
        [0, 2, 4, 6, 7], [(1024, h), (128, 1024), (64, 128), (16, 64), (1, 16)], strict=True
    ):
        shapes[f"mlp.layers.{index}.weight"], shapes[f"mlp.layers.{index}.bias"] = (fan_out, fan_in), (fan_out,)
    return shapes


def make_original_state_dict(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for key, shape in original_shapes(vocab_size).items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in key.lower() and key.endswith("weight"):
            state_dict[key] = 1 + 0.2 * noise
        elif len(shape) >= 2:
            state_dict[key] = noise / math.sqrt(shape[-1])
        else:
            state_dict[key] = 0.2 * noise
    # BLIP's BertEmbeddings saves its position ids as a (persistent) buffer.
    state_dict["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT_POSITIONS)[None]
    return state_dict


def original_tokenizer() -> BertTokenizer:
    """BLIP's `init_tokenizer`, on the tiny vocabulary."""
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder in the released layout (`ImageReward.pt` + `med_config.json`) and a BERT tokenizer folder."""
    root = tmp_path_factory.mktemp("image_reward")
    tokenizer_folder = root / "tokenizer"
    tokenizer_folder.mkdir()
    (tokenizer_folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    vocab_size = len(original_tokenizer())  # the vocabulary plus [DEC] and [ENC]
    model_folder = root / "model"
    model_folder.mkdir()
    state_dict = make_original_state_dict(vocab_size)
    torch.save(state_dict, model_folder / "ImageReward.pt")
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TEXT_WIDTH,
        "initializer_range": 0.02,
        "intermediate_size": TEXT_FFN,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": TEXT_POSITIONS,
        "model_type": "bert",
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,  # as released: BLIP_Pretrain overrides it with the ViT's width
        "add_cross_attention": True,
    }
    (model_folder / "med_config.json").write_text(json.dumps(med_config))
    return {"model": model_folder, "tokenizer": tokenizer_folder, "state_dict": state_dict, "med_config": med_config}


def make_reward(checkpoint, **options):
    return get_reward(
        "image_reward", checkpoint=str(checkpoint["model"]), tokenizer=str(checkpoint["tokenizer"]), **options
    )


def random_images(sizes, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for width, height in sizes]


def reference_scores(state_dict, tokenizer, images, prompts) -> torch.Tensor:
    """ImageReward.score written out from THUDM/ImageReward (BLIP's ViT and med.py BERT) on the original key names."""
    from torchvision import transforms

    preprocess = transforms.Compose(
        [
            transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMAGE_SIZE),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    pixels = torch.stack([preprocess(image) for image in images])
    batch = len(images)

    def vit(name):
        return state_dict["blip.visual_encoder." + name]

    x = F.conv2d(pixels, vit("patch_embed.proj.weight"), vit("patch_embed.proj.bias"), stride=PATCH)
    x = torch.cat([vit("cls_token").expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + vit("pos_embed")
    for i in range(VISION_LAYERS):
        block = f"blocks.{i}."
        y = F.layer_norm(x, (VISION_WIDTH,), vit(block + "norm1.weight"), vit(block + "norm1.bias"), eps=1e-6)
        qkv = F.linear(y, vit(block + "attn.qkv.weight"), vit(block + "attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, -1, 3, VISION_HEADS, VISION_WIDTH // VISION_HEADS).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (VISION_WIDTH // VISION_HEADS) ** -0.5).softmax(-1)
        y = (attention @ v).transpose(1, 2).reshape(batch, -1, VISION_WIDTH)
        x = x + F.linear(y, vit(block + "attn.proj.weight"), vit(block + "attn.proj.bias"))
        y = F.layer_norm(x, (VISION_WIDTH,), vit(block + "norm2.weight"), vit(block + "norm2.bias"), eps=1e-6)
        y = F.gelu(F.linear(y, vit(block + "mlp.fc1.weight"), vit(block + "mlp.fc1.bias")))
        x = x + F.linear(y, vit(block + "mlp.fc2.weight"), vit(block + "mlp.fc2.bias"))
    image_embeds = F.layer_norm(x, (VISION_WIDTH,), vit("norm.weight"), vit("norm.bias"), eps=1e-6)

    def bert(name):
        return state_dict["blip.text_encoder." + name]

    def dense(x, name):
        return F.linear(x, bert(name + ".weight"), bert(name + ".bias"))

    def layer_norm(x, name):
        return F.layer_norm(x, (TEXT_WIDTH,), bert(name + ".weight"), bert(name + ".bias"), eps=1e-12)

    def attention_block(x, context, prefix, additive_mask):
        def heads(y):
            return y.reshape(batch, -1, TEXT_HEADS, TEXT_WIDTH // TEXT_HEADS).transpose(1, 2)

        q = heads(dense(x, prefix + "self.query"))
        k, v = heads(dense(context, prefix + "self.key")), heads(dense(context, prefix + "self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(TEXT_WIDTH // TEXT_HEADS) + additive_mask
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, TEXT_WIDTH)
        return layer_norm(dense(y, prefix + "output.dense") + x, prefix + "output.LayerNorm")

    text = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    x = bert("embeddings.word_embeddings.weight")[text.input_ids] + bert("embeddings.position_embeddings.weight")[:35]
    x = layer_norm(x, "embeddings.LayerNorm")
    self_mask = (1.0 - text.attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    image_mask = torch.zeros(())  # image_atts are all ones
    for i in range(TEXT_LAYERS):
        layer = f"encoder.layer.{i}."
        x = attention_block(x, x, layer + "attention.", self_mask)
        x = attention_block(x, image_embeds, layer + "crossattention.", image_mask)
        y = F.gelu(dense(x, layer + "intermediate.dense"))
        x = layer_norm(dense(y, layer + "output.dense") + x, layer + "output.LayerNorm")
    features = x[:, 0]
    for index in [0, 2, 4, 6, 7]:
        features = F.linear(features, state_dict[f"mlp.layers.{index}.weight"], state_dict[f"mlp.layers.{index}.bias"])
    return (features.squeeze(-1) - MEAN) / STD


def test_every_checkpoint_tensor_is_used_and_every_weight_loaded(checkpoint):
    model, _ = make_reward(checkpoint).load()
    unused = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"}
    unused.add("blip.text_encoder.embeddings.position_ids")
    used = {key: value for key, value in checkpoint["state_dict"].items() if key not in unused}
    parameters = dict(model.state_dict())
    assert sum(value.numel() for value in parameters.values()) == sum(value.numel() for value in used.values())
    # Each loaded tensor is one of the checkpoint's (all random, so equality identifies it).
    remaining = list(used.values())
    for name, value in parameters.items():
        match = next(
            (i for i, other in enumerate(remaining) if other.shape == value.shape and torch.equal(other, value)), None
        )
        assert match is not None, f"{name} holds no checkpoint tensor"
        remaining.pop(match)
    assert not remaining


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
            "crossattention.self.key",
        ),
        (lambda sd: sd.pop("blip.visual_encoder.blocks.1.attn.proj.bias"), "layers.1.self_attn.projection.bias"),
        (lambda sd: sd.pop("mlp.layers.7.bias"), "7.bias"),
        (lambda sd: sd.update({"blip.itm_head.weight": torch.zeros(2, TEXT_WIDTH)}), "blip.itm_head.weight"),
        (lambda sd: sd.update({"blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(1)}), "ls1.gamma"),
    ],
)
def test_missing_or_unexpected_keys_are_errors(checkpoint, edit, message):
    state_dict = dict(checkpoint["state_dict"])
    edit(state_dict)
    with pytest.raises(ValueError, match=message):
        ImageRewardModel.from_original(state_dict, checkpoint["med_config"])


def test_scores_match_the_original_computation(checkpoint):
    pytest.importorskip("torchvision")
    # Sizes that need a resize (shorter side to 32) and a crop, one with a half-pixel offset, and one already 32 x 32.
    images = random_images([(48, 40), (40, 57), (32, 32), (90, 64)])
    prompts = ["a photo of a red cat", "a blue dog", "object number 12", "a photo of " + "cat " * 40]
    scores = make_reward(checkpoint)(images, prompts)
    expected = reference_scores(checkpoint["state_dict"], original_tokenizer(), images, prompts)
    assert all(isinstance(score, float) for score in scores)
    # Tight enough to tell a LayerNorm eps of 1e-5 from BLIP's 1e-6 (about 1e-5 apart here).
    torch.testing.assert_close(torch.tensor(scores), expected, atol=2e-6, rtol=0)
    assert len(set(np.round(scores, 4))) == len(scores)  # not a constant


def test_scores_do_not_depend_on_the_batch_size(checkpoint):
    images = random_images([(32, 32)] * 5, seed=1)
    prompts = ["a photo of a cat", "a dog", "a photo of a cat", "blue", "a red dog"]
    one_by_one = make_reward(checkpoint, batch_size=1)(images, prompts)
    batched = make_reward(checkpoint, batch_size=4)(images, prompts)
    torch.testing.assert_close(torch.tensor(one_by_one), torch.tensor(batched), atol=1e-5, rtol=1e-5)
    assert one_by_one[0] != one_by_one[2]  # same prompt, different image


def test_a_checkpoint_file_reads_the_config_beside_it(checkpoint, tmp_path):
    images, prompts = random_images([(32, 32)] * 2, seed=2), ["a cat", "a dog"]
    from_file = get_reward(
        "image_reward", checkpoint=str(checkpoint["model"] / "ImageReward.pt"), tokenizer=str(checkpoint["tokenizer"])
    )
    assert from_file(images, prompts) == make_reward(checkpoint)(images, prompts)
    shutil.copy(checkpoint["model"] / "ImageReward.pt", tmp_path / "weights.pt")
    alone = get_reward("image_reward", checkpoint=str(tmp_path / "weights.pt"), tokenizer=str(checkpoint["tokenizer"]))
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        alone(images, prompts)


def test_a_missing_local_checkpoint_is_named(checkpoint, tmp_path):
    missing = str(tmp_path / "no_such_folder")
    reward = get_reward("image_reward", checkpoint=missing, tokenizer=str(checkpoint["tokenizer"]))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        reward(random_images([(32, 32)]), ["a cat"])


def test_trains_one_step_with_image_reward(checkpoint, make_config, prompts_dataset):
    config = make_config(max_steps=1, per_device_train_batch_size=4, num_generations=4, num_inference_steps=2)
    trainer = DiffusionNFTTrainer("tiny-sd3", make_reward(checkpoint), args=config, train_dataset=prompts_dataset)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert math.isfinite(log["rewards/image_reward/mean"]) and math.isfinite(log["loss"])
