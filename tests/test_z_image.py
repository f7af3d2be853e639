"""Z-Image (`ZImagePipeline`): the adapter makes the pipeline's own transformer calls (each prompt's own Qwen3 tokens,
one latent frame per image, the transformer's reversed time) and turns their output into the rectified-flow velocity,
rolls out with UniPC through the pipeline, trains, learns, and saves a LoRA that `ZImagePipeline.load_lora_weights`
reproduces; `trl nft --model tiny-z-image` runs end to end, and settings the model cannot take are refused."""

import pytest
import torch
from datasets import Dataset
from diffusers import UniPCMultistepScheduler
from families import assert_the_saved_lora_reproduces_the_policy, module_calls, run_trl_nft
from learning import assert_beats_a_shuffled_control, brightness

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_z_image
from trl_nft.models import ZImageAdapter, get_adapter, load_pipeline


PROMPTS = ["a cat", "a photo of object number 3"]  # of different lengths: the padded batch has a real mask
OWN_SAMPLER = "FlowMatchEulerDiscreteScheduler"  # Z-Image's own, which a plain pipeline call drives


def test_tiny_z_image_is_embedded_deterministic_and_keeps_each_prompts_own_tokens():
    pipeline = load_pipeline("tiny-z-image")
    adapter = get_adapter(pipeline, max_sequence_length=64)  # room for both prompts, byte by byte
    assert isinstance(adapter, ZImageAdapter) and adapter.default_resolution() == 64
    again = build_tiny_z_image(seed=0)
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    other = build_tiny_z_image(seed=1)
    assert not torch.equal(pipeline.transformer.cap_embedder[1].weight, other.transformer.cap_embedder[1].weight)
    # Every default LoRA target names layers of the diffusers transformer.
    layers = [name for name, module in pipeline.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in ZImageAdapter.lora_target_modules:
        assert any(name.endswith("." + target) for name in layers), target

    prompts = list(PROMPTS)
    conditioning = adapter.encode_prompts(prompts)
    assert prompts == PROMPTS  # the pipeline rewrites the list it encodes: the adapter hands it a copy
    assert set(conditioning) == {"prompt_embeds", "prompt_embeds_mask"}  # CFG-free: no negative prompt
    # Each prompt's tokens inside Qwen3's chat template (thinking on: no thinking block), padding dropped.
    texts = [
        pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for prompt in PROMPTS
    ]
    assert texts[0] == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    lengths = [len(pipeline.tokenizer(text).input_ids) for text in texts]
    assert conditioning["prompt_embeds_mask"].sum(dim=1).tolist() == lengths and lengths[0] != lengths[1]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["cfg-free", "cfg"])
def test_velocity_is_the_negated_output_of_the_pipelines_own_transformer_call(guidance_scale):
    """The pipeline calls the transformer at its time `1 - t` and steps with the negative of its output; the adapter,
    given the same point at flow time `t`, makes the same call and returns that negative: the velocity `eps - x0`."""
    pipeline = build_tiny_z_image()
    adapter = get_adapter(pipeline, guidance_scale=guidance_scale, max_sequence_length=32)
    assert adapter.pipeline_guidance() == {
        "guidance_scale": guidance_scale - 1
    }  # the pipeline's `pos + w'(pos - neg)`
    calls = module_calls(
        pipeline.transformer,
        lambda: pipeline(
            prompt=list(PROMPTS),  # a copy: the pipeline rewrites the list it is given
            num_inference_steps=2,
            max_sequence_length=32,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **adapter.pipeline_guidance(),
        ),
    )
    assert len(calls) == 2  # one call per step; with CFG, the negative half of its batch
    conditioning = adapter.encode_prompts(PROMPTS)
    captions = adapter._unpadded(conditioning, "prompt_embeds")
    if adapter.classifier_free_guidance:
        captions += adapter._unpadded(conditioning, "negative_prompt_embeds")
    for (frames, times, pipeline_captions), _, output in calls:
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(captions, pipeline_captions, strict=True))
        latents, sigmas = torch.stack(frames[:2]).squeeze(2), 1 - times[:2]  # the conditional half, at flow time t
        [((our_frames, our_times, our_captions), _, _)] = module_calls(
            pipeline.transformer,
            lambda latents=latents, sigmas=sigmas: adapter.predict_velocity(
                pipeline.transformer, latents, sigmas, conditioning
            ),
        )
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(our_frames, frames[:2], strict=True))
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(our_captions, captions[:2], strict=True))
        torch.testing.assert_close(our_times, times[:2], atol=1e-6, rtol=0)  # 1 - (1 - t): float rounding only
        with torch.no_grad():
            velocity = adapter.predict_velocity(pipeline.transformer, latents, sigmas, conditioning)
        torch.testing.assert_close(velocity, -torch.stack(output[:2]).squeeze(2), atol=1e-5, rtol=1e-5)


