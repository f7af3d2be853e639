"""The `digits-sd3` benchmark: the shipped model and rewards load through their real loaders and read real digits."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from trl_nft.models import load_pipeline
from trl_nft.prompts.digits import digit_prompt, digit_prompts
from trl_nft.rewards import get_reward


def _real_test_digits() -> tuple[list[Image.Image], list[int]]:
    """The held-out real digits (never trained on by the builder), rendered as the model's 16 x 16 RGB images."""
    pytest.importorskip("sklearn")
    from trl_nft.embedded.digits_sd3 import load_digit_images

    images, labels = load_digit_images()["test"]
    array = (images[:, 0].numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a).convert("RGB") for a in array], labels.tolist()


def test_rewards_read_real_held_out_digits():
    images, labels = _real_test_digits()
    prompts = [digit_prompt(d) for d in labels]
    accuracy = get_reward("digit_accuracy")
    judge = get_reward("digit_judge")
    probabilities = accuracy(images, prompts, digit=labels)
    assert np.mean(probabilities) > 0.9
    assert np.mean(judge(images, prompts, digit=labels)) > 0.9
    # Without a `digit` column the prompt says which digit; a wrong prompt scores low under both.
    assert accuracy(images[:20], prompts[:20]) == pytest.approx(probabilities[:20], abs=1e-6)
    wrong = [digit_prompt((d + 1) % 10) for d in labels]
    assert np.mean(accuracy(images, wrong)) < 0.1
    assert np.mean(judge(images, wrong)) < 0.1
    assert accuracy(images[:2], ["a photo of a cat"] * 2) == [None, None]


def test_digits_sd3_loads_and_generates_16px_images():
    pipeline = load_pipeline("digits-sd3")
    assert isinstance(pipeline, StableDiffusion3Pipeline)
    assert pipeline.default_sample_size * pipeline.vae_scale_factor == 16
    images = pipeline(
        [digit_prompt(3), digit_prompt(7)],
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert [image.size for image in images] == [(16, 16), (16, 16)]
    dataset = digit_prompts(2)
    assert dataset["digit"] == list(range(10)) * 2 and dataset["prompt"][7] == "a handwritten digit seven"


def test_digits_sd3_prompts_use_its_short_context_and_fit_in_it():
    from trl_nft.embedded.digits_sd3 import CONTEXT_TOKENS
    from trl_nft.models import get_adapter

    pipeline = load_pipeline("digits-sd3")
    adapter = get_adapter(pipeline, max_sequence_length=128)  # NFTConfig's default, capped by the T5 tokenizer
    assert adapter.max_sequence_length == CONTEXT_TOKENS
    embeds = adapter.encode_prompts([digit_prompt(7)])["prompt_embeds"]
    assert embeds.shape[1] == 2 * CONTEXT_TOKENS  # CLIP tokens, then T5 tokens
    for tokenizer in (pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3):
        assert len(tokenizer(digit_prompt(7)).input_ids) <= CONTEXT_TOKENS  # never truncated
    # A model whose T5 tokenizer declares no short maximum keeps the configured length.
    assert get_adapter(load_pipeline("tiny-sd3"), max_sequence_length=128).max_sequence_length == 128
