"""`DDPOConfig.log_with` as TRL 0.23's DDPOTrainer took it (accelerate's `Accelerator(log_with=...)`): a tracker name,
a list of names, `GeneralTracker` instances or a mixture. The hook gets the first tracker, started; the trainer's
metrics reach every tracker."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.tracking import GeneralTracker, TensorBoardTracker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations import TensorBoardCallback

from trl_nft import build_tiny_sd

# The only change to the DDPO script: `from trl import ...` becomes `from trl_nft.ddpo import ...`.
from trl_nft.ddpo import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


ANIMALS = ["cat", "dog", "horse"]


# Verbatim from trl 0.23's examples/scripts/ddpo.py.
def image_outputs_logger(image_data, global_step, accelerate_logger):
    # For the sake of this example, we will only log the last batch of images
    # and associated data
    result = {}
    images, prompts, _, rewards, _ = image_data[-1]

    for i, image in enumerate(images):
        prompt = prompts[i]
        reward = rewards[i].item()
        result[f"{prompt:.25} | {reward:.2f}"] = image.unsqueeze(0).float()

    accelerate_logger.log_images(
        result,
        step=global_step,
    )


class RecordingTracker(GeneralTracker):
    """A custom accelerate tracker, as a DDPO user would write one: it keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.started = False
        self.config = None
        self.logs: list[tuple[int, dict]] = []
        self.images: list[tuple[int, bool, dict]] = []  # (step, started by then, {key: image shape})

    @property
    def tracker(self):
        return self

    def start(self):
        self.started = True

    def store_init_configuration(self, values: dict):
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logs.append((step, dict(values)))

    def log_images(self, values: dict, step: int | None = None, **kwargs):
        self.images.append((step, self.started, {key: tuple(image.shape) for key, image in values.items()}))


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_sd().save_pretrained(str(path))
    return str(path)


def brightness_scorer(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def prompt_fn():
    return ANIMALS[torch.randint(len(ANIMALS), (1,)).item()], {}


def fast_config(**overrides) -> DDPOConfig:
    """A DDPO config for a run of seconds: one prompt group of 2 images per epoch, 2 sampling steps, one trained."""
    defaults = dict(
        num_epochs=1,
        sample_num_steps=2,
        sample_batch_size=2,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        train_timestep_fraction=0.5,
    )
    return DDPOConfig(**{**defaults, **overrides})


def logged_rewards(trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["reward"]) for entry in trainer.state.log_history if "reward" in entry]


def test_a_custom_tracker_gets_the_hooks_images_and_the_trainers_metrics(pretrained_model, tmp_path):
    # ---- as written for DDPO, with a custom tracker ----
    tracker = RecordingTracker()
    config = fast_config(num_epochs=2, log_with=[tracker], project_kwargs={"project_dir": str(tmp_path / "save")})
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    trainer = DDPOTrainer(config, brightness_scorer, prompt_fn, pipeline, image_samples_hook=image_outputs_logger)
    trainer.train()
    # ---- end of the DDPO script ----

    assert trainer.accelerator.trackers == [tracker]
    assert tracker.config["ddpo_trainer_config"]["num_epochs"] == 2  # DDPO's `init_trackers(config=...)` layout
    assert tracker.config["ddpo_trainer_config"]["log_with"] == "recording"
    # The hook's images, one call per rollout, with the tracker already started.
    assert [(step, started) for step, started, _ in tracker.images] == [(0, True), (1, True)]
    for _, _, images in tracker.images:
        assert images and all(key.split(" | ")[0] in ANIMALS for key in images)
        assert all(shape == (1, 3, 64, 64) for shape in images.values())
    # The trainer's metrics, at the optimizer step, as the trainer logged them.
    metrics = [(step, logs) for step, logs in tracker.logs if "reward" in logs]
    assert [(step, logs["reward"]) for step, logs in metrics] == logged_rewards(trainer) and len(metrics) == 2
    assert all("loss" in logs and "rewards/brightness_scorer/mean" in logs for _, logs in metrics)


