"""The Qwen-Image adapter (Qwen2.5-VL prompts with a padding mask, packed latents of a video VAE, true CFG): rollouts,
the transformer call of the pipeline, training, a diffusers-loadable LoRA, learning, the CLI and bad input."""

import pytest
import torch
from datasets import Dataset
from families import assert_the_saved_lora_reproduces_the_policy, run_trl_nft
from learning import assert_beats_a_shuffled_control, brightness

from trl_nft import DiffusionNFTTrainer
from trl_nft.embedded import build_tiny_qwen_image
from trl_nft.models import QwenImageAdapter, get_adapter, load_pipeline


PROMPTS = ["a cat", "a photo of object number 3"]  # of different lengths: the batch is padded and masked
SAMPLER = "FlowMatchEulerDiscreteScheduler"  # Qwen-Image's own (the default DPM-Solver++ cannot drive the pipeline)


def _adapter(**kwargs) -> QwenImageAdapter:
    adapter = QwenImageAdapter(build_tiny_qwen_image(), **kwargs)
    adapter.set_sampler(SAMPLER)
    return adapter


def _transformer_calls(pipeline) -> list[tuple[dict, torch.Tensor]]:
    """Record every call the pipeline makes to its transformer: the keyword arguments and the output."""
    calls = []
    pipeline.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    return calls


def test_tiny_qwen_image_is_embedded_deterministic_and_keeps_the_prompt_after_the_template():
    pipeline = load_pipeline("tiny-qwen-image")
    assert isinstance(get_adapter(pipeline), QwenImageAdapter)
    again = build_tiny_qwen_image(seed=0)
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(pipeline.transformer.img_in.weight, build_tiny_qwen_image(seed=1).transformer.img_in.weight)
    # The pipeline drops the template's first `prompt_template_encode_start_idx` tokens: exactly its system part.
    system_part = pipeline.prompt_template_encode.split("{}")[0]
    assert len(pipeline.tokenizer(system_part).input_ids) == pipeline.prompt_template_encode_start_idx
    embeds, mask = pipeline.encode_prompt(["", *PROMPTS])
    prompt_lengths = [len(pipeline.tokenizer(prompt).input_ids) for prompt in ["", *PROMPTS]]
    closing = mask.sum(dim=1) - torch.tensor(prompt_lengths)  # the template's closing tokens, the same for all
    assert closing.unique().numel() == 1 and closing[0] > 0
    assert embeds.shape[0] == 3 and embeds.shape[-1] == pipeline.transformer.config.joint_attention_dim
    assert get_adapter(pipeline).default_resolution() == 64


