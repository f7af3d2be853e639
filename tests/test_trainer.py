"""DiffusionNFTTrainer on the embedded tiny SD3 model: the loop, saving, resuming and bad input."""

import math
import threading

import numpy as np
import pytest
import safetensors.torch
import torch
from datasets import Dataset
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import offload_models
from transformers import TrainerCallback

from trl_nft import DiffusionNFTTrainer, build_tiny_sd3, nft_trainer
from trl_nft.objective import NOISE_LEVEL_BUCKETS
from trl_nft.prompt_cache import PromptEmbeddingCache


def test_train_logs_the_documented_metrics(make_config, prompts_dataset):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_incompressibility", args=make_config(), train_dataset=prompts_dataset
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logs) == 2
    for key in [
        "loss",
        "grad_norm",
        "reward",
        "reward_std",
        "rewards/jpeg_incompressibility/mean",
        "loss/positive",
        "loss/negative",
        "loss/kl",
        "loss/velocity_norm",
        "optimality/mean",
        "frac_reward_zero_std",
        "old_policy_decay",
        "rollout/images_per_second",
        "train/sample_steps_per_second",
        "velocity_norm_ratio",
    ]:
        assert key in logs[0] and math.isfinite(logs[0][key]), key
    assert [entry["old_policy_decay"] for entry in logs] == [0.001, 0.002]
    # The first micro-step trains the initial policy, which is the reference: the ratio is 1 at every noise level.
    buckets = [key for key in logs[0] if key.startswith("velocity_norm_ratio/")]
    assert buckets and set(buckets) <= {f"velocity_norm_ratio/{name}" for name in NOISE_LEVEL_BUCKETS}
    assert all(logs[0][key] == pytest.approx(1.0, abs=1e-5) for key in ["velocity_norm_ratio", *buckets])


def test_trained_adapter_changes_and_old_adapter_follows_its_schedule(make_config, prompts_dataset):
    config = make_config(old_policy_decay_schedule="constant", old_policy_decay_max=0.75, max_steps=1)
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    before = [p.detach().clone() for p in trainer.policies.trained]
    trainer.train()
    after = trainer.policies.trained
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # One step from a shared start: old = 0.75 old + 0.25 new.
    for old, start, new in zip(trainer.policies.old, before, after, strict=True):
        torch.testing.assert_close(old, 0.75 * start + 0.25 * new.detach())


def test_several_optimizer_steps_per_rollout_share_one_old_policy(make_config, prompts_dataset):
    # 8 images per micro-step, 4 micro-steps per rollout, 2 per optimizer step: 32-image rollouts, 2 steps each.
    config = make_config(
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        old_policy_decay_schedule="constant",
        old_policy_decay_max=0.5,
        max_steps=4,
    )
    rollouts, old_policy_at_step_end = [], []
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trained = [p.detach().clone() for p in trainer.policies.trained]
            old = [p.detach().clone() for p in trainer.policies.old]
            old_policy_at_step_end.append((trained, old))

    generate = trainer._generate_and_score

    def counted(rows):
        rollouts.append([row["prompt"] for row in rows])
        return generate(rows)

    trainer._generate_and_score = counted
    trainer.add_callback(Watch())  # runs after the soft updates
    start = [p.detach().clone() for p in trainer.policies.trained]
    trainer.train()

    assert len(rollouts) == 2 and all(len(prompts) == 32 for prompts in rollouts)
    for prompts in rollouts:  # whole groups: 8 prompts, 4 images each
        assert sorted(prompts.count(p) for p in set(prompts)) == [4] * 8
    # The old policy stays the sampling policy within a rollout and is soft-updated once, after its last step.
    (trained_1, old_1), (trained_2, old_2), _, (trained_4, old_4) = old_policy_at_step_end
    for old, initial in zip(old_1, start, strict=True):
        torch.testing.assert_close(old, initial)
    for old, initial, trained in zip(old_2, start, trained_2, strict=True):
        torch.testing.assert_close(old, 0.5 * initial + 0.5 * trained)
    assert any(not torch.equal(a, b) for a, b in zip(trained_1, trained_2, strict=True))
    for old, previous, trained in zip(old_4, old_2, trained_4, strict=True):
        torch.testing.assert_close(old, 0.5 * previous + 0.5 * trained)


