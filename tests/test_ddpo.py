"""A script written for TRL 0.23's DDPOTrainer runs on DiffusionNFT with only its imports renamed, and every public
name of TRL 0.23.1's DDPOConfig, DDPOTrainer and DefaultDDPOStableDiffusionPipeline works or says what to use."""

import contextlib
import dataclasses
import re
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from huggingface_hub import CommitInfo, HfApi, RepoUrl

from trl_nft import build_tiny_sd

# The only change to the DDPO script: `from trl import ...` becomes `from trl_nft.ddpo import ...`.
from trl_nft.ddpo import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


# TRL 0.23.1's public names, read from its wheel (`pip download trl==0.23.1 --no-deps`): the classes' public
# attributes and methods, and those their `__init__` sets.
TRL_DDPO_CONFIG = [f.name for f in dataclasses.fields(DDPOConfig) if f.name != "num_generations"] + ["to_dict"]
TRL_DDPO_TRAINER = [
    *["calculate_loss", "compute_rewards", "create_model_card", "from_pretrained", "generate_model_card", "loss"],
    *["push_to_hub", "save_pretrained", "step", "train", "accelerator", "autocast", "config", "executor"],
    *["first_epoch", "image_samples_callback", "neg_prompt_embed", "num_train_timesteps", "optimizer", "prompt_fn"],
    *["reward_fn", "sd_pipeline", "stat_tracker", "trainable_layers"],
]
TRL_DDPO_PIPELINE = [
    *["__call__", "autocast", "get_trainable_layers", "load_checkpoint", "rgb_with_grad", "save_checkpoint"],
    *[
        "save_pretrained",
        "scheduler",
        "scheduler_step",
        "set_progress_bar_config",
        "text_encoder",
        "tokenizer",
        "unet",
    ],
    *["vae", "pretrained_model", "pretrained_revision", "sd_pipeline", "use_lora"],
]
PORT_WARNING = "DDPOConfig settings that DiffusionNFT runs differently"


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_sd().save_pretrained(str(path))
    return str(path)


def brightness_scorer(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def cat_prompt():
    return "a cat", {"animal": "cat"}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quick_config(**overrides) -> DDPOConfig:
    """A run of seconds: one prompt group of 2 images per epoch, sampled in 2 steps, each trained in one step."""
    settings = dict(
        num_epochs=1,
        sample_num_steps=2,
        sample_batch_size=2,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        num_generations=2,
        sample_eta=0.0,
        train_cfg=False,
        mixed_precision="no",
    )
    return DDPOConfig(**{**settings, **overrides})


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
        train_batch_size=4,
        train_learning_rate=1e-3,
        mixed_precision="fp16",
        project_kwargs={"project_dir": str(tmp_path / "save")},
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model, use_lora=True)
    trainer = DDPOTrainer(ddpo_config, aesthetic_scorer, prompt_fn, pipeline, image_samples_hook=image_outputs_logger)
    trainer.train()
    # ---- end of the DDPO script ----

    # As in DDPO: an epoch's 8 images trained in micro-batches of train_batch_size=4, one optimizer step each, and the
    # hook called with the number of optimizer steps taken before the epoch.
    assert trainer.state.global_step == 4
    assert [entry[0] for entry in logged] == [0, 2]
    # As in DDPO: one entry per sample batch (sample_num_batches_per_epoch batches of sample_batch_size images).
    assert all(b == 2 and shape == (4, 3, 64, 64) and n == 4 and r == (4,) for _, b, shape, n, r in logged)
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert "rewards/aesthetic_scorer/mean" in log