def test_rollout_returns_packed_latents_the_decreasing_time_grid_and_the_pipelines_images():
    adapter = _adapter()
    conditioning = adapter.encode_prompts(PROMPTS)
    assert set(conditioning) == {"prompt_embeds", "prompt_embeds_mask"}  # CFG-free: no negative prompt
    rollout = adapter.sample(conditioning, 4, 64, torch.Generator().manual_seed(0))
    assert rollout.latents.shape == (2, 16, 16)  # 4 x 4 tokens of 2 x 2 patches of 4 channels
    # The flow times the transformer was called at (the pipeline passes `timestep / 1000`), noisiest first; Qwen-Image's
    # schedule starts at pure noise and is stretched to end at t = 0.02 (`shift_terminal`).
    assert torch.equal(rollout.sigmas, adapter.pipeline.scheduler.timesteps / 1000)
    assert torch.all(rollout.sigmas[:-1] > rollout.sigmas[1:])
    assert rollout.sigmas[0] == 1.0 and rollout.sigmas[-1] == pytest.approx(0.02)

    images = adapter.decode(rollout.latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    expected = adapter.pipeline(
        prompt=PROMPTS,
        num_inference_steps=4,
        true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["padded", "unpadded"])
def test_velocity_is_that_of_the_pipelines_own_transformer_call(prompts):
    """The transformer call the pipeline makes (latents, `timestep / 1000`, the text mask, `img_shapes`) is recorded;
    the adapter, given the same point and time, must make the same call."""
    adapter = _adapter()
    calls = _transformer_calls(adapter.pipeline)
    adapter.pipeline(prompt=prompts, num_inference_steps=2, true_cfg_scale=1.0, height=64, width=64)
    kwargs, output = calls[1]
    assert (kwargs["encoder_hidden_states_mask"] is None) == (len(prompts) == 1)  # a padded batch is masked
    with torch.no_grad():
        velocity = adapter.predict_velocity(
            adapter.pipeline.transformer,
            kwargs["hidden_states"],
            kwargs["timestep"],
            adapter.encode_prompts(prompts),
        )
    torch.testing.assert_close(velocity, output, atol=1e-5, rtol=1e-5)


def test_guidance_is_true_cfg_with_the_negative_prompt():
    free, guided = _adapter(), _adapter(guidance_scale=4.0)
    conditioning = guided.encode_prompts(PROMPTS)
    negative_keys = {"negative_prompt_embeds", "negative_prompt_embeds_mask"}
    assert set(conditioning) == {"prompt_embeds", "prompt_embeds_mask", *negative_keys}
    negative, _ = guided.pipeline.encode_prompt([" "])
    assert torch.equal(conditioning["negative_prompt_embeds"], negative.expand(2, -1, -1))
    calls = _transformer_calls(guided.pipeline)
    guided_latents = guided.sample(conditioning, 2, 64, torch.Generator().manual_seed(0)).latents
    assert len(calls) == 4  # each step: the conditional and the negative pass
    free_latents = free.sample(free.encode_prompts(PROMPTS), 2, 64, torch.Generator().manual_seed(0)).latents
    assert (guided_latents - free_latents).abs().max() > 1e-3


def test_a_single_step_is_refused_rather_than_sampling_nan():
    adapter = _adapter()
    with pytest.raises(ValueError, match=r"num_inference_steps=1 .*\(shift_terminal\)"):
        adapter.sample(adapter.encode_prompts(PROMPTS), 1, 64, torch.Generator().manual_seed(0))


def test_trains_saves_and_reloads_in_diffusers(make_config, prompts_dataset, tmp_path):
    config = make_config(sampler=SAMPLER, learning_rate=1e-2, kl_coef=1e-3)
    trainer = DiffusionNFTTrainer(
        "tiny-qwen-image", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert_the_saved_lora_reproduces_the_policy(trainer, build_tiny_qwen_image, tmp_path / "lora", true_cfg_scale=1.0)


@pytest.mark.slow  # a learning run per family (the default suite keeps SD3's, tests/test_learning.py)
def test_reward_rises_and_beats_a_shuffled_reward_control(make_config):
    # Measured (config seeds 0 / 1 / 2; the test runs 0): gain 0.068 / 0.054 / 0.068, control -0.003 / -0.008 / -0.014;
    # the within-group std of the brightness is about 0.003.
    assert_beats_a_shuffled_control(
        make_config,
        "tiny-qwen-image",
        brightness,
        minimum_gain=0.03,
        minimum_margin=0.03,
        sampler=SAMPLER,
        learning_rate=3e-2,
        max_steps=60,
        # The transformer's last projection (to the latents) lets the policy shift the latents' channel means,
        # which the random VAE turns into brightness; with the default targets alone the gain is about a quarter
        # (seeds 0 / 1 / 2: 0.015 / 0.018 / 0.018).
        lora_target_modules=[*QwenImageAdapter.lora_target_modules, "proj_out"],
    )


def test_cli_trains_the_embedded_model_and_writes_a_diffusers_lora(tmp_path):
    output_dir = run_trl_nft("tiny-qwen-image", tmp_path)  # with the family's default sampler, UniPC
    assert "QwenImagePipeline" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 72}, r"resolution=72 .* multiple of 16"),
        (
            {"sampler": "DPMSolverMultistepScheduler"},
            r"sampler='DPMSolverMultistepScheduler' cannot sample Qwen-Image",
        ),
        ({"prompt_embedding_cache_size": 8}, r"prompt_embedding_cache_size=8 cannot be used with QwenImagePipeline"),
    ],
)
def test_bad_settings_are_refused_at_construction(make_config, overrides, message):
    dataset = Dataset.from_dict({"prompt": ["a", "b"]})
    with pytest.raises(ValueError, match=message):
        DiffusionNFTTrainer(
            "tiny-qwen-image",
            "jpeg_compressibility",
            args=make_config(**{"sampler": SAMPLER, **overrides}),
            train_dataset=dataset,
        )


def test_a_guidance_distilled_transformer_is_refused(make_config):
    pipeline = build_tiny_qwen_image()
    pipeline.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match=r"guidance-distilled \(guidance_embeds=True .* guidance_scale=1.0"):
        DiffusionNFTTrainer(
            pipeline,
            "jpeg_compressibility",
            args=make_config(sampler=SAMPLER),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        )