def test_trl_examples_hook_writes_images_to_tensorboard(pretrained_model, tmp_path):
    # ---- as written for DDPO (trl 0.23 examples/scripts/ddpo.py, its project_kwargs in a temporary folder) ----
    config = fast_config(log_with="tensorboard", tracker_project_name="stable_diffusion_training")
    config.project_kwargs = {
        "logging_dir": str(tmp_path / "logs"),
        "automatic_checkpoint_naming": True,
        "total_limit": 5,
        "project_dir": str(tmp_path / "save"),
    }
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    trainer = DDPOTrainer(config, brightness_scorer, prompt_fn, pipeline, image_samples_hook=image_outputs_logger)
    trainer.train()
    # ---- end of the DDPO script ----

    assert trainer.args.output_dir == str(tmp_path / "save")
    # accelerate's TensorBoardTracker writes to `logging_dir/tracker_project_name`.
    events = EventAccumulator(str(tmp_path / "logs" / "stable_diffusion_training")).Reload()
    image_tags = events.Tags()["images"]
    assert image_tags and all(tag.split(" | ")[0] in ANIMALS for tag in image_tags)
    assert all([event.step for event in events.Images(tag)] == [0] for tag in image_tags)
    assert "reward" in events.Tags()["scalars"] and "loss" in events.Tags()["scalars"]
    assert [(event.step, pytest.approx(event.value)) for event in events.Scalars("reward")] == logged_rewards(trainer)


def test_names_and_trackers_mix_and_the_hook_gets_the_first(pretrained_model, tmp_path):
    recorder = RecordingTracker()
    hook_trackers = []
    config = fast_config(log_with=["tensorboard", recorder], logdir=str(tmp_path / "run"))
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    trainer = DDPOTrainer(
        config,
        brightness_scorer,
        prompt_fn,
        pipeline,
        image_samples_hook=lambda data, step, t: hook_trackers.append(t),
    )
    trainer.train()

    assert [tracker.name for tracker in trainer.accelerator.trackers] == ["tensorboard", "recording"]
    assert hook_trackers == [trainer.accelerator.trackers[0]]
    assert [(step, logs["reward"]) for step, logs in recorder.logs if "reward" in logs] == logged_rewards(trainer)
    # Without a logging directory (DDPO raised for TensorBoard), trackers log under output_dir.
    events = EventAccumulator(str(tmp_path / "run" / "trl")).Reload()
    assert "reward" in events.Tags()["scalars"]


def test_a_list_of_names_with_tracker_and_accelerator_kwargs(pretrained_model, tmp_path):
    config = fast_config(
        log_with=["tensorboard"],
        tracker_project_name="project",
        tracker_kwargs={"tensorboard": {"filename_suffix": ".ddpo"}},
        accelerator_kwargs={"project_dir": str(tmp_path / "save")},  # as `Accelerator(project_dir=...)`
    )
    trainer = DDPOTrainer(config, brightness_scorer, prompt_fn, DefaultDDPOStableDiffusionPipeline(pretrained_model))

    (tracker,) = trainer.accelerator.trackers
    assert isinstance(tracker, TensorBoardTracker) and tracker.logging_dir == str(tmp_path / "save" / "project")
    assert trainer.args.output_dir == str(tmp_path / "save")
    tracker.log({"check": 1.0}, step=0)  # started: its writer is open
    assert [path.name.endswith(".ddpo") for path in (tmp_path / "save" / "project").glob("events.out.*")] == [True]
    # transformers' own TensorBoard integration stays off: it would log the same scalars to a second folder.
    assert not any(isinstance(callback, TensorBoardCallback) for callback in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    "log_with, message",
    [
        ("tensorbord", r"log_with='tensorbord': 'tensorbord' is not a tracker\. Use one of all, aim, tensorboard"),
        (["tensorboard", "nope"], r"log_with=\['tensorboard', 'nope'\]: 'nope' is not a tracker"),
        (RecordingTracker, r"is not a tracker\. .* or instances of `accelerate\.tracking\.GeneralTracker`"),
    ],
)
def test_a_bad_log_with_says_what_it_takes(pretrained_model, log_with, message):
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    with pytest.raises(ValueError, match=message):
        DDPOTrainer(fast_config(log_with=log_with), brightness_scorer, prompt_fn, pipeline)