def test_a_script_on_ddpo_config_defaults_runs(pretrained_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DDPO's default logdir, "logs", is relative
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # ---- as written for DDPO: DDPOConfig's defaults, but for the number of epochs and sampling steps ----
        config = DDPOConfig(num_epochs=2, sample_num_steps=2)
        pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
        trainer = DDPOTrainer(config, brightness_scorer, cat_prompt, pipeline)
        trainer.train()
        # ---- end of the DDPO script ----

    (warning,) = [w for w in caught if PORT_WARNING in str(w.message)]
    assert warning.filename == __file__  # it points at the script's line
    message = str(warning.message)
    # DDPO's one image per prompt: the epoch's 2 images (2 batches of 1) form one group.
    assert "num_generations=2" in message and "sample_eta=1.0 -> 0" in message and "train_cfg=True -> False" in message
    if not torch.cuda.is_available():
        assert "mixed_precision='fp16' -> 'no'" in message
    # As DDPO: 2 batches of 1 image an epoch, trained one image per optimizer step; a checkpoint every epoch, in logdir.
    assert trainer.state.global_step == 4
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_a_script_saving_through_the_pipeline(pretrained_model, tmp_path):
    # ---- as written for DDPO: train, then save through the pipeline object ----
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    trainer = DDPOTrainer(quick_config(logdir=str(tmp_path / "run")), brightness_scorer, cat_prompt, pipeline)
    trainer.train()
    pipeline.save_pretrained(str(tmp_path / "saved"))
    pipeline.save_checkpoint([pipeline.unet], [], str(tmp_path / "checkpoint"))
    # ---- end of the DDPO script ----

    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([500, 50]), torch.randn(2, 77, 32))
    with torch.no_grad():
        trained = pipeline.unet(*inputs).sample
        with trainer.policies.evaluation_weights():  # what trainer.save_model() writes: the EMA of the trained weights
            result = pipeline.unet(*inputs).sample
    # The folder is a pipeline whose UNet has no LoRA layers in it (DDPO wrote them in, so that it reloaded with
    # random attention weights), with the LoRA beside it: diffusers' loaders, or DDPO's pipeline, restore the result.
    unet_file = tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors"
    assert not [key for key in safetensors.torch.load_file(str(unet_file)) if "lora" in key or "base_layer" in key]
    reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
    reloaded.load_lora_weights(str(tmp_path / "saved"))
    again = DefaultDDPOStableDiffusionPipeline(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.allclose(reloaded.unet(*inputs).sample, result, atol=1e-5)
        assert again.use_lora and torch.allclose(again.unet(*inputs).sample, result, atol=1e-5)
    # save_checkpoint wrote the trained weights themselves; load_checkpoint puts them into DDPO's LoRA.
    fresh = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    fresh.load_checkpoint([fresh.get_trainable_layers()], str(tmp_path / "checkpoint"))
    with torch.no_grad():
        assert torch.allclose(fresh.unet(*inputs).sample, trained, atol=1e-5)
    # A DDPOTrainer built on the saved pipeline trains its LoRA further, from where it was.
    continued = DDPOTrainer(quick_config(logdir=str(tmp_path / "more")), brightness_scorer, cat_prompt, again)
    with torch.no_grad():
        assert torch.allclose(continued.sd_pipeline.unet(*inputs).sample, result, atol=1e-5)
    assert continued.policies.lora_config.r == 4  # DDPO's LoRA


def test_the_fully_fine_tuned_pipeline_saves_and_reloads(pretrained_model, tmp_path):
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model, use_lora=False)
    trainer = DDPOTrainer(quick_config(logdir=str(tmp_path / "run")), brightness_scorer, cat_prompt, pipeline)
    trainer.train()
    pipeline.save_pretrained(str(tmp_path / "saved"))

    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32))
    reloaded = DefaultDDPOStableDiffusionPipeline(str(tmp_path / "saved"), use_lora=False)
    with torch.no_grad(), trainer.policies.evaluation_weights():
        assert torch.allclose(reloaded.unet(*inputs).sample, pipeline.unet(*inputs).sample, atol=1e-5)
    assert not reloaded.use_lora


def test_trl_examples_push_to_hub_uploads_to_the_repo_it_names(pretrained_model, tmp_path, monkeypatch):
    commits = []

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        commits.append((repo_id, sorted(op.path_in_repo for op in operations)))
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/1", commit_message, "", "1" * 40)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # the single-commit path
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    trainer = DDPOTrainer(quick_config(logdir=str(tmp_path / "run")), brightness_scorer, cat_prompt, pipeline)
    trainer.train(2)  # DDPO's train(epochs)
    trainer.push_to_hub("someone/ddpo-port")  # the last line of TRL's example (transformers' would take a message)

    assert trainer.state.global_step == 2 and len(trainer.train_dataset) == 2  # a prompt drawn per epoch's group
    ((repo_id, files),) = commits
    assert repo_id == "someone/ddpo-port"
    assert {"README.md", "model_index.json", "pytorch_lora_weights.safetensors"} <= set(files)
    assert "unet/diffusion_pytorch_model.safetensors" in files
    card = trainer.generate_model_card()
    assert 'load_lora_weights("someone/ddpo-port")' in card.text


