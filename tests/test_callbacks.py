"""Watching a run: sample grids on disk and in TensorBoard, early stopping at a target reward, the reward-hacking
guard."""

import copy
import sys
import types

import pytest
from PIL import Image
from transformers import TrainerCallback, TrainerControl, TrainerState

from trl_nft import DiffusionNFTTrainer
from trl_nft.callbacks import RewardHackingGuardCallback, SampleLoggingCallback, sample_grid, spread_over_prompts


def test_sample_grids_land_on_disk_and_in_tensorboard_at_transformers_step(
    make_config, prompts_dataset, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(report_to="tensorboard", sample_logging_steps=1, sample_logging_num_images=3)
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    saved = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [path.name for path in saved] == ["step_000001.png", "step_000002.png"]
    grid = Image.open(saved[0])
    assert grid.width == 3 * 128 and grid.height == 128 + 36  # 3 images in a row, enlarged, under their captions
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("train/samples")] == [1, 2]

    # W&B and Trackio get the grid as transformers' callbacks log the metrics: with `train/global_step`, and no
    # explicit `step=`, which can run ahead of the tracker's own step (W&B then drops the metrics logged after it).
    logged = []
    for name in ("wandb", "trackio"):
        tracker = types.SimpleNamespace(run=object(), Image=lambda image: image, Video=lambda path: path)
        tracker.log = lambda data, name=name, **kwargs: logged.append((name, sorted(data), data, kwargs))
        monkeypatch.setitem(sys.modules, name, tracker)
    args = copy.copy(trainer.args)
    args.report_to = ["wandb", "trackio"]
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SampleLoggingCallback))
    callback.on_step_end(args, trainer.state, trainer.control)
    assert [(name, keys, kwargs) for name, keys, _, kwargs in logged] == [
        ("wandb", ["train/global_step", "train/samples"], {}),
        ("trackio", ["train/global_step", "train/samples"], {}),
    ]
    assert all(data["train/global_step"] == 2 and data["train/samples"].size == grid.size for *_, data, _ in logged)


def test_sample_logging_can_be_switched_off(make_config, prompts_dataset, tmp_path):
    config = make_config(sample_logging_steps=0)
    DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset).train()
    assert not (tmp_path / "run" / "samples").exists()


def test_early_stopping_at_a_target_reward(make_config, prompts_dataset):
    config = make_config(max_steps=5, early_stopping_reward=0.0)  # JPEG sizes are positive: reached at once
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    assert trainer.state.global_step == 1


def test_sample_grid_layout():
    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(6)]
    grid = sample_grid(images, [f"prompt {i}" for i in range(6)], [float(i) for i in range(6)], columns=4)
    assert grid.size == (4 * 128, 2 * (128 + 36))  # 32 px images enlarged 4 times, pixel for pixel
    assert grid.getpixel((128 + 5, 36 + 5)) == (40, 0, 0)  # the second image, below its caption
    assert sample_grid(images[:1], ["p"], [0.0]).size == (128, 128 + 36)
    assert sample_grid([Image.new("RGB", (200, 100))], ["p"], [0.0]).size == (200, 100 + 36)  # wide enough as is


def test_sample_grids_show_one_image_per_prompt_first():
    prompts = ["zero"] * 3 + ["one"] * 3 + ["two"] * 3
    assert [prompts[i] for i in spread_over_prompts(4, prompts)] == ["zero", "one", "two", "zero"]


def _guard_run(history, patience=2, stop=True, threshold=0.0):
    """Feed (training reward, held-out value) pairs, one evaluation each; return the step at which training stops,
    else the steps at which the guard warned (None if it never did)."""
    guard = RewardHackingGuardCallback("eval_rewards/judge/mean", patience=patience, stop=stop, threshold=threshold)
    for step, (train_reward, held_out) in enumerate(history, start=1):
        control, state = TrainerControl(), TrainerState(global_step=step)
        guard.on_log(None, state, control, logs={"reward": train_reward})
        guard.on_evaluate(None, state, control, metrics={"eval_rewards/judge/mean": held_out})
        if control.should_training_stop:
            return step
    return guard.triggered_steps or None


def test_reward_hacking_guard_rule():
    # Held-out below its best (0.5 at step 1) while training reward is above its value then: strikes at 2 and 3.
    assert _guard_run([(1.0, 0.5), (1.2, 0.4), (1.5, 0.3), (1.6, 0.2)]) == 3
    assert _guard_run([(1.0, 0.5), (1.2, 0.4), (1.5, 0.3)], patience=3) is None
    # Both falling is not hacking; a new held-out best resets the count.
    assert _guard_run([(1.0, 0.5), (0.9, 0.4), (0.8, 0.3)]) is None
    assert _guard_run([(1.0, 0.5), (1.2, 0.4), (1.3, 0.6), (1.4, 0.5)]) is None
    # With a threshold, dips within it are noise: no strike, and they break a run of strikes.
    assert _guard_run([(1.0, 0.5), (1.2, 0.46), (1.5, 0.46), (1.6, 0.3)], threshold=0.05) is None
    assert _guard_run([(1.0, 0.5), (1.2, 0.44), (1.5, 0.44)], threshold=0.05) == 3
    # "warn" never stops; it warns at each evaluation while the strikes continue.
    assert _guard_run([(1.0, 0.5), (1.2, 0.4), (1.5, 0.3), (1.6, 0.2)], stop=False) == [3, 4]


@pytest.mark.parametrize(("threshold", "stop_step"), [(0.0, 3), (1.5, 4)])
def test_reward_hacking_guard_stops_a_run_whose_held_out_reward_falls(
    make_config, prompts_dataset, caplog, threshold, stop_step
):
    state = {"judge_calls": 0, "step": 0}

    def rising(images, prompts, **kwargs):  # a training reward that rises step after step
        return [float(state["step"]) + 0.01 * i for i in range(len(images))]

    def judge(images, prompts, **kwargs):  # a held-out judge that falls at each evaluation
        state["judge_calls"] += 1
        return [-float(state["judge_calls"])] * len(images)

    class CountSteps(TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, **kwargs):
            state["step"] = trainer_state.global_step + 1

    config = make_config(
        max_steps=6,
        eval_strategy="steps",
        eval_steps=1,
        reward_hacking_guard="stop",
        reward_hacking_threshold=threshold,
    )
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        rising,
        args=config,
        train_dataset=prompts_dataset,
        eval_dataset=prompts_dataset.select(range(2)),
        eval_reward_funcs=judge,
        callbacks=[CountSteps()],
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    # The judge reads -2 at step 1 (its best), then 1 lower at each step: strikes at steps 2 and 3, or with a threshold
    # of 1.5 at steps 3 and 4 (the first fall, 1, is within it).
    assert trainer.state.global_step == stop_step
    assert f"Possible reward hacking at step {stop_step}: eval_rewards/judge/mean" in caplog.text
    evaluations = [entry for entry in trainer.state.log_history if "eval_reward" in entry]
    expected = [-2.0 - step for step in range(stop_step)]  # judge call 1 is the trainer's probe
    assert [entry["eval_rewards/judge/mean"] for entry in evaluations] == expected


def test_unknown_reward_hacking_metric_lists_the_known_ones(make_config, prompts_dataset):
    config = make_config(reward_hacking_metric="eval_rewards/nope/mean")
    with pytest.raises(ValueError, match=r"reward_hacking_metric='eval_rewards/nope/mean'.*eval_reward"):
        DiffusionNFTTrainer(
            "tiny-sd3",
            "jpeg_incompressibility",
            args=config,
            train_dataset=prompts_dataset,
            eval_dataset=prompts_dataset.select(range(2)),
        )