def test_negative_loss_switch_reaches_the_loss(make_config, prompts_dataset):
    def first_log(**overrides):
        trainer = DiffusionNFTTrainer(
            "tiny-sd3",
            "jpeg_incompressibility",
            args=make_config(max_steps=1, **overrides),
            train_dataset=prompts_dataset,
        )
        trainer.train()
        return next(entry for entry in trainer.state.log_history if "loss" in entry)

    full, ablated = first_log(), first_log(negative_loss=False)
    # Same rollout and same loss parts; only the weighting of the negative part differs.
    assert ablated["loss/positive"] == pytest.approx(full["loss/positive"])
    assert ablated["loss/negative"] == pytest.approx(full["loss/negative"])
    assert ablated["loss"] < full["loss"]


def test_filtered_groups_train_nothing_and_are_counted(make_config, prompts_dataset, caplog):
    """Two groups of four per step: the first is flat (all 0.5), the second spread. With the filter the flat group's
    samples get weight 0; when every group is flat the step's policy loss is 0 and a warning says why."""

    def half_flat(images, prompts, **columns):  # the rollout scores its 8 images at once
        return [0.5] * 4 + [0.0, 1.0, 0.0, 1.0] if len(images) == 8 else [0.5] * len(images)

    def all_flat(images, prompts, **columns):
        return [0.5] * len(images)

    def train(reward, **filters):
        config = make_config(max_steps=1, per_device_train_batch_size=8, kl_coef=0.0, **filters)
        trainer = DiffusionNFTTrainer("tiny-sd3", reward, args=config, train_dataset=prompts_dataset)
        weights, original = [], trainer._generate_and_score

        def generate_and_score(rows):
            rollout = original(rows)
            weights.append(rollout["sample_weights"])
            return rollout

        trainer._generate_and_score = generate_and_score
        trainer.train()
        log = next(entry for entry in trainer.state.log_history if "loss" in entry)
        return weights[0].tolist(), log

    weights, log = train(half_flat, group_filter_min_reward_std=0.05)
    assert weights == [0.0] * 4 + [1.0] * 4 and log["frac_groups_filtered"] == 0.5
    weights, log = train(half_flat)
    assert weights == [1.0] * 8 and log["frac_groups_filtered"] == 0.0
    with caplog.at_level("WARNING"):
        weights, log = train(all_flat, group_filter_min_reward_std=0.05)
    assert weights == [0.0] * 8 and log["frac_groups_filtered"] == 1.0
    assert log["loss/positive"] > 0 and log["loss"] == 0.0
    assert "Every group of this rollout was filtered out" in caplog.text


def test_extra_columns_reach_the_reward_functions_aligned_with_prompts(make_config):
    dataset = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(8)], "target": list(range(8))})
    seen = []

    def reward(images, prompts, target, **kwargs):
        assert all(prompt == f"prompt {value}" for prompt, value in zip(prompts, target, strict=True))
        seen.append(list(target))
        return [float(value) for value in target]

    DiffusionNFTTrainer("tiny-sd3", reward, args=make_config(max_steps=1), train_dataset=dataset).train()
    # The probe scores 2 rows at construction; each rollout scores 4 images of one prompt (num_generations=4).
    rollout = seen[-1]
    assert len(rollout) == 4 and len(set(rollout)) == 1


def test_weighted_rewards_combine_and_log_per_function(make_config, prompts_dataset):
    def one(images, prompts, **kwargs):
        return [1.0] * len(images)

    def two(images, prompts, **kwargs):
        return [2.0 if i % 2 else None for i in range(len(images))]  # None: not applicable

    config = make_config(max_steps=1, reward_weights=[0.5, 3.0])
    trainer = DiffusionNFTTrainer("tiny-sd3", [one, two], args=config, train_dataset=prompts_dataset)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["rewards/one/mean"] == 1.0 and log["rewards/two/mean"] == 2.0
    assert log["reward"] == pytest.approx(0.5 + 0.5 * 6.0)  # half the images get 0.5, half 0.5 + 6