def test_resume_from_continues_a_run_as_ddpo_did(pretrained_model, tmp_path):
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    DDPOTrainer(quick_config(logdir=str(tmp_path)), brightness_scorer, cat_prompt, pipeline).train()
    assert (tmp_path / "checkpoint-1").is_dir()  # save_freq=1: a checkpoint after the epoch

    config = quick_config(logdir=str(tmp_path), num_epochs=2, resume_from=str(tmp_path))  # the run's folder
    pipeline, sampled_at = DefaultDDPOStableDiffusionPipeline(pretrained_model), []
    trainer = DDPOTrainer(
        config,
        brightness_scorer,
        cat_prompt,
        pipeline,
        image_samples_hook=lambda data, step, _: sampled_at.append(step),
    )
    assert trainer.first_epoch == 1
    trainer.train()
    assert trainer.state.global_step == 2 and sampled_at == [1]  # only the second epoch ran


def test_a_diffusers_pipeline_is_taken_as_ddpos(pretrained_model, tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(pretrained_model)
    scheduler = pipeline.scheduler
    trainer = DDPOTrainer(quick_config(logdir=str(tmp_path)), brightness_scorer, cat_prompt, pipeline)
    assert isinstance(trainer.sd_pipeline, DefaultDDPOStableDiffusionPipeline) and trainer.sd_pipeline.use_lora
    assert trainer.sd_pipeline.unet is pipeline.unet and pipeline.scheduler is scheduler  # trained in place, as given


@pytest.fixture(scope="module")
def built(pretrained_model, tmp_path_factory):
    """A DDPOTrainer as DDPO's attributes are read from, untrained."""
    config = quick_config(logdir=str(tmp_path_factory.mktemp("run")), async_reward_computation=True)
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    return config, DDPOTrainer(config, brightness_scorer, cat_prompt, pipeline)


def test_every_public_name_of_trl_0_23_1_exists_and_is_documented(built):
    config, trainer = built
    documented = set(re.findall(r"`(\w+)", Path(__file__).parents[1].joinpath("docs/ddpo_migration.md").read_text()))
    for obj, names in (
        (config, TRL_DDPO_CONFIG),
        (trainer, TRL_DDPO_TRAINER),
        (trainer.sd_pipeline, TRL_DDPO_PIPELINE),
    ):
        assert [name for name in names if name not in dir(obj)] == []
        assert [name for name in names if name not in documented] == []


def test_ddpo_attributes_hold_what_they_held(built):
    config, trainer = built
    assert (trainer.config, trainer.reward_fn, trainer.prompt_fn) == (config, brightness_scorer, cat_prompt)
    assert trainer.image_samples_callback is None and trainer.first_epoch == 0
    assert trainer.num_train_timesteps == 2 and trainer.autocast is contextlib.nullcontext
    assert trainer.optimizer is not None  # built up front, as DDPO's
    assert trainer.trainable_layers and all(param.requires_grad for param in trainer.trainable_layers)
    assert trainer.neg_prompt_embed.shape == (1, 77, 32)  # DDPO's embedding of negative_prompts
    assert trainer.sd_pipeline.unet is trainer.accelerator.unwrap_model(trainer.model)  # the model being trained
    images = torch.rand(2, 3, 64, 64)
    for is_async in (False, True):
        rewards, metadata = trainer.compute_rewards([(images, ("a", "b"), ({}, {}))], is_async=is_async)
        assert torch.allclose(rewards[0], images.mean(dim=(1, 2, 3))) and metadata == ({},)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.step(0, 0), r"call trainer\.train\(\), or trainer\.train\(epochs\)"),
        (lambda t: t.calculate_loss(*[None] * 6), r"trainer\.compute_loss .*trl_nft\.objective\.nft_loss"),
        (lambda t: t.loss(None, 0.1, None), r"trl_nft\.objective\.nft_loss"),
        (lambda t: t.stat_tracker, r"within its prompt group .*group_advantages"),
        (
            lambda t: type(t).from_pretrained(t.args.output_dir),  # a local run folder: refused before any load
            r"DefaultDDPOStableDiffusionPipeline\(repo_or_folder\)",
        ),
        (lambda t: t.sd_pipeline.rgb_with_grad(prompt="a cat"), r"AlignProp's .* reward_function"),
        (lambda t: t.train("checkpoint-1"), r"train\(resume_from_checkpoint=\.\.\.\)"),
    ],
)
def test_what_diffusion_nft_has_no_use_for_says_what_to_use(built, call, message):
    with pytest.raises((NotImplementedError, AttributeError, TypeError), match=message):
        call(built[1])


