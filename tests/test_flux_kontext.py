"""FLUX.1 Kontext (`FluxKontextPipeline`): the adapter makes the pipeline's own transformer calls (the condition image's
packed latents after the target's, at positions with first coordinate 1, the output cut back to the target), rolls out
exactly as the pipeline does from the same condition, trains from a dataset with an `image` column whose rewards see
the condition images, and saves a LoRA that `FluxKontextPipeline.load_lora_weights` reproduces; bad input is
refused."""

import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import FluxKontextPipeline, UniPCMultistepScheduler
from families import assert_the_saved_lora_reproduces_the_policy, module_calls
from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_flux_kontext
from trl_nft.models import FluxKontextAdapter, get_adapter, load_pipeline, resolve_model_name


PROMPTS = ["make the sky red", "add a hat to the cat"]
GUIDANCE_SCALE = 3.5  # Kontext-dev's guidance embedding, as the pipeline's default


def _images(count: int, size=(64, 64), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(index) for index in range(len(PROMPTS))]


def _stock(pipeline, conditioning, images, **call):
    """The stock pipeline from the adapter's prompt embeddings, the condition `images` as they are (its automatic
    resizing off, the target 64 px), 3 steps from one generator per image."""
    return pipeline(
        image=images,
        prompt_embeds=conditioning["prompt_embeds"],
        pooled_prompt_embeds=conditioning["pooled_prompt_embeds"],
        height=64,
        width=64,
        max_area=64 * 64,
        _auto_resize=False,
        num_inference_steps=3,
        guidance_scale=GUIDANCE_SCALE,
        generator=_generators(),
        **call,
    )


def test_tiny_flux_kontext_is_embedded_and_edits_one_image_per_row():
    pipeline = load_pipeline("tiny-flux-kontext")
    assert isinstance(pipeline, FluxKontextPipeline)
    adapter = get_adapter(pipeline)
    assert isinstance(adapter, FluxKontextAdapter) and adapter.default_resolution() == 64
    assert adapter.image_conditioning == "required" and adapter.max_condition_images == 1
    assert resolve_model_name("flux-kontext-dev") == "black-forest-labs/FLUX.1-Kontext-dev"
    again = build_tiny_flux_kontext(seed=0)
    ours, theirs = pipeline.transformer.state_dict(), again.transformer.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(ours["proj_out.weight"], build_tiny_flux_kontext(seed=1).transformer.proj_out.weight)


def test_predict_velocity_is_the_pipelines_own_transformer_call():
    """The transformer calls the pipeline makes for an edit are recorded; given the target's part of the same point
    and the same time, the adapter makes the same call (the condition's tokens and positions joined, guidance) and
    gets the same velocity for the target's tokens."""
    pipeline = build_tiny_flux_kontext()
    adapter = get_adapter(pipeline, guidance_scale=GUIDANCE_SCALE, max_sequence_length=32)
    images = _images(2)
    conditioning = adapter.encode_conditions(PROMPTS, [[image] for image in images], 64)
    # Batch-first: the condition's packed latents (4 x 4 tokens of 16 channels) and their positions.
    assert conditioning["image_latents"].shape == (2, 16, 16) and conditioning["image_ids"].shape == (2, 16, 3)
    calls = module_calls(pipeline.transformer, lambda: _stock(pipeline, conditioning, images, output_type="latent"))
    assert len(calls) == 3
    for _, kwargs, output in calls:
        assert kwargs["hidden_states"].shape == (2, 32, 16)  # target and condition tokens
        assert torch.equal(kwargs["img_ids"][16:, 0], torch.ones(16)) and torch.equal(
            kwargs["img_ids"][:16, 0], torch.zeros(16)
        )
        target = kwargs["hidden_states"][:, :16]
        [(_, ours, velocity)] = module_calls(
            pipeline.transformer,
            lambda target=target, kwargs=kwargs: adapter.predict_velocity(
                pipeline.transformer, target, kwargs["timestep"], conditioning
            ),
        )
        for name in ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "txt_ids", "img_ids"):
            # The condition's VAE encoding is the pipeline's own, up to float rounding of the thread count's order.
            torch.testing.assert_close(ours[name], kwargs[name], rtol=1e-5, atol=1e-6, msg=name)
        with torch.no_grad():
            cut = adapter.predict_velocity(pipeline.transformer, target, kwargs["timestep"], conditioning)
        assert cut.shape == target.shape  # the loss sees the generated tokens only
        torch.testing.assert_close(cut, output[:, :16], rtol=1e-5, atol=1e-6)


