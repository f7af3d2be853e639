"""CLIP-based rewards (clip_score, pickscore, aesthetic, hpsv2) on tiny random models loaded by their real loaders."""

import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from reward_models import save_tiny_aesthetic_head, save_tiny_clip, save_tiny_hpsv2
from transformers import CLIPModel, CLIPProcessor

from trl_nft import DiffusionNFTTrainer, get_reward


PROMPTS = ["a red cube", "two dogs on a beach", "a very long prompt " * 20, "a red cube"]


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


def clip_forward(path: str, images, prompts):
    """The tiny CLIP's own forward pass on processor inputs: normalised embeddings and logits."""
    model = CLIPModel.from_pretrained(path).eval()
    inputs = CLIPProcessor.from_pretrained(path)(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model, model(**inputs)


def test_clip_score_is_the_cosine_similarity_of_the_embeddings(make_reward, tiny_clip):
    images = random_images(4, size=64)
    model, outputs = clip_forward(tiny_clip, images, PROMPTS[:2] * 2)
    expected = outputs.logits_per_image.diagonal() / model.logit_scale.exp()
    rewards = make_reward("clip_score")(images, PROMPTS[:2] * 2)
    torch.testing.assert_close(torch.tensor(rewards), expected, rtol=1e-4, atol=1e-5)
    assert all(-1 <= reward <= 1 for reward in rewards)


def test_pickscore_is_the_scaled_logit_over_26(make_reward, tiny_clip):
    images = random_images(4, size=64)
    _, outputs = clip_forward(tiny_clip, images, PROMPTS[:2] * 2)
    rewards = make_reward("pickscore")(images, PROMPTS[:2] * 2)
    torch.testing.assert_close(torch.tensor(rewards), outputs.logits_per_image.diagonal() / 26, rtol=1e-4, atol=1e-5)


def test_aesthetic_is_the_released_mlp_on_the_normalised_image_embedding(make_reward, tiny_clip, aesthetic_head):
    images = random_images(4, size=64)
    _, outputs = clip_forward(tiny_clip, images, ["unused"] * 4)
    state = torch.load(os.path.join(aesthetic_head, "sac+logos+ava1-l14-linearMSE.pth"), weights_only=True)
    hidden = outputs.image_embeds  # L2-normalised by CLIPModel
    for index in [0, 2, 4, 6, 7]:  # five linear layers, no activations; dropout is off in eval
        hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    rewards = make_reward("aesthetic")(images, PROMPTS)
    torch.testing.assert_close(torch.tensor(rewards), hidden[:, 0], rtol=1e-4, atol=1e-6)


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