def test_the_pipeline_samples_as_ddpo_did(pretrained_model):
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a dog"]
    output = pipeline(prompt=prompts, num_inference_steps=3, output_type="pt", eta=0.0, generator=generator(0))
    # Deterministic DDIM (eta 0): the pipeline's own images, with the trajectory DDPO recorded.
    reference = pipeline.sd_pipeline(prompts, num_inference_steps=3, output_type="pt", eta=0.0, generator=generator(0))
    assert torch.allclose(output.images, reference.images, atol=1e-6)
    assert len(output.latents) == 4 and len(output.log_probs) == 3
    assert all(latents.shape == (2, 4, 16, 16) for latents in output.latents)
    noisy = pipeline(prompt="a cat", num_inference_steps=3, output_type="pt", eta=1.0)
    assert all(log_prob.shape == (1,) and torch.isfinite(log_prob).all() for log_prob in noisy.log_probs)


def test_scheduler_step_equals_trl_0_23_1(pretrained_model):
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    # TRL 0.23.1's scheduler_step (trl.models.modeling_sd_base) on the same inputs: log-probabilities per sample.
    expected = {"epsilon": [-1.5290097, 2.6665850], "v_prediction": [-0.6718785, 2.6784554]}
    sample = torch.linspace(-1, 1, 72).reshape(2, 4, 3, 3)
    model_output = torch.cos(torch.linspace(0, 6, 72)).reshape(2, 4, 3, 3)
    for prediction_type, log_probs in expected.items():
        pipeline.sd_pipeline.scheduler = DDIMScheduler.from_config(
            pipeline.scheduler.config, prediction_type=prediction_type
        )
        pipeline.scheduler.set_timesteps(10)
        output = pipeline.scheduler_step(
            model_output, torch.tensor([901, 1]), sample, eta=1.0, prev_sample=sample * 0.9 + 0.05
        )
        assert output.log_probs.tolist() == pytest.approx(log_probs, abs=1e-6)


def test_ddpo_config_maps_onto_nft_config():
    with pytest.warns(UserWarning, match=PORT_WARNING):
        config = DDPOConfig(
            num_epochs=7,
            sample_num_steps=20,
            sample_guidance_scale=3.0,
            sample_batch_size=8,
            sample_num_batches_per_epoch=3,
            train_batch_size=4,
            train_gradient_accumulation_steps=2,
            train_learning_rate=1e-4,
            train_adv_clip_max=2.0,
            per_prompt_stat_tracking=True,
            logdir="somewhere",
            save_freq=2,
        ).to_nft_config()
    assert (config.num_inference_steps, config.guidance_scale, config.num_generations) == (20, 3.0, 8)
    # An epoch: 24 images sampled 8 at a time, trained 4 at a time, 2 micro-batches per optimizer step: 3 steps.
    assert (config.per_device_rollout_batch_size, config.per_device_train_batch_size) == (8, 4)
    assert (config.steps_per_generation, config.gradient_accumulation_steps) == (6, 2)
    assert (config.max_steps, config.save_steps) == (21, 6)
    assert (config.learning_rate, config.advantage_clip, config.scale_rewards) == (1e-4, 2.0, "group")
    assert config.output_dir == "somewhere" and config.sampler == "DDIMScheduler"
    # DDPO's to_dict(), which trackers store: nested dicts flattened to parent/child keys.
    flat = DDPOConfig(project_kwargs={"project_dir": "save", "total_limit": 5}).to_dict()
    assert (flat["project_kwargs/project_dir"], flat["project_kwargs/total_limit"], flat["num_epochs"]) == (
        "save",
        5,
        100,
    )


def test_settings_diffusion_nft_takes_as_they_are_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quick_config().to_nft_config()
    with pytest.warns(UserWarning, match=r"train_clip_range=0\.2 has no effect: PPO's ratio clip"):
        quick_config(train_clip_range=0.2).to_nft_config()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sample_batch_size=2, train_batch_size=4), r"Sample batch size \(2\) must be greater than or equal"),
        (dict(sample_batch_size=3, train_batch_size=2), r"must be divisible by the train batch size \(2\)"),
        (dict(train_batch_size=1, train_gradient_accumulation_steps=4), r"samples per epoch \(2\) must be divisible"),
        (dict(resume_from="save/checkpoints/checkpoint_3"), r"checkpoints of TRL's DDPOTrainer .*load_lora_weights"),
    ],
)
def test_what_ddpo_refused_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        quick_config(**settings).to_nft_config()


def test_a_bare_tensor_reward_says_what_to_return(pretrained_model, tmp_path):
    def bare(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    config = quick_config(logdir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"must return a pair \(rewards, reward_metadata\), e.g. `return rewards, \{\}`"
    ):
        DDPOTrainer(config, bare, lambda: ("a cat", {}), DefaultDDPOStableDiffusionPipeline(pretrained_model))
