"""The SDXL adapter (two text encoders, UNet with added conditioning, VP schedule): DiffusionNFT trains it as a flow
model, and its LoRA loads in diffusers."""

import pytest
import torch

from trl_nft import DiffusionNFTTrainer, build_tiny_sdxl
from trl_nft.models import StableDiffusionXLAdapter, get_adapter, load_pipeline


PROMPTS = ["a photo of object number 3", "a red apple"]


def test_tiny_sdxl_is_embedded_and_deterministic():
    pipeline = load_pipeline("tiny-sdxl")
    assert isinstance(get_adapter(pipeline), StableDiffusionXLAdapter)
    again = build_tiny_sdxl(seed=0)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not torch.equal(pipeline.unet.conv_in.weight, build_tiny_sdxl(seed=1).unet.conv_in.weight)


def test_rollout_returns_clean_latents_and_the_flow_times_of_its_timesteps():
    adapter = StableDiffusionXLAdapter(build_tiny_sdxl())
    adapter.set_sampler("EulerDiscreteScheduler")  # SDXL's own
    conditioning = adapter.encode_prompts(PROMPTS)
    assert set(conditioning) == {"prompt_embeds", "pooled_prompt_embeds"}
    rollout = adapter.sample(conditioning, 4, 64, torch.Generator().manual_seed(0))
    assert rollout.latents.shape == (2, 4, 16, 16)
    timesteps = adapter.pipeline.scheduler.timesteps.long()
    assert torch.equal(adapter._timesteps_of(rollout.sigmas), timesteps)
    assert torch.all(rollout.sigmas[:-1] > rollout.sigmas[1:])  # noisier first


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_velocity_is_that_of_the_pipelines_own_unet_call(prediction_type):
    """The UNet call the pipeline makes (its inputs, with the added conditioning, and its output) is recorded; the
    adapter, given the same point in flow coordinates, must predict the flow velocity of that output."""
    pipeline = build_tiny_sdxl(prediction_type=prediction_type)
    calls = []
    pipeline.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, kwargs, output[0])), with_kwargs=True
    )
    pipeline(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    (vp_noisy, timestep), kwargs, output = calls[0]
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    alpha_cumprod = pipeline.scheduler.alphas_cumprod[timestep.long()]
    alpha, sigma = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    if prediction_type == "epsilon":
        epsilon, clean = output, (vp_noisy - sigma * output) / alpha
    else:
        epsilon, clean = sigma * vp_noisy + alpha * output, alpha * vp_noisy - sigma * output
    expected = epsilon - clean

    adapter = StableDiffusionXLAdapter(pipeline)
    flow_times = (sigma / (alpha + sigma)).repeat(len(PROMPTS))
    with torch.no_grad():
        velocity = adapter.predict_velocity(
            pipeline.unet, vp_noisy / (alpha + sigma), flow_times, adapter.encode_prompts(PROMPTS)
        )
    torch.testing.assert_close(velocity, expected, atol=1e-4, rtol=1e-4)


def test_guided_rollouts_train(make_config, prompts_dataset):
    config = make_config(guidance_scale=3.0, max_steps=1)
    trainer = DiffusionNFTTrainer("tiny-sdxl", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trained = [param.detach().clone() for param in trainer.policies.trained]
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(old, new) for old, new in zip(trained, trainer.policies.trained, strict=True))


def test_a_pipeline_without_unet_is_refused(make_config, prompts_dataset):
    pipeline = build_tiny_sdxl()
    pipeline.unet = None
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline has no UNet"):
        DiffusionNFTTrainer(pipeline, "jpeg_compressibility", args=make_config(), train_dataset=prompts_dataset)