def test_rollouts_are_the_pipelines_own_with_conditions_resized_to_the_resolution(caplog):
    adapter = get_adapter(build_tiny_flux_kontext(), guidance_scale=GUIDANCE_SCALE, max_sequence_length=32)
    adapter.set_sampler(None)
    assert isinstance(adapter.pipeline.scheduler, UniPCMultistepScheduler)  # the default (not DPM-Solver++: below)
    pipeline = adapter.pipeline
    images = [_images(1)[0], _images(1, size=(96, 80), seed=1)[0]]  # the second is resized to 64 x 64
    logging.Logger.warning_once.cache_clear()  # said once per process: an earlier test may have said it
    with caplog.at_level(logging.WARNING):
        conditioning = adapter.encode_conditions(PROMPTS, [[image] for image in images], 64)
    assert any("resized to 64 x 64 pixels" in record.getMessage() for record in caplog.records)
    rollout = adapter.sample(conditioning, 3, 64, _generators())
    assert rollout.latents.shape == (2, 16, 16)  # the target's tokens only
    # The pipeline given the condition resized as the adapter resizes it (its own resize) samples the same latents.
    resized = [pipeline.image_processor.resize(image, 64, 64) for image in images]
    expected = _stock(pipeline, conditioning, resized, output_type="latent").images
    torch.testing.assert_close(rollout.latents, expected, rtol=1e-5, atol=1e-6)
    # The time grid is FLUX.1's dynamic shift for the target's 16 tokens: the condition's do not count.
    mu = 0.5 + (16 - 256) * 0.65 / 3840
    shifted = np.exp(mu) / (np.exp(mu) + (1 / np.linspace(1.0, 1 / 3, 3) - 1))
    torch.testing.assert_close(pipeline.scheduler.sigmas[:-1], torch.tensor(shifted, dtype=torch.float32))
    assert torch.equal(rollout.sigmas, pipeline.scheduler.timesteps / 1000)
    decoded = _stock(pipeline, conditioning, resized, output_type="pt").images
    torch.testing.assert_close(adapter.decode(rollout.latents), decoded, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 72}, r"resolution=72 cannot be generated by this FLUX.1 model.*multiple of 16"),
        ({"sampler": "DPMSolverMultistepScheduler"}, r"always passes the scheduler its own sigmas"),
    ],
    ids=["resolution", "sampler-without-sigmas"],
)
def test_bad_settings_are_refused_at_construction(make_config, overrides, message):
    dataset = Dataset.from_dict({"prompt": PROMPTS, "image": _images(2)})
    with pytest.raises(ValueError, match=message):
        DiffusionNFTTrainer(
            "tiny-flux-kontext", "jpeg_compressibility", args=make_config(**overrides), train_dataset=dataset
        )


def test_bad_condition_images_are_refused_naming_the_fix():
    adapter = get_adapter(build_tiny_flux_kontext())
    with pytest.raises(ValueError, match=r"'make the sky red' has 2 condition images .* at most 1 per row"):
        adapter.encode_conditions(PROMPTS[:1], [_images(2)], 64)
    with pytest.raises(
        ValueError, match=r"edits or animates an image: every row needs its condition image .*'image' column"
    ):
        adapter.encode_conditions(PROMPTS, None, 64)


def test_trains_from_an_image_column_its_rewards_see_the_sources_and_the_lora_reloads(make_config, tmp_path):
    sources = _images(4, seed=2)
    prompts = [f"make object number {index} brighter" for index in range(4)]
    dataset = Dataset.from_dict({"prompt": prompts, "image": sources})
    seen = []

    def brightness_of_the_edit(images, prompts, condition_images, **kwargs):
        seen.extend(zip(prompts, condition_images, strict=True))
        return [float(np.asarray(image, dtype=np.float32).mean()) / 255 for image in images]

    config = make_config(learning_rate=1e-2, kl_coef=1e-3, guidance_scale=GUIDANCE_SCALE, max_sequence_length=32)
    trainer = DiffusionNFTTrainer("tiny-flux-kontext", brightness_of_the_edit, args=config, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(seen) >= 8
    for prompt, condition in seen:  # each sample's reward got its own row's source image
        assert isinstance(condition, Image.Image)
        assert np.array_equal(np.asarray(condition), np.asarray(sources[prompts.index(prompt)]))
    assert_the_saved_lora_reproduces_the_policy(
        trainer,
        build_tiny_flux_kontext,
        tmp_path / "lora",
        image=sources[3],
        _auto_resize=False,
        max_area=64 * 64,
        guidance_scale=GUIDANCE_SCALE,
        max_sequence_length=32,
    )
