"""A script written for TRL 0.23's DDPOTrainer runs on DiffusionNFT with only its imports renamed."""

import pytest
import torch

from trl_nft import build_tiny_sd

# The only change to the DDPO script: `from trl import ...` becomes `from trl_nft.ddpo import ...`.
from trl_nft.ddpo import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


@pytest.fixture
def pretrained_model(tmp_path):
    path = tmp_path / "tiny-sd"
    build_tiny_sd().save_pretrained(str(path))
    return str(path)


def test_a_ddpo_script_runs_unchanged(pretrained_model, tmp_path):
    # ---- as written for DDPO (trl 0.23 examples/scripts/ddpo.py, with a brightness "aesthetic" scorer) ----
    def aesthetic_scorer(images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3)) * 10  # images: [B, 3, H, W] float in [0, 1]
        return scores, {}

    animals = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat"]
    generator = torch.Generator().manual_seed(0)

    def prompt_fn():
        return animals[torch.randint(len(animals), (1,), generator=generator).item()], {}

    logged = []

    def image_outputs_logger(image_data, global_step, accelerate_logger):
        images, prompts, _, rewards, _ = image_data[-1]
        logged.append((global_step, len(image_data), images.shape, len(prompts), rewards.shape))

    ddpo_config = DDPOConfig(
        num_epochs=2,
        sample_num_steps=4,
        sample_batch_size=4,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        train_learning_rate=1e-3,
        mixed_precision="fp16",
        project_kwargs={"project_dir": str(tmp_path / "save")},
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model, use_lora=True)
    trainer = DDPOTrainer(ddpo_config, aesthetic_scorer, prompt_fn, pipeline, image_samples_hook=image_outputs_logger)
    trainer.train()
    # ---- end of the DDPO script ----

    assert trainer.state.global_step == 2
    assert [entry[0] for entry in logged] == [0, 1]
    # As in DDPO: one entry per sample batch (sample_num_batches_per_epoch batches of sample_batch_size images).
    assert all(b == 2 and shape == (4, 3, 64, 64) and n == 4 and r == (4,) for _, b, shape, n, r in logged)
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert "rewards/aesthetic_scorer/mean" in log


def test_ddpo_config_maps_onto_nft_config():
    config = DDPOConfig(
        num_epochs=7,
        sample_num_steps=20,
        sample_guidance_scale=3.0,
        sample_batch_size=8,
        sample_num_batches_per_epoch=3,
        train_learning_rate=1e-4,
        train_adv_clip_max=2.0,
        per_prompt_stat_tracking=True,
        logdir="somewhere",
    ).to_nft_config()
    assert (config.max_steps, config.num_inference_steps, config.guidance_scale) == (7, 20, 3.0)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.num_generations) == (
        8,
        3,
        8,
    )
    assert (config.learning_rate, config.advantage_clip, config.scale_rewards) == (1e-4, 2.0, "group")
    assert config.output_dir == "somewhere" and config.sampler == "DDIMScheduler"


def test_a_bare_tensor_reward_says_what_to_return(pretrained_model, tmp_path):
    def bare(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    config = DDPOConfig(num_epochs=1, sample_batch_size=2, sample_num_batches_per_epoch=1, logdir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"must return a pair \(rewards, reward_metadata\), e.g. `return rewards, \{\}`"
    ):
        DDPOTrainer(config, bare, lambda: ("a cat", {}), DefaultDDPOStableDiffusionPipeline(pretrained_model))