@pytest.mark.parametrize(
    "sampler",
    ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", FlowMatchEulerDiscreteScheduler(shift=3.0)],
)
def test_any_flow_sampler_by_name_or_instance(make_config, prompts_dataset, sampler):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_compressibility",
        args=make_config(max_steps=1, sampler=sampler),
        train_dataset=prompts_dataset,
    )
    trainer.train()
    expected = sampler if isinstance(sampler, str) else type(sampler).__name__
    assert type(trainer.pipeline.scheduler).__name__ == expected


def test_default_sampler_is_second_order_dpm_solver_on_flow_sigmas(make_config, prompts_dataset):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_compressibility", args=make_config(), train_dataset=prompts_dataset
    )
    config = trainer.pipeline.scheduler.config
    assert type(trainer.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (config.algorithm_type, config.solver_order) == ("dpmsolver++", 2)
    assert (config.use_flow_sigmas, config.prediction_type, config.flow_shift) == (True, "flow_prediction", 3.0)


def test_classifier_free_guidance_rollouts(make_config, prompts_dataset):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_compressibility",
        args=make_config(max_steps=1, guidance_scale=3.0),
        train_dataset=prompts_dataset,
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_prompt_embeddings_are_not_recomputed_while_training(make_config, prompts_dataset, monkeypatch):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_compressibility", args=make_config(), train_dataset=prompts_dataset
    )
    calls = []
    for encoder in trainer.adapter.text_encoders:
        encoder.register_forward_hook(lambda *args: calls.append(1))
    original = trainer._generate_and_score

    def count_rollouts(rows):
        count_rollouts.encoder_calls_before = len(calls)
        return original(rows)

    monkeypatch.setattr(trainer, "_generate_and_score", count_rollouts)
    trainer.train()
    # SD3 has three text encoders, each run once per rollout (two rollouts), never in the training step.
    assert len(calls) == 3 * 2


def test_the_prompt_embedding_cache_encodes_a_prompt_once_across_rollouts_and_changes_nothing(make_config):
    """Four prompts, one per rollout, eight rollouts: with room for all four, each is encoded once (SD3's three text
    encoders: 12 calls, not 24), and the run ends with the weights of a run that encodes every rollout anew."""
    dataset = Dataset.from_dict({"prompt": [f"a photo of object number {i}" for i in range(4)]})

    def run(cache_size: int) -> tuple[list[torch.Tensor], int, DiffusionNFTTrainer]:
        config = make_config(max_steps=8, learning_rate=1e-2, prompt_embedding_cache_size=cache_size)
        trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_compressibility", args=config, train_dataset=dataset)
        calls = []
        for encoder in trainer.adapter.text_encoders:
            encoder.register_forward_hook(lambda *args: calls.append(1))
        trainer.train()
        return [p.detach().clone() for p in trainer.policies.trained], len(calls), trainer

    cached, cached_calls, trainer = run(4)
    bounded, bounded_calls, bounded_trainer = run(2)
    fresh, fresh_calls, _ = run(0)
    assert (cached_calls, fresh_calls) == (3 * 4, 3 * 8)
    assert len(trainer._prompt_cache) == 4 and len(bounded_trainer._prompt_cache) == 2
    assert cached_calls < bounded_calls <= fresh_calls  # two kept: some prompts come back after being dropped
    for a, b, c in zip(cached, bounded, fresh, strict=True):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
        torch.testing.assert_close(b, c, atol=1e-6, rtol=0)


