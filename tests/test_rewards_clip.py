"""CLIP-based rewards (clip_score, pickscore, aesthetic, hpsv2) on tiny random models loaded by their real loaders."""

import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from reward_models import TINY_CLIP_IMAGE_SIZE, save_tiny_aesthetic_head, save_tiny_clip, save_tiny_hpsv2
from transformers import CLIPModel, CLIPProcessor

from trl_nft import DiffusionNFTTrainer, get_reward


PROMPTS = ["a red cube", "two dogs on a beach", "a very long prompt " * 20, "a red cube"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory) -> str:
    """A folder holding the head under its released file name."""
    folder = tmp_path_factory.mktemp("aesthetic")
    save_tiny_aesthetic_head(folder / "sac+logos+ava1-l14-linearMSE.pth")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_hpsv2(tmp_path_factory) -> tuple[str, str]:
    return save_tiny_hpsv2(tmp_path_factory.mktemp("hpsv2"))


@pytest.fixture
def make_reward(tiny_clip, aesthetic_head, tiny_hpsv2):
    def make(name: str, **options):
        defaults = {
            "clip_score": dict(checkpoint=tiny_clip),
            "pickscore": dict(checkpoint=tiny_clip, processor_checkpoint=tiny_clip),
            "aesthetic": dict(checkpoint=tiny_clip, head_checkpoint=aesthetic_head),
            "hpsv2": dict(checkpoint=tiny_hpsv2[0], model_name=tiny_hpsv2[1]),
        }[name]
        return get_reward(name, **{**defaults, **options})

    return make


def random_images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def varied_images() -> list[Image.Image]:
    """Non-square RGB images in both orientations (the resized long sides 48 and 71 leave odd margins to crop, where
    rounding the offset down and to nearest differ), an image whose longer side is already 32 px, and L, RGBA (varying
    alpha) and P images."""
    rng = np.random.default_rng(1)

    def noise(width, height, channels=3):
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()

    rgb = [Image.fromarray(noise(width, height)) for width, height in [(300, 200), (200, 300), (224, 100), (32, 10)]]
    return rgb + [
        Image.fromarray(noise(45, 64, 1), mode="L"),
        Image.fromarray(noise(64, 40, 4), mode="RGBA"),
        Image.fromarray(noise(50, 70)).quantize(colors=16),
    ]


def transformers4_clip_pixels(image: Image.Image, size: int = TINY_CLIP_IMAGE_SIZE) -> torch.Tensor:
    """transformers 4's `CLIPImageProcessor.preprocess` (the PIL one, before transformers 5) with the tiny CLIP's
    settings, written out: `convert_to_rgb` (PIL's `convert("RGB")`), to a uint8 HWC array, `resize` to
    `get_resize_output_image_size(shortest_edge, default_to_square=False)` through a PIL image (bicubic),
    `center_crop` by slicing at `(dim - size) // 2`, `rescale` (uint8 * 1/255 in float64, then float32), `normalize`
    in float32, channels first."""
    array = np.array(image.convert("RGB"))
    height, width = array.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_height, new_width = (new_long, new_short) if width <= height else (new_short, new_long)
    array = np.array(Image.fromarray(array).resize((new_width, new_height), resample=Image.BICUBIC))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    array = array[top : top + size, left : left + size]
    array = (array * (1 / 255)).astype(np.float32)
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def hpsv2_reference_pixels(image: Image.Image, size: int = TINY_CLIP_IMAGE_SIZE) -> torch.Tensor:
    """HPSv2's evaluation transform (`hpsv2/src/open_clip/transform.py`, `resize_longest_max=True`) in torchvision:
    RGB, `ToTensor`, `ResizeMaxSize` (bicubic resize of the tensor to `round(side * size / long)`, zero padding
    `[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]`), `Normalize`. Two departures, where HPSv2
    itself fails: RGBA is converted to RGB (HPSv2 keeps the alpha channel), and an image whose longer side is already
    `size` is padded (HPSv2 skips the padding with the resize)."""
    from torchvision.transforms import InterpolationMode, Normalize, ToTensor
    from torchvision.transforms import functional as TF

    pixels = ToTensor()(image.convert("RGB"))
    height, width = pixels.shape[1:]
    scale = size / float(max(height, width))
    new_size = [round(height * scale), round(width * scale)]
    if scale != 1.0:
        pixels = TF.resize(pixels, new_size, InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_size[0], size - new_size[1]
    pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return Normalize(CLIP_MEAN, CLIP_STD)(pixels)


def record_pixel_values(module: torch.nn.Module) -> list[torch.Tensor]:
    """The pixel values `module` (a vision tower) receives from now on, one tensor per call."""
    received = []

    def hook(_, args, kwargs):
        received.append((kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]).detach().clone())

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return received


