"""The `digits-sd` model (the SD1.x counterpart of `digits-sd3`, for the DDPO comparison): it loads through the real
loader, generates 16 x 16 images, and its pinned base follows its prompt poorly but above chance."""

import json
import os

import torch
from diffusers import StableDiffusionPipeline

from trl_nft.embedded.digits_sd import DIGITS_SD_PATH, base_accuracy
from trl_nft.embedded.digits_sd3 import MAX_BASE_ACCURACY
from trl_nft.models import load_pipeline
from trl_nft.prompts.digits import digit_prompt
from trl_nft.rewards.digit_models import load_classifier


def test_digits_sd_loads_and_generates_16px_images():
    pipeline = load_pipeline("digits-sd")
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 16
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    images = pipeline(
        [digit_prompt(3), digit_prompt(7)],
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert [image.size for image in images] == [(16, 16), (16, 16)]
    # The files the transformers 4.x of TRL 0.23's era needs to load the tokenizer (the DDPO comparison).
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(DIGITS_SD_PATH, "tokenizer")))


def test_digits_sd_base_follows_its_prompt_poorly():
    pipeline = load_pipeline("digits-sd")
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    with torch.no_grad():
        embeds = pipeline.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]
    accuracy = base_accuracy(pipeline, pipeline.unet, embeds, load_classifier())  # 200 images
    assert 0.2 < accuracy <= MAX_BASE_ACCURACY
    with open(os.path.join(DIGITS_SD_PATH, "build_info.json")) as file:
        assert json.load(file)["base_accuracy_cfg_free"] <= MAX_BASE_ACCURACY