def test_offloaded_text_encoders_and_vae_are_on_the_device_exactly_while_sampling(
    make_config, prompts_dataset, monkeypatch
):
    """With `offload_text_encoders_and_vae`, every text-encoder and VAE call (rollouts, evaluation) happens while they
    are on the accelerator, and every training forward while they are in CPU memory. A CPU has one device, so the test
    follows where each module is asked to be: diffusers' `offload_models` is given an "accelerator" device, whose
    moves are recorded and skipped."""
    config = make_config(offload_text_encoders_and_vae=True, eval_strategy="steps", eval_steps=1)
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_compressibility", args=config, train_dataset=prompts_dataset, eval_dataset=prompts_dataset
    )
    offloaded = [*trainer.adapter.text_encoders, trainer.pipeline.vae]
    assert trainer._offloaded == offloaded
    where = {id(module): "cpu" for module in offloaded}  # moved out when the trainer was built

    def to_the_accelerator(*modules, device, offload):
        return offload_models(*modules, device="accelerator", offload=offload)

    monkeypatch.setattr(nft_trainer, "offload_models", to_the_accelerator)
    for module in offloaded:

        def recorded_to(device, module=module, to=module.to):
            where[id(module)] = str(device)
            return module if device == "accelerator" else to(device)

        module.to = recorded_to
    seen = {"encoding or decoding": [], "training": []}
    for encoder in trainer.adapter.text_encoders:
        encoder.register_forward_hook(lambda *args: seen["encoding or decoding"].append(set(where.values())))
    trainer.pipeline.vae.decoder.register_forward_hook(
        lambda *args: seen["encoding or decoding"].append(set(where.values()))
    )

    def training_forward(*args):
        if torch.is_grad_enabled():
            seen["training"].append(set(where.values()))

    trainer.adapter.denoiser.register_forward_hook(training_forward)
    trainer.train()
    # Two rollouts and two evaluations (3 encoders + the VAE each), two steps of 3 training times.
    assert len(seen["encoding or decoding"]) >= 4 * 4 and len(seen["training"]) == 2 * 3
    assert all(state == {"accelerator"} for state in seen["encoding or decoding"])
    assert all(state == {"cpu"} for state in seen["training"])


def test_the_prompt_embedding_cache_drops_the_least_recently_used_prompt():
    encoded = []

    def encode(prompts):
        encoded.append(list(prompts))
        return {"embeds": torch.tensor([[float(len(p)), float(ord(p[0]))] for p in prompts])}

    cache = PromptEmbeddingCache(capacity=2)
    first = cache.encode(["a", "bb"], encode)
    cache.encode(["a"], encode)  # "a" is now the most recently used
    cache.encode(["ccc"], encode)  # room for two: "bb" goes
    again = cache.encode(["bb", "a", "ccc"], encode)
    assert encoded == [["a", "bb"], ["ccc"], ["bb"]]
    assert torch.equal(again["embeds"][:2], first["embeds"].flip(0))
    assert torch.equal(again["embeds"][2], torch.tensor([3.0, float(ord("c"))]))
    assert len(cache) == 2


def test_the_rollout_batch_size_changes_how_many_images_are_sampled_at_once_not_which(make_config):
    """Each image's noise is keyed by its index in the rollout, so sampling 1 or 8 at a time gives the same images."""
    rows = [{"prompt": f"a photo of object number {i // 4}"} for i in range(8)]

    def rollout(rollout_batch_size: int | None) -> tuple[torch.Tensor, list[int]]:
        config = make_config(per_device_train_batch_size=8, per_device_rollout_batch_size=rollout_batch_size)
        trainer = DiffusionNFTTrainer(
            "tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=Dataset.from_list(rows)
        )
        sizes, sample = [], trainer.adapter.sample

        def recorded(conditioning, steps, resolution, generators):
            sizes.append(len(generators))  # one generator per image
            return sample(conditioning, steps, resolution, generators)

        trainer.adapter.sample = recorded
        return trainer._generate_and_score(rows)["latents"], sizes

    (one_at_a_time, sizes), (all_at_once, default_sizes) = rollout(1), rollout(None)
    assert sizes == [1] * 8 and default_sizes == [8]  # None: per_device_train_batch_size
    torch.testing.assert_close(one_at_a_time, all_at_once, atol=1e-5, rtol=0)
    assert one_at_a_time[0].sub(one_at_a_time[1]).abs().max() > 1e-2  # the same prompt, other noise: another image