def clip_forward(path: str, images, prompts):
    """The tiny CLIP's own forward pass on transformers 4's pixel values: normalised embeddings and logits."""
    model = CLIPModel.from_pretrained(path).eval()
    text = CLIPProcessor.from_pretrained(path).tokenizer(prompts, padding=True, return_tensors="pt")
    pixel_values = torch.stack([transformers4_clip_pixels(image) for image in images])
    with torch.no_grad():
        return model, model(**text, pixel_values=pixel_values)


def test_clip_score_is_the_cosine_similarity_of_the_embeddings(make_reward, tiny_clip):
    images = random_images(4, size=64) + varied_images()
    prompts = (PROMPTS[:2] * 6)[: len(images)]
    model, outputs = clip_forward(tiny_clip, images, prompts)
    expected = outputs.logits_per_image.diagonal() / model.logit_scale.exp()
    rewards = make_reward("clip_score")(images, prompts)
    torch.testing.assert_close(torch.tensor(rewards), expected, rtol=0, atol=1e-6)
    assert all(-1 <= reward <= 1 for reward in rewards)


def test_pickscore_is_the_scaled_logit_over_26(make_reward, tiny_clip):
    images = random_images(4, size=64) + varied_images()
    prompts = (PROMPTS[:2] * 6)[: len(images)]
    _, outputs = clip_forward(tiny_clip, images, prompts)
    rewards = make_reward("pickscore")(images, prompts)
    torch.testing.assert_close(torch.tensor(rewards), outputs.logits_per_image.diagonal() / 26, rtol=0, atol=1e-6)


