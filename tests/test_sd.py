"""SD1.x and SDXL (UNet, VP diffusion) through the flow objective: time grid, training, diffusers-loadable LoRA."""

import pytest
import torch
from datasets import Dataset
from families import assert_the_saved_lora_reproduces_the_policy

from trl_nft import DiffusionNFTTrainer, build_tiny_sd, build_tiny_sdxl
from trl_nft.models import StableDiffusionAdapter


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_rollout_times_map_back_to_their_timesteps(prediction_type):
    adapter = StableDiffusionAdapter(build_tiny_sd(prediction_type=prediction_type))
    adapter.set_sampler("DDIMScheduler")
    adapter.pipeline.scheduler.set_timesteps(10)
    timesteps = adapter.pipeline.scheduler.timesteps
    flow_times = adapter._flow_times[timesteps]
    assert torch.equal(adapter._timesteps_of(flow_times), timesteps)
    assert torch.all(flow_times[:-1] > flow_times[1:])  # noisier first


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("build", "sampler"), [(build_tiny_sd, "DDIMScheduler"), (build_tiny_sdxl, "EulerDiscreteScheduler")]
)
def test_trains_saves_and_reloads_in_diffusers(
    make_config, prompts_dataset, tmp_path, build, sampler, prediction_type
):
    """SD1.x and SDXL (UNet, VP schedule) train, and the saved LoRA reproduces the policy in a fresh pipeline."""
    pipeline = build(prediction_type=prediction_type)
    config = make_config(sampler=sampler, learning_rate=1e-2, kl_coef=1e-3)
    trainer = DiffusionNFTTrainer(pipeline, "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert_the_saved_lora_reproduces_the_policy(
        trainer, lambda: build(prediction_type=prediction_type), tmp_path / "lora", guidance_scale=1.0
    )


def test_a_pipeline_without_unet_is_refused(make_config, prompts_dataset):
    pipeline = build_tiny_sd()
    pipeline.unet = None
    with pytest.raises(ValueError, match="has no UNet"):
        DiffusionNFTTrainer(pipeline, "jpeg_compressibility", args=make_config(), train_dataset=prompts_dataset)


def test_flow_samplers_are_refused_for_a_vp_model(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="samples rectified-flow models"):
        DiffusionNFTTrainer(
            "tiny-sd",
            "jpeg_compressibility",
            args=make_config(sampler="FlowMatchEulerDiscreteScheduler"),
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        )