def test_full_fine_tuning_uses_an_ema_old_policy(make_config, prompts_dataset, tmp_path):
    config = make_config(use_peft=False, max_steps=1, kl_coef=1e-2, learning_rate=1e-4)
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    trained = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(trained, start, strict=True))
    for old, first, new in zip(trainer.policies.old_model.parameters(), start, trained, strict=True):
        torch.testing.assert_close(old, 0.001 * first + 0.999 * new.detach())
    for ref, first in zip(trainer.policies.ref_model.parameters(), start, strict=True):
        assert torch.equal(ref, first)
    # What is saved is the EMA of the trained weights, whose decay is min(1 / 10, 0.9) after the first step.
    trainer.save_model(str(tmp_path / "full"))
    loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path / "full"), subfolder="transformer")
    for saved, first, new in zip(loaded.parameters(), start, trained, strict=True):
        torch.testing.assert_close(saved, 0.1 * first + 0.9 * new.detach())


def _policy_images(pipeline, prompts, seed=123):
    generator = torch.Generator().manual_seed(seed)
    return pipeline(
        prompts,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=generator,
        output_type="np",
        max_sequence_length=128,
    ).images


def test_saved_lora_reproduces_the_trained_policy_in_a_fresh_pipeline(make_config, prompts_dataset, tmp_path):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_incompressibility", args=make_config(learning_rate=1e-2), train_dataset=prompts_dataset
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    prompts = ["a photo of object number 3", "something else"]
    with trainer.policies.evaluation_weights():  # what is saved and evaluated: the EMA of the trained weights
        expected = _policy_images(trainer.pipeline, prompts)

    fresh = build_tiny_sd3()
    fresh.scheduler = trainer.pipeline.scheduler.__class__.from_config(trainer.pipeline.scheduler.config)
    fresh.set_progress_bar_config(disable=True)
    base = _policy_images(fresh, prompts)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = _policy_images(fresh, prompts)
    assert np.abs(loaded - base).max() > 1e-3, "training should have changed the policy"
    assert np.abs(loaded - expected).max() <= 1e-4