def test_aesthetic_is_the_released_mlp_on_the_normalised_image_embedding(make_reward, tiny_clip, aesthetic_head):
    images = random_images(4, size=64) + varied_images()
    _, outputs = clip_forward(tiny_clip, images, ["unused"] * len(images))
    state = torch.load(os.path.join(aesthetic_head, "sac+logos+ava1-l14-linearMSE.pth"), weights_only=True)
    hidden = outputs.image_embeds  # L2-normalised by CLIPModel
    for index in [0, 2, 4, 6, 7]:  # five linear layers, no activations; dropout is off in eval
        hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    rewards = make_reward("aesthetic")(images, (PROMPTS * 3)[: len(images)])
    torch.testing.assert_close(torch.tensor(rewards), hidden[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic"])
def test_clip_rewards_preprocess_as_the_transformers_4_clip_processor(make_reward, name):
    reward = make_reward(name)
    images = varied_images()
    reward(images[:1], PROMPTS[:1])  # loads the model
    received = record_pixel_values(reward._models[0].vision_model)
    reward(images, (PROMPTS * 2)[: len(images)])
    expected = torch.stack([transformers4_clip_pixels(image) for image in images])
    torch.testing.assert_close(torch.cat(received), expected, rtol=0, atol=1e-6)


def test_a_processor_not_configured_as_clip_is_an_error_naming_it(make_reward, tiny_clip, tmp_path):
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    processor.image_processor.do_center_crop = False
    processor.save_pretrained(tmp_path)
    reward = make_reward("clip_score", processor_checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*do_center_crop=False"):
        reward(random_images(1), PROMPTS[:1])


def test_aesthetic_head_loads_from_a_file_of_any_name(make_reward, aesthetic_head, tmp_path):
    renamed = tmp_path / "aesthetic-model.pth"
    os.link(os.path.join(aesthetic_head, "sac+logos+ava1-l14-linearMSE.pth"), renamed)
    images = random_images(2)
    assert make_reward("aesthetic", head_checkpoint=str(renamed))(images, PROMPTS[:2]) == make_reward("aesthetic")(
        images, PROMPTS[:2]
    )


def test_hpsv2_is_the_dot_product_of_the_normalised_open_clip_features(make_reward, tiny_hpsv2):
    import open_clip

    folder, model_name = tiny_hpsv2
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.load_state_dict(torch.load(os.path.join(folder, "HPS_v2.1_compressed.pt"), weights_only=True)["state_dict"])
    model.eval()
    images = random_images(4)  # at the model's resolution, so that resizing is the identity in both pipelines
    with torch.no_grad():
        outputs = model(
            torch.stack([preprocess(image) for image in images]), open_clip.get_tokenizer(model_name)(PROMPTS)
        )
    image_features, text_features = outputs[:2]  # normalised by open_clip's forward
    rewards = make_reward("hpsv2")(images, PROMPTS)
    torch.testing.assert_close(
        torch.tensor(rewards), (image_features @ text_features.T).diagonal(), rtol=1e-4, atol=1e-5
    )


def test_hpsv2_resizes_the_longer_side_and_pads_as_hpsv2(make_reward, tiny_hpsv2):
    import open_clip

    folder, model_name = tiny_hpsv2
    images = varied_images()
    prompts = (PROMPTS * 2)[: len(images)]
    reward = make_reward("hpsv2")
    reward(images[:1], prompts[:1])  # loads the model
    received = record_pixel_values(reward._models[0].visual)
    rewards = reward(images, prompts)
    pixels, expected = torch.cat(received), torch.stack([hpsv2_reference_pixels(image) for image in images])
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    # 300 x 200 is resized to 32 x round(21.33) = 21 rows, and padded with 5 rows above and 6 below, black before
    # the normalisation: (0 - mean) / std.
    black = ((0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None]
    torch.testing.assert_close(torch.cat([pixels[0, :, :5], pixels[0, :, -6:]], dim=1), black.expand(3, 11, 32))
    assert not torch.allclose(pixels[0, :, 5], black[:, 0].expand(3, 32))
    # The scores are HPSv2's on those pixels.
    model = open_clip.create_model(model_name)
    model.load_state_dict(torch.load(os.path.join(folder, "HPS_v2.1_compressed.pt"), weights_only=True)["state_dict"])
    with torch.no_grad():
        image_features, text_features = model.eval()(expected, open_clip.get_tokenizer(model_name)(prompts))[:2]
    torch.testing.assert_close(torch.tensor(rewards), (image_features @ text_features.T).diagonal(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic", "hpsv2"])
def test_batching_and_bfloat16(make_reward, name):
    images = random_images(5, size=64)
    prompts = PROMPTS + ["a blue sphere"]
    one_by_one = make_reward(name, batch_size=1)(images, prompts)
    batched = make_reward(name, batch_size=16)(images, prompts)
    torch.testing.assert_close(torch.tensor(one_by_one), torch.tensor(batched), rtol=1e-4, atol=1e-5)
    # The same image and prompt score the same wherever they sit in the batch.
    assert one_by_one[0] == pytest.approx(make_reward(name)(images[:1] * 3, prompts[:1] * 3)[2], rel=1e-4, abs=1e-5)
    low_precision = make_reward(name).to(dtype=torch.bfloat16)(images, prompts)
    assert all(math.isfinite(value) for value in low_precision)
    torch.testing.assert_close(torch.tensor(low_precision), torch.tensor(batched), rtol=0.05, atol=0.02)


def test_clip_score_and_aesthetic_share_the_clip_weights(make_reward):
    clip_score, aesthetic = make_reward("clip_score"), make_reward("aesthetic")
    clip_score(random_images(1), PROMPTS[:1])
    aesthetic(random_images(1), PROMPTS[:1])
    assert clip_score._models[0] is aesthetic._models[0]


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic", "hpsv2"])
def test_trains_one_step_on_tiny_sd3(make_reward, make_config, prompts_dataset, name):
    config = make_config(max_steps=1, num_inference_steps=2)
    trainer = DiffusionNFTTrainer("tiny-sd3", make_reward(name), args=config, train_dataset=prompts_dataset)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert math.isfinite(log[f"rewards/{name}/mean"])


@pytest.mark.parametrize(
    "name, option",
    [
        ("clip_score", "checkpoint"),
        ("pickscore", "processor_checkpoint"),
        ("aesthetic", "head_checkpoint"),
        ("hpsv2", "checkpoint"),
    ],
)
def test_a_missing_local_checkpoint_is_named_in_the_error(make_reward, tmp_path, name, option):
    missing = str(tmp_path / "no" / "such" / "checkpoint")
    reward = make_reward(name, **{option: missing})
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        reward(random_images(1), PROMPTS[:1])
