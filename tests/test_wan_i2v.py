"""Wan 2.1 image-to-video (`WanImageToVideoPipeline`): the adapter encodes a row's first frame once (CLIP's image
tokens, and the first-frame mask with the VAE latents of the image followed by black frames), makes the pipeline's own
transformer call (36 channels in, the 16 noise channels' velocity out, the prompt at the 512 positions the transformer
expects), rolls out through the pipeline exactly as it samples, batching rows of different images, trains from a
dataset's `image` column with rewards that see each row's image, and saves a LoRA that the pipeline reloads; Wan 2.2
and bad condition images are refused naming the fix."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from families import assert_the_saved_lora_reproduces_the_policy, module_calls
from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_wan_i2v
from trl_nft.models import WanImageToVideoAdapter, get_adapter, load_pipeline, resolve_model_name


PROMPTS = ["a cat", "a photo of object number 3"]  # of different lengths: both are padded with zeros
MAX_SEQUENCE_LENGTH = 32  # the prompt's tokens; the transformer still gets 512 positions
#: The pipeline's own settings for the tiny model's native video: 5 frames of 32 x 32 px.
CALL = dict(height=32, width=32, num_frames=5)


def _images(count: int, size=(32, 32), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _adapter(guidance_scale: float = 1.0) -> WanImageToVideoAdapter:
    adapter = get_adapter(build_tiny_wan_i2v(), guidance_scale=guidance_scale, max_sequence_length=MAX_SEQUENCE_LENGTH)
    adapter.set_sampler(None)
    return adapter


def test_tiny_wan_i2v_is_embedded_deterministic_and_laid_out_as_wan_2_1_i2v():
    pipeline = load_pipeline("tiny-wan-i2v")
    assert isinstance(pipeline, WanImageToVideoPipeline)
    adapter = get_adapter(pipeline)
    assert isinstance(adapter, WanImageToVideoAdapter) and adapter.produces_videos
    assert adapter.image_conditioning == "required" and adapter.max_condition_images == 1
    assert adapter.default_resolution() == 32 and adapter.num_frames == 5
    again, other = build_tiny_wan_i2v(seed=0), build_tiny_wan_i2v(seed=1)
    for name in ("transformer", "text_encoder", "vae", "image_encoder"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(pipeline.transformer.proj_out.weight, other.transformer.proj_out.weight)
    # Wan2.1-I2V's layout: noise + mask + condition channels in, noise channels out, CLIP tokens read by every block's
    # cross-attention through its own key and value projections.
    config = pipeline.transformer.config
    assert (config.in_channels, config.out_channels) == (16 + 4 + 16, 16)
    assert config.image_dim == pipeline.image_encoder.config.hidden_size and config.added_kv_proj_dim is not None
    layers = [name for name, module in pipeline.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in WanImageToVideoAdapter.lora_target_modules:
        assert any(name.endswith("." + target) for name in layers), target
    assert resolve_model_name("wan2.1-i2v-14b-480p") == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    assert resolve_model_name("wan2.1-i2v-14b-720p") == "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"


def test_conditions_are_the_first_frame_mask_and_latents_clip_tokens_and_512_prompt_positions():
    adapter = _adapter()
    pipeline = adapter.pipeline
    images = [_images(1)[0], _images(1, size=(48, 40), seed=1)[0]]  # the second is stretched to 32 x 32
    conditioning = adapter.encode_conditions(PROMPTS, [[image] for image in images], 32)
    assert set(conditioning) == {"prompt_embeds", "image", "image_embeds", "condition"}

    # Each prompt's own tokens, then zeros to the 512 positions the transformer reads as the prompt.
    embeds = conditioning["prompt_embeds"]
    assert embeds.shape == (2, 512, pipeline.text_encoder.config.d_model)
    lengths = [len(pipeline.tokenizer(prompt).input_ids) for prompt in PROMPTS]
    for row, length in zip(embeds, lengths, strict=True):
        assert row[:length].abs().sum(dim=1).min() > 0 and not row[length:].any()
    # The pipeline encodes prompts to 512 tokens by default.
    expected, _ = pipeline.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-6)

    # The image, stretched to the target's size by the pipeline's own resize, and its CLIP tokens.
    stretched = [pipeline.video_processor.resize(image, 32, 32) for image in images]
    assert conditioning["image"].dtype == torch.uint8
    assert np.array_equal(conditioning["image"].numpy(), np.stack([np.asarray(image) for image in stretched]))
    for row, image in enumerate(stretched):
        torch.testing.assert_close(conditioning["image_embeds"][row : row + 1], pipeline.encode_image(image, "cpu"))

    # Mask: the first latent frame is given (its 4 channels: the first frame, repeated as the VAE's 4 frames per
    # latent frame), the rest is not. Latents: the VAE's mode of the image followed by 4 black frames, normalised.
    condition = conditioning["condition"]
    assert condition.shape == (2, 4 + 16, 2, 4, 4)
    mask, latents = condition[:, :4], condition[:, 4:]
    assert torch.equal(mask[:, :, 0], torch.ones_like(mask[:, :, 0])) and not mask[:, :, 1:].any()
    vae = pipeline.vae
    for row, image in enumerate(stretched):
        pixels = pipeline.video_processor.preprocess(image, 32, 32).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]
        video = torch.cat([pixels, torch.zeros(1, 3, 4, 32, 32)], dim=2)
        encoded = vae.encode(video).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(latents[row : row + 1], (encoded - mean) / std, rtol=1e-5, atol=1e-6)

    # A row's conditioning does not depend on the rows encoded with it (the prompt-embedding cache relies on it).
    alone = adapter.encode_conditions(PROMPTS[1:], [[images[1]]], 32)
    for key, value in alone.items():
        torch.testing.assert_close(value, conditioning[key][1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["cfg-free", "cfg"])
def test_velocity_is_the_output_of_the_pipelines_own_transformer_call(guidance_scale):
    """The pipeline calls the transformer on the noisy latents joined to the mask and condition latents along the
    channels, at timestep `1000 t`, with the prompt and the image's CLIP tokens; the adapter, given the noisy latents
    alone at flow time `t` and the row's conditioning, makes the same call."""
    adapter = _adapter(guidance_scale)
    pipeline, (image,) = adapter.pipeline, _images(1)
    calls = module_calls(
        pipeline.transformer,
        lambda: pipeline(
            image=image,
            prompt=PROMPTS,
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **CALL,
        ),
    )
    conditioning = adapter.encode_conditions(PROMPTS, [[image], [image]], 32)
    # One call per step, and with CFG a second one on the empty prompt, with the same image tokens and condition.
    assert len(calls) == (6 if adapter.classifier_free_guidance else 3)
    for index, (_, kwargs, output) in enumerate(calls):
        negative = adapter.classifier_free_guidance and index % 2 == 1
        prompt_key = "negative_prompt_embeds" if negative else "prompt_embeds"
        torch.testing.assert_close(kwargs["encoder_hidden_states"], conditioning[prompt_key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kwargs["encoder_hidden_states_image"], conditioning["image_embeds"])
        hidden = kwargs["hidden_states"]
        assert hidden.shape == (2, 36, 2, 4, 4) and output.shape == (2, 16, 2, 4, 4)
        torch.testing.assert_close(hidden[:, 16:], conditioning["condition"])
        row_conditioning = {**conditioning, "prompt_embeds": conditioning[prompt_key]}
        with torch.no_grad():
            velocity = adapter.predict_velocity(
                pipeline.transformer, hidden[:, :16], kwargs["timestep"] / 1000, row_conditioning
            )
        torch.testing.assert_close(velocity, output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["cfg-free", "cfg"])
def test_rollouts_are_the_pipelines_own_samples_for_rows_of_different_images(guidance_scale):
    """Rows of two images (one of another size, stretched) in one batch: each row's rollout is what the pipeline
    samples given its image at the target's size and the row's generator; videos decode as the pipeline's."""
    adapter = _adapter(guidance_scale)
    pipeline = adapter.pipeline
    images = [_images(1)[0], _images(1, size=(40, 24), seed=1)[0]]
    rows = [0, 1, 0]  # the first image twice, with different prompts
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    conditioning = adapter.encode_conditions(prompts, [[images[row]] for row in rows], 32)
    rollout = adapter.sample(conditioning, 3, 32, _generators(10, 11, 12))
    assert rollout.latents.shape == (3, 16, 2, 4, 4)  # the 16 noise channels only
    assert torch.equal(rollout.sigmas, pipeline.scheduler.timesteps / 1000)

    def stock(image, rows_prompts, seeds, output_type="latent"):
        return pipeline(
            image=pipeline.video_processor.resize(image, 32, 32),
            prompt=rows_prompts,
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            generator=_generators(*seeds),
            output_type=output_type,
            **CALL,
        ).frames

    torch.testing.assert_close(rollout.latents[[0, 2]], stock(images[0], [prompts[0], prompts[2]], [10, 12]))
    torch.testing.assert_close(rollout.latents[[1]], stock(images[1], [prompts[1]], [11]))
    videos = adapter.decode(rollout.latents[[1]])
    assert videos.shape == (1, 5, 3, 32, 32)
    torch.testing.assert_close(videos, stock(images[1], [prompts[1]], [11], output_type="pt"), rtol=0, atol=1e-5)

    # One generator for the whole batch, as a user passes the pipeline one.
    shared = adapter.encode_conditions(PROMPTS, [[images[0]], [images[0]]], 32)
    latents = adapter.sample(shared, 3, 32, torch.Generator().manual_seed(3)).latents
    expected = pipeline(
        image=images[0],
        prompt=PROMPTS,
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        **CALL,
    ).frames
    torch.testing.assert_close(latents, expected)


def test_trains_from_an_image_column_its_rewards_see_the_first_frames_and_the_lora_reloads(make_config, tmp_path):
    sources = _images(4, seed=2)
    prompts = [f"animate object number {index}" for index in range(4)]
    dataset = Dataset.from_dict({"prompt": prompts, "image": sources})
    seen = []

    def resemblance_to_the_first_frame(videos, prompts, condition_images, **kwargs):
        seen.extend(zip(prompts, condition_images, strict=True))
        return [
            -float(np.abs(np.asarray(video[0], np.float32) - np.asarray(source, np.float32)).mean()) / 255
            for video, source in zip(videos, condition_images, strict=True)
        ]

    config = make_config(learning_rate=1e-2, kl_coef=1e-3, max_sequence_length=MAX_SEQUENCE_LENGTH)
    trainer = DiffusionNFTTrainer("tiny-wan-i2v", resemblance_to_the_first_frame, args=config, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(seen) >= 8
    for prompt, condition in seen:  # each sample's reward got its own row's first frame
        assert isinstance(condition, Image.Image)
        assert np.array_equal(np.asarray(condition), np.asarray(sources[prompts.index(prompt)]))
    assert_the_saved_lora_reproduces_the_policy(
        trainer, build_tiny_wan_i2v, tmp_path / "lora", image=sources[3], guidance_scale=1.0, **CALL
    )


def test_bad_condition_images_and_settings_are_refused_naming_the_fix(make_config):
    adapter = _adapter()
    with pytest.raises(ValueError, match=r"'a cat' has 2 condition images .*at most 1 per row"):
        adapter.encode_conditions(PROMPTS[:1], [_images(2)], 32)
    with pytest.raises(ValueError, match=r"animates an image: every row needs its condition image .*'image' column"):
        adapter.encode_conditions(PROMPTS, None, 32)
    with pytest.raises(ValueError, match=r"resolution=40 cannot be generated by this Wan model.*multiple of 16"):
        adapter.encode_conditions(PROMPTS[:1], [_images(1)], 40)
    with pytest.raises(ValueError, match=r"resolution=40 cannot be generated by this Wan model"):
        DiffusionNFTTrainer(
            "tiny-wan-i2v",
            "jpeg_compressibility",
            args=make_config(resolution=40),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"], "image": _images(2)}),
        )
    with pytest.raises(ValueError, match=r"'image' column"):
        DiffusionNFTTrainer(
            "tiny-wan-i2v",
            "jpeg_compressibility",
            args=make_config(),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        )


def _wan_2_2_a14b() -> WanImageToVideoPipeline:
    """A14B's image-to-video layout: two experts without image tokens, no image encoder, a `boundary_ratio`."""
    pipeline = build_tiny_wan_i2v()
    config = {**pipeline.transformer.config, "image_dim": None, "added_kv_proj_dim": None}
    expert = WanTransformer3DModel.from_config(config)
    return WanImageToVideoPipeline(
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder,
        vae=pipeline.vae,
        scheduler=pipeline.scheduler,
        transformer=expert,
        transformer_2=WanTransformer3DModel.from_config(config),
        boundary_ratio=0.9,
    )


def test_wan_2_2_and_a_pipeline_without_its_image_encoder_are_refused():
    with pytest.raises(ValueError, match=r"Wan 2.2 model \(two transformers.*wan2.1-i2v-14b-480p"):
        get_adapter(_wan_2_2_a14b())
    ti2v = build_tiny_wan_i2v()
    ti2v.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match=r"Wan 2.2 model \(a timestep per token.*wan2.1-i2v-14b-480p"):
        get_adapter(ti2v)
    single_expert = build_tiny_wan_i2v()
    config = {**single_expert.transformer.config, "image_dim": None, "added_kv_proj_dim": None}
    single_expert.register_modules(transformer=WanTransformer3DModel.from_config(config))
    with pytest.raises(ValueError, match=r"Wan 2.2 model \(a transformer without CLIP image tokens"):
        get_adapter(single_expert)
    no_encoder = build_tiny_wan_i2v()
    no_encoder.register_modules(image_encoder=None)
    with pytest.raises(ValueError, match=r"no `image_encoder` or `image_processor`.*load the model with both"):
        get_adapter(no_encoder)


def test_old_and_reference_velocities_from_one_forward_of_the_doubled_conditioning(make_config):
    """The trainer doubles every conditioning entry for the fused old + reference forward: with the condition joined
    on the channels and the image tokens, that one forward still gives both policies' velocities computed apart."""
    rows = [{"prompt": f"animate object number {index}", "image": image} for index, image in enumerate(_images(4))]
    config = make_config(kl_coef=1e-2, num_inference_steps=2, max_sequence_length=MAX_SEQUENCE_LENGTH)
    trainer = DiffusionNFTTrainer(
        "tiny-wan-i2v", "jpeg_compressibility", args=config, train_dataset=Dataset.from_list(rows)
    )
    with torch.no_grad():  # an old policy away from the base, so that the two halves differ
        for param in trainer.policies.old:
            param.add_(torch.randn_like(param), alpha=0.1)
    rollout = trainer._generate_and_score(rows)
    noisy, sigmas, conditioning = torch.randn_like(rollout["latents"]), torch.rand(4), rollout["conditioning"]
    sample = {"noisy": noisy, "sigmas": sigmas}
    with torch.no_grad():
        trainer._frozen_velocities([sample], conditioning)
        with trainer.policies.acting_as_old() as old_policy:
            old = trainer.adapter.predict_velocity(old_policy, noisy, sigmas, conditioning)
        with trainer.policies.acting_as_reference() as reference:
            base = trainer.adapter.predict_velocity(reference, noisy, sigmas, conditioning)
    torch.testing.assert_close(sample["old_velocity"], old, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample["reference_velocity"], base, atol=1e-5, rtol=0)
    assert (old - base).abs().max() > 1e-2