def _lora_weights(trainer):
    params = trainer.policies.trained + trainer.policies.old + trainer.policies.ema + trainer.policies.reference
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "overrides",
    # Refreshed at step 2, in the checkpoint: the resumed steps 3 and 4 train against it (a strong KL weighs it).
    [{}, {"reference_refresh_steps": 2, "kl_coef": 1.0}],
    ids=["base-reference", "refreshed-reference"],
)
def test_resume_matches_an_uninterrupted_run(make_config, prompts_dataset, tmp_path, overrides):
    common = dict(save_strategy="steps", save_steps=2, learning_rate=1e-2, gradient_accumulation_steps=2, **overrides)
    full = make_config(output_dir=str(tmp_path / "full"), max_steps=4, **common)
    uninterrupted = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=full, train_dataset=prompts_dataset)
    uninterrupted.train()

    first = make_config(output_dir=str(tmp_path / "parts"), max_steps=2, **common)
    DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=first, train_dataset=prompts_dataset).train()
    second = make_config(output_dir=str(tmp_path / "parts"), max_steps=4, **common)
    resumed = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=second, train_dataset=prompts_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))

    assert resumed.state.global_step == 4
    for a, b in zip(_lora_weights(resumed), _lora_weights(uninterrupted), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_a_refreshed_reference_is_the_policy_at_refresh_time(make_config, prompts_dataset, tmp_path, use_peft):
    """With `reference_refresh_steps=2` the reference is the initial policy until step 2, the trained policy of step 2
    from then on (its velocities are the trained policy's at that step), and the saved LoRA holds the trained adapter
    only."""
    config = make_config(
        use_peft=use_peft, reference_refresh_steps=2, kl_coef=1e-2, learning_rate=1e-2, ema_decay=0.0, max_steps=3
    )
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    initial = [p.detach().clone() for p in trainer.policies.trained]
    seen = {}

    class Watch(TrainerCallback):  # added after the trainer's own callbacks: sees the step's refresh done
        def on_step_end(self, args, state, control, **kwargs):
            trained = [p.detach().clone() for p in trainer.policies.trained]
            seen[state.global_step] = (trained, [p.detach().clone() for p in trainer.policies.reference])
            if state.global_step == 2:
                seen["velocities"] = _policy_and_reference_velocities(trainer)

    trainer.add_callback(Watch())
    trainer.train()

    for reference, first in zip(seen[1][1], initial, strict=True):
        assert torch.equal(reference, first)
    for step in (2, 3):  # the reference holds step 2's policy until the next refresh
        for reference, trained in zip(seen[step][1], seen[2][0], strict=True):
            assert torch.equal(reference, trained)
    assert any(not torch.equal(a, b) for a, b in zip(seen[3][0], seen[2][0], strict=True))
    policy, fused_reference, reference, base = seen["velocities"]
    torch.testing.assert_close(fused_reference, policy, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference, policy, atol=1e-5, rtol=0)
    assert (policy - base).abs().max() > 1e-3  # the policy has left the base model: the refresh changed something

    if use_peft:
        trainer.save_model(str(tmp_path / "lora"))
        saved = safetensors.torch.load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
        adapters = {name: p for name, p in trainer.model.named_parameters() if ".default." in name}
        assert len(saved) == len(adapters) == len(trainer.policies.reference)
        for name, param in adapters.items():
            assert torch.equal(saved["transformer." + name.replace(".default.", ".")], param.detach())


def _policy_and_reference_velocities(trainer):
    """On the latest rollout's latents: the trained policy's velocity, the reference's from the training step's frozen
    forwards and from `policies.acting_as_reference`, and the base model's (the initial policy's, from a fresh model)."""
    batch = trainer._buffered_inputs[0]
    conditioning, noisy = batch["conditioning"], torch.randn_like(batch["latents"])
    sigmas = torch.full((len(noisy),), 0.6)
    sample = {"noisy": noisy, "sigmas": sigmas}
    with torch.no_grad():
        policy = trainer.adapter.predict_velocity(trainer.model, noisy, sigmas, conditioning)
        trainer._frozen_velocities([sample], conditioning)
        with trainer.policies.acting_as_reference() as reference_model:
            reference = trainer.adapter.predict_velocity(reference_model, noisy, sigmas, conditioning)
        base = trainer.adapter.predict_velocity(build_tiny_sd3().transformer, noisy, sigmas, conditioning)
    return policy, sample["reference_velocity"], reference, base


def test_the_velocity_norm_penalty_reaches_the_loss_against_the_old_policy_without_kl(make_config, prompts_dataset):
    """A trained adapter pushed away from the old one (a larger velocity norm): with `kl_coef=0` the ratio is logged
    against the old policy, and the penalty adds its weight times the logged hinge to the loss."""

    def first_log(**overrides):
        config = make_config(max_steps=1, kl_coef=0.0, **overrides)
        trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in trainer.policies.trained:
                param.add_(torch.randn(param.shape, generator=generator), alpha=0.3)
        trainer.train()
        return next(entry for entry in trainer.state.log_history if "loss" in entry)

    plain, penalised = first_log(), first_log(velocity_norm_penalty=10.0)
    assert "velocity_norm_ratio" not in plain and plain["velocity_norm_ratio_to_old"] > 1.05
    assert plain["loss/velocity_norm"] > 0 and penalised["loss/velocity_norm"] == pytest.approx(
        plain["loss/velocity_norm"]
    )
    assert penalised["loss/positive"] == pytest.approx(plain["loss/positive"])
    assert penalised["loss"] == pytest.approx(plain["loss"] + 10.0 * plain["loss/velocity_norm"], rel=1e-5)


def test_evaluate_uses_the_same_noise_every_time(make_config, prompts_dataset):
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_incompressibility",
        args=make_config(),
        train_dataset=prompts_dataset,
        eval_dataset=prompts_dataset.select(range(3)),
    )
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_reward"] == second["eval_reward"]
    assert {"eval_reward", "eval_rewards/jpeg_incompressibility/mean"} <= set(first)