def test_trl_examples_hook_logs_to_wandb_offline(pretrained_model, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = fast_config(
        num_epochs=2, log_with="wandb", tracker_kwargs={"wandb": {"name": "ddpo-port"}}, logdir=str(tmp_path)
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(pretrained_model)
    trainer = DDPOTrainer(config, brightness_scorer, prompt_fn, pipeline, image_samples_hook=image_outputs_logger)
    trainer.train()

    run = trainer.accelerator.get_tracker("wandb", unwrap=True)
    assert run is wandb.run and run.name == "ddpo-port"
    assert run.config["ddpo_trainer_config"]["num_epochs"] == 2
    # W&B commits a step's row once a later step is logged: here the metrics of step 1 and the images of the
    # rollout after it (the last step's row is committed when the run finishes).
    first_step, first_reward = logged_rewards(trainer)[0]
    assert first_step == 1 and run.summary["reward"] == pytest.approx(first_reward)
    assert any(key.split(" | ")[0] in ANIMALS for key in run.summary.keys())  # the hook's images
    trainer.accelerator.end_training()


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate.tracking import GeneralTracker
    from trl_nft.ddpo import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    class RecordingTracker(GeneralTracker):
        name, requires_logging_directory, tracker = "recording", False, None

        def __init__(self):
            super().__init__()
            self.images, self.logs = [], []

        def log(self, values, step=None, **kwargs):
            self.logs.append(step)

        def log_images(self, values, step=None, **kwargs):
            self.images.append(step)

    hook_trackers = []

    def image_outputs_logger(image_data, global_step, accelerate_logger):  # trl 0.23's example, shortened
        images, prompts, _, rewards, _ = image_data[-1]
        result = {f"{prompts[i]:.25} | {rewards[i].item():.2f}": image.unsqueeze(0) for i, image in enumerate(images)}
        hook_trackers.append(accelerate_logger is tracker)
        accelerate_logger.log_images(result, step=global_step)

    tracker = RecordingTracker()
    config = DDPOConfig(
        num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
        train_timestep_fraction=0.5, logdir=sys.argv[2], log_with=[tracker],
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(sys.argv[1])
    trainer = DDPOTrainer(
        config, lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}), lambda: ("a cat", {}), pipeline,
        image_samples_hook=image_outputs_logger,
    )
    trainer.train()
    records = {"hook": hook_trackers, "images": tracker.images, "logged_steps": sorted(set(tracker.logs))}
    with open(f"{sys.argv[2]}/rank{trainer.accelerator.process_index}.json", "w") as f:
        json.dump(records, f)
    trainer.accelerator.wait_for_everyone()  # no rank tears down the group while another still uses it
    torch.distributed.destroy_process_group()
    """
)


def test_with_two_processes_the_main_one_logs_and_the_hook_runs_on_both(pretrained_model, tmp_path):
    script = tmp_path / "ddpo.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    # As `accelerate launch --cpu`: the processes form a CPU (gloo) group.
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        command + [pretrained_model, str(tmp_path)], capture_output=True, text=True, timeout=600, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert main == {"hook": [True], "images": [0], "logged_steps": [1]}
    # accelerate keeps trackers on the main process only: elsewhere the hook runs too, and what it logs is dropped.
    assert other == {"hook": [False], "images": [], "logged_steps": []}