def test_rollouts_use_unipc_on_the_shifted_time_grid_and_decode_as_the_pipeline():
    adapter = get_adapter(build_tiny_z_image(), max_sequence_length=32)
    adapter.set_sampler(None)
    assert isinstance(adapter.pipeline.scheduler, UniPCMultistepScheduler)  # the default: 2nd-order multistep
    conditioning = adapter.encode_prompts(PROMPTS)
    rollout = adapter.sample(conditioning, 4, 64, torch.Generator().manual_seed(0))
    assert rollout.latents.shape == (2, 4, 8, 8)  # the VAE's latents: the transformer patchifies them itself
    # The flow times the transformer was called at (at 1 - t), noisiest first: Z-Image-Turbo's constant shift 3 of the
    # pipeline's sigmas 1, 0.75, 0.5, 0.25 (UniPC starts just below t = 1, at its integer timestep 999).
    assert torch.equal(rollout.sigmas, adapter.pipeline.scheduler.timesteps / 1000)
    torch.testing.assert_close(rollout.sigmas, torch.tensor([0.999, 0.9, 0.75, 0.5]))

    adapter.set_sampler(OWN_SAMPLER)  # a plain pipeline call can drive the model's own
    rollout = adapter.sample(conditioning, 4, 64, torch.Generator().manual_seed(0))
    images = adapter.decode(rollout.latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    expected = adapter.pipeline(
        prompt=list(PROMPTS),  # a copy: the pipeline rewrites the list it is given
        num_inference_steps=4,
        guidance_scale=0.0,
        max_sequence_length=32,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_trains_saves_and_reloads_in_diffusers(make_config, prompts_dataset, tmp_path):
    config = make_config(learning_rate=1e-2, kl_coef=1e-3, max_sequence_length=32)
    trainer = DiffusionNFTTrainer("tiny-z-image", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    # The pipeline's CFG-free setting (its scale is one less than the trainer's).
    assert_the_saved_lora_reproduces_the_policy(
        trainer, build_tiny_z_image, tmp_path / "lora", guidance_scale=0.0, max_sequence_length=32, height=64, width=64
    )


@pytest.mark.slow  # a learning run per family (the default suite keeps SD3's, tests/test_learning.py)
def test_reward_rises_and_beats_a_shuffled_reward_control(make_config):
    """Brightness, with the final layer's projection added to the default LoRA targets (without it: gain 0.002 / 0.001 /
    0.004, control -0.000 / 0.000 / 0.001), on the tiny model drawn at seed 1. Whether a random tiny Z-Image turns what
    its policy learns into brightness depends on its random VAE: the seed-0 model barely does (gain 0.006, control
    -0.003; its transformer with the seed-1 VAE: 0.069), nor do seeds 2 and 3 (-0.001, 0.002); seeds 1 and 4 do (0.059,
    0.037). The images change as much either way (seed 0: by 0.11 per pixel in 40 steps)."""

    # Measured (config seeds 0 / 1 / 2; the test runs 0): gain 0.059 / 0.058 / 0.066, control -0.000 / 0.002 / -0.001.
    assert_beats_a_shuffled_control(
        make_config,
        lambda: build_tiny_z_image(seed=1),
        brightness,
        minimum_gain=0.03,
        minimum_margin=0.03,
        num_inference_steps=4,
        learning_rate=3e-2,
        max_steps=40,
        max_sequence_length=32,
        lora_target_modules=[*ZImageAdapter.lora_target_modules, "all_final_layer.2-1.linear"],
    )


def test_trl_nft_cli_trains_tiny_z_image_and_writes_a_lora_and_a_model_card(tmp_path):
    output_dir = run_trl_nft("tiny-z-image", tmp_path, "--max_sequence_length", "32")
    assert "ZImagePipeline" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 72}, r"resolution=72 cannot be generated by this Z-Image model.*multiple of 16"),
        ({"resolution": 1024}, r"resolution=1024 .*position tables \(axes_lens=\[256, 32, 32\]\) reach 512 px"),
        ({"sampler": "DPMSolverMultistepScheduler"}, r"sampler='DPMSolverMultistepScheduler' cannot sample Z-Image"),
        # Z-Image-Turbo's CFG-free pipeline setting is 0.0; the trainer's scale for it is 1.0.
        ({"guidance_scale": 0.0}, r"guidance_scale=0.0 is invalid: use 1.0 for CFG-free sampling"),
        ({"prompt_embedding_cache_size": 8}, r"prompt_embedding_cache_size=8 cannot be used with ZImagePipeline"),
    ],
    ids=[
        "resolution",
        "resolution-beyond-rope",
        "sampler-without-sigmas",
        "guidance-in-the-pipelines-convention",
        "prompt-embedding-cache",
    ],
)
def test_bad_settings_are_refused_at_construction(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionNFTTrainer(
            "tiny-z-image",
            "jpeg_compressibility",
            args=make_config(**overrides),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        )