def test_periodic_evaluation_at_its_interval_with_its_own_steps_and_sampler(make_config, prompts_dataset):
    config = make_config(
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        eval_num_inference_steps=3,
        eval_sampler="FlowMatchEulerDiscreteScheduler",
    )
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_incompressibility",
        args=config,
        train_dataset=prompts_dataset,
        eval_dataset=prompts_dataset.select(range(3)),
    )
    calls, sample = [], trainer.adapter.sample

    def recording_sample(conditioning, num_inference_steps, *args):
        calls.append((type(trainer.pipeline.scheduler).__name__, num_inference_steps))
        return sample(conditioning, num_inference_steps, *args)

    trainer.adapter.sample = recording_sample
    trainer.train()
    evaluations = [entry["step"] for entry in trainer.state.log_history if "eval_reward" in entry]
    assert evaluations == [2, 4]
    assert set(calls) == {("DPMSolverMultistepScheduler", 4), ("FlowMatchEulerDiscreteScheduler", 3)}
    assert type(trainer.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"  # restored after evaluating


def test_ema_of_the_trained_weights_is_evaluated_and_the_trained_weights_restored(make_config, prompts_dataset):
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append([p.detach().clone() for p in trainer.policies.trained])

    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_incompressibility",
        args=make_config(learning_rate=1e-2),
        train_dataset=prompts_dataset,
        callbacks=[Snapshot()],
    )
    start = [p.detach().clone() for p in trainer.policies.trained]
    trainer.train()
    # The released warm-up: decay min((1 + s) / (10 + s), 0.9) at 0-based step s, i.e. 1/10 then 2/11.
    for ema, first, step1, step2 in zip(trainer.policies.ema, start, *snapshots, strict=True):
        after_one = 0.1 * first + 0.9 * step1
        torch.testing.assert_close(ema, 2 / 11 * after_one + 9 / 11 * step2)

    seen = []

    def probe(images, prompts, **kwargs):
        seen.append(
            all(torch.equal(p, e) for p, e in zip(trainer.policies.trained, trainer.policies.ema, strict=True))
        )
        return [0.0] * len(images)

    trainer.reward_funcs = [probe]
    trainer.evaluate(eval_dataset=prompts_dataset.select(range(2)))
    assert seen == [True]
    for param, trained in zip(trainer.policies.trained, snapshots[-1], strict=True):
        assert torch.equal(param, trained)


# ---------------------------------------------------------------- bad input: clear errors before any rollout


def _trainer(make_config, dataset, reward="jpeg_compressibility", **overrides):
    return DiffusionNFTTrainer("tiny-sd3", reward, args=make_config(**overrides), train_dataset=dataset)


def test_empty_dataset(make_config):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        _trainer(make_config, Dataset.from_dict({"prompt": []}))


def test_missing_prompt_column(make_config):
    with pytest.raises(ValueError, match=r"no 'prompt' column \(columns: \['text'\]\)"):
        _trainer(make_config, Dataset.from_dict({"text": ["a", "b"]}))


def test_dataset_smaller_than_one_step(make_config):
    dataset = Dataset.from_dict({"prompt": ["only one"]})
    with pytest.raises(ValueError, match="needs 2"):
        _trainer(make_config, dataset, per_device_train_batch_size=8)


def test_unknown_reward_name_lists_the_known_ones(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="Unknown reward 'aesthetics'.*jpeg_compressibility, jpeg_incompressibility"):
        _trainer(make_config, prompts_dataset, reward="aesthetics")


def test_reward_of_the_wrong_length_is_named(make_config, prompts_dataset):
    def short_reward(images, prompts, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="'short_reward' returned 1 values for 2 images"):
        _trainer(make_config, prompts_dataset, reward=short_reward)


