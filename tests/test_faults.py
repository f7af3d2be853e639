"""Faults during training, injected: a reward that raises, times out or returns NaN (under each failure policy), a
non-finite loss, and running out of memory. Each has a policy and a logged count; nothing is scored 0 silently."""

import time

import pytest
import torch

from trl_nft import DiffusionNFTTrainer


def _jpeg_like(images, prompts, **columns):
    return [float(image.getpixel((0, 0))[0]) for image in images]


class FlakyReward:
    """A reward whose calls misbehave as scripted: `script[k]` says what the k-th call does ("ok", "raise", "slow",
    "nan"); calls past the script are fine. The trainer's first call (its check of the reward at construction) is
    call 0."""

    def __init__(self, *script: str):
        self.script, self.calls = script, 0
        self.__name__ = "flaky"

    def __call__(self, images, prompts, **columns):
        action = self.script[self.calls] if self.calls < len(self.script) else "ok"
        self.calls += 1
        if action == "raise":
            raise ConnectionError("the reward model's server went away")
        if action == "slow":
            time.sleep(1.0)
        values = _jpeg_like(images, prompts)
        if action == "nan":
            values[0] = float("nan")
        return values


def _trainer(make_config, prompts_dataset, reward, **overrides):
    # Two chunks of 4 images per rollout (one optimizer step of two micro-steps): a fault can hit one chunk.
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, reward_retry_backoff=0.0)
    config = make_config(**{**settings, **overrides})
    return DiffusionNFTTrainer("tiny-sd3", reward, args=config, train_dataset=prompts_dataset)


def _logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_a_reward_that_raises_stops_the_run_by_default_naming_it(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, FlakyReward("ok", "raise"))
    with pytest.raises(ConnectionError, match="the reward model's server went away") as error:  # its own error
        trainer.train()
    assert "Reward function 'flaky' failed (reward_failure_policy='fail'" in error.value.__notes__[0]


def test_retry_recovers_from_a_failed_call_and_counts_it(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, FlakyReward("ok", "raise"), reward_failure_policy="retry")
    trainer.train()
    assert trainer.state.global_step == 2
    assert _logged(trainer, "faults/reward_retries") == [1.0, 0.0]
    assert _logged(trainer, "faults/dropped_samples") == [0.0, 0.0]


def test_retry_gives_up_after_its_retries_with_a_clear_error(make_config, prompts_dataset):
    reward = FlakyReward("ok", "raise", "raise", "raise")
    trainer = _trainer(make_config, prompts_dataset, reward, reward_failure_policy="retry", reward_retries=2)
    with pytest.raises(ConnectionError) as error:
        trainer.train()
    assert "Reward function 'flaky' failed after 2 retries (reward_failure_policy='retry'" in error.value.__notes__[0]
    assert reward.calls == 4  # the check, then the first chunk's call and its two retries


def test_drop_leaves_the_samples_it_cannot_score_out_of_the_update(make_config, prompts_dataset):
    # The first chunk of the first rollout fails even after its retry: its 4 images are dropped, the other 4 train.
    reward = FlakyReward("ok", "raise", "raise")
    trainer = _trainer(make_config, prompts_dataset, reward, reward_failure_policy="drop", reward_retries=1)
    weights, prepare = [], trainer._prepare_inputs

    def recording(inputs):
        batch = prepare(inputs)
        weights.append(batch["sample_weights"].tolist())
        return batch

    trainer._prepare_inputs = recording
    trainer.train()
    assert trainer.state.global_step == 2
    assert _logged(trainer, "faults/dropped_samples") == [4.0, 0.0]
    assert weights[0] == [0.0] * 4 and weights[1] == [1.0] * 4  # the dropped micro-batch trains nothing
    assert all(value == 1.0 for batch in weights[2:] for value in batch)


def test_a_reward_that_times_out_fails_or_is_retried(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, FlakyReward("ok", "slow"), reward_timeout=0.2)
    with pytest.raises(TimeoutError, match=r"took longer than reward_timeout=0.2 s") as error:
        trainer.train()
    assert "Reward function 'flaky' failed" in error.value.__notes__[0]
    policy = dict(reward_timeout=0.2, reward_failure_policy="retry")
    trainer = _trainer(make_config, prompts_dataset, FlakyReward("ok", "slow"), **policy)
    trainer.train()
    assert _logged(trainer, "faults/reward_retries")[0] == 1.0


def test_a_nan_reward_fails_by_default_and_is_dropped_under_drop(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, FlakyReward("ok", "nan"))
    with pytest.raises(ValueError, match=r"'flaky' returned nan for image 0 .*reward_failure_policy='drop'"):
        trainer.train()
    trainer = _trainer(make_config, prompts_dataset, FlakyReward("ok", "nan"), reward_failure_policy="drop")
    trainer.train()
    assert _logged(trainer, "faults/dropped_samples") == [1.0, 0.0]
    assert all(torch.isfinite(torch.tensor(_logged(trainer, "reward"))))


def test_a_rollout_with_every_sample_dropped_stops_the_run(make_config, prompts_dataset):
    reward = FlakyReward("ok", "raise", "raise", "raise", "raise")
    trainer = _trainer(make_config, prompts_dataset, reward, reward_failure_policy="drop", reward_retries=1)
    with pytest.raises(RuntimeError, match="dropped every sample of the rollout"):
        trainer.train()


def test_a_step_with_non_finite_gradients_is_skipped_and_counted(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, _jpeg_like, max_steps=3)
    compute_loss, calls = trainer.compute_loss, []

    def nan_at_the_second_step(model, inputs, **kwargs):
        loss = compute_loss(model, inputs, **kwargs)
        calls.append(trainer.state.global_step)
        return loss * float("nan") if trainer.state.global_step == 1 else loss

    snapshots = []
    trainer.compute_loss = nan_at_the_second_step
    on_step_end = trainer.callback_handler.on_step_end

    def record(args, state, control):
        snapshots.append([param.detach().clone() for param in trainer.policies.trained])
        return on_step_end(args, state, control)

    trainer.callback_handler.on_step_end = record
    trainer.train()
    assert trainer.state.global_step == 3
    assert _logged(trainer, "faults/nonfinite_steps_skipped") == [0.0, 1.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1], strict=True))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True))  # step 3 trained
    assert all(torch.isfinite(param).all() for param in trainer.policies.trained)


def test_too_many_non_finite_steps_in_a_row_stop_the_run(make_config, prompts_dataset):
    trainer = _trainer(make_config, prompts_dataset, _jpeg_like, max_steps=5, max_nonfinite_steps=1)
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kwargs: compute_loss(model, inputs, **kwargs) * float("inf")
    with pytest.raises(
        RuntimeError, match=r"not finite .* for 2 optimizer steps in a row, more than max_nonfinite_steps=1"
    ):
        trainer.train()
    assert trainer.state.global_step == 1  # the first was skipped, the second stopped the run


def test_out_of_memory_names_the_setting_to_lower(make_config, prompts_dataset):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer = _trainer(make_config, prompts_dataset, _jpeg_like)
    trainer.adapter.sample = out_of_memory
    with pytest.raises(
        torch.OutOfMemoryError,
        match=r"during the rollout\. .*4 images at a time: lower per_device_rollout_batch_size.*2\.00 GiB",
    ):
        trainer.train()
    trainer = _trainer(make_config, prompts_dataset, _jpeg_like)
    trainer.adapter.predict_velocity = out_of_memory  # used by the training forwards only
    with pytest.raises(torch.OutOfMemoryError, match=r"during the training step\. .*activation_checkpointing=True"):
        trainer.train()