def test_nan_reward_is_named(make_config, prompts_dataset):
    def nan_reward(images, prompts, **kwargs):
        return [float("nan")] * len(images)

    with pytest.raises(ValueError, match="'nan_reward' returned nan"):
        _trainer(make_config, prompts_dataset, reward=nan_reward)


def test_reward_weights_must_match_the_functions(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1 reward functions"):
        _trainer(make_config, prompts_dataset, reward_weights=[1.0, 2.0])


@pytest.mark.parametrize("resolution", [72, 512])
def test_resolution_the_model_cannot_take(make_config, prompts_dataset, resolution):
    with pytest.raises(
        ValueError, match=f"resolution={resolution} cannot be generated.*multiple of 16 .* between 16 and 256"
    ):
        _trainer(make_config, prompts_dataset, resolution=resolution)


def test_unknown_or_non_flow_sampler(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="sampler='Euler' is invalid: give a diffusers scheduler class name"):
        _trainer(make_config, prompts_dataset, sampler="Euler")
    with pytest.raises(ValueError, match="cannot sample a rectified-flow model"):
        _trainer(make_config, prompts_dataset, sampler="DDPMScheduler")


def test_unsupported_pipeline_is_named(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="model='not-a-model' is not a known model name.*Known names: sd3.5-medium"):
        DiffusionNFTTrainer("not-a-model", "jpeg_compressibility", args=make_config(), train_dataset=prompts_dataset)


def test_metrics_reach_tensorboard(make_config, prompts_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A scheduler instance as sampler: the config must still serialise for the logger.
    config = make_config(report_to="tensorboard", sampler=FlowMatchEulerDiscreteScheduler())
    DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset).train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/reward", "train/loss/positive", "train/old_policy_decay"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/reward")) == 2


def test_activation_checkpointing_gives_the_same_update(make_config, prompts_dataset):
    def trained(**overrides):
        config = make_config(max_steps=1, learning_rate=1e-2, **overrides)
        trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
        trainer.train()
        return trainer

    plain, checkpointed = trained(), trained(activation_checkpointing=True)
    assert checkpointed.model.gradient_checkpointing
    for a, b in zip(checkpointed.policies.trained, plain.policies.trained, strict=True):
        torch.testing.assert_close(a, b)


def test_numpy_rewards_are_accepted(make_config, prompts_dataset):
    def numpy_reward(images, prompts, **kwargs):
        return list(np.arange(len(images), dtype=np.float32))

    _trainer(make_config, prompts_dataset, reward=numpy_reward, max_steps=1).train()


def test_sampler_kwargs_do_not_apply_to_an_instance(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="sampler_kwargs only apply to a sampler given by class name"):
        _trainer(
            make_config, prompts_dataset, sampler=FlowMatchEulerDiscreteScheduler(), sampler_kwargs={"shift": 1.0}
        )


def test_overlapped_reward_scoring_runs_in_the_background_and_changes_nothing(make_config, prompts_dataset):
    threads = set()

    def reward(images, prompts, **kwargs):
        threads.add(threading.get_ident())
        return [float(np.asarray(image).mean()) for image in images]

    runs = []
    for overlap in (False, True):
        config = make_config(
            overlap_reward_scoring=overlap, per_device_train_batch_size=2, gradient_accumulation_steps=2
        )
        trainer = DiffusionNFTTrainer("tiny-sd3", reward, args=config, train_dataset=prompts_dataset)
        threads.clear()  # the reward probe at construction runs in the main thread
        trainer.train()
        runs.append(([p.detach().clone() for p in trainer.policies.trained], trainer.state.log_history))
        assert (threading.get_ident() in threads) != overlap
    (params_sync, logs_sync), (params_async, logs_async) = runs
    assert [entry["reward"] for entry in logs_sync if "reward" in entry] == [
        entry["reward"] for entry in logs_async if "reward" in entry
    ]
    for a, b in zip(params_sync, params_async, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
