"""NFTConfig validation: every bad value fails at construction with a message naming the field."""

import dataclasses

import pytest
from transformers import TrainingArguments

from trl_nft import NFTConfig


def test_defaults_follow_the_released_code(tmp_path):
    config = NFTConfig(output_dir=str(tmp_path))
    assert (config.learning_rate, config.weight_decay, config.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert (config.lora_r, config.lora_alpha, config.nft_beta, config.kl_coef) == (32, 64, 1.0, 1e-4)
    assert (config.num_inference_steps, config.guidance_scale, config.max_sequence_length) == (10, 1.0, 128)
    assert (config.scale_rewards, config.advantage_clip, config.loss_type) == ("batch", 5.0, "x0_adaptive")
    assert config.train_timestep_fraction == 0.99
    assert config.lr_scheduler_type == "constant"
    assert config.sampler is None  # the family's default: DPM-Solver++(2M), UniPC for Qwen-Image and Z-Image


def test_sampler_kwargs_accept_json_from_the_command_line(tmp_path):
    config = NFTConfig(output_dir=str(tmp_path), sampler_kwargs='{"solver_order": 1}')
    assert config.sampler_kwargs == {"solver_order": 1}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_generations": 1}, "num_generations"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"resolution": -64}, "resolution"),
        ({"scale_rewards": "global-ish"}, "scale_rewards"),
        ({"advantage_clip": 0.0}, "advantage_clip"),
        ({"nft_beta": 0.0}, "nft_beta"),
        ({"kl_coef": -1.0}, "kl_coef"),
        ({"reference_refresh_steps": 10, "kl_coef": 0.0}, "reference_refresh_steps"),  # no KL: nothing to refresh
        ({"loss_type": "l1"}, "loss_type"),
        ({"train_timestep_fraction": 0.0}, "train_timestep_fraction"),
        ({"old_policy_decay_schedule": "cosine"}, "old_policy_decay_schedule"),
        ({"old_policy_decay_max": 1.0}, "old_policy_decay_max"),
        ({"old_policy_decay_rate": -0.1}, "old_policy_decay_rate"),
        ({"old_policy_decay_delay": -1}, "old_policy_decay_delay"),
        ({"lora_r": 0}, "lora_r"),
        ({"reward_hacking_threshold": -0.1}, "reward_hacking_threshold"),
        ({"steps_per_generation": 0}, "steps_per_generation"),
        ({"gradient_accumulation_steps": 2, "steps_per_generation": 3}, "steps_per_generation"),
    ],
)
def test_invalid_values_name_their_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        NFTConfig(output_dir=str(tmp_path), **overrides)


def test_a_grpo_users_beta_is_refused_naming_the_nft_strength_and_the_kl_weight(tmp_path):
    # In GRPOConfig `beta` is the KL coefficient (0.04 was its default); here it would have been the NFT strength.
    with pytest.raises(ValueError, match=r"beta=0.04 is invalid: the NFT strength is `nft_beta`.*`kl_coef`"):
        NFTConfig(output_dir=str(tmp_path), beta=0.04)
    assert NFTConfig(output_dir=str(tmp_path), nft_beta=0.1).nft_beta == 0.1


def test_batch_must_divide_into_groups(tmp_path):
    with pytest.raises(ValueError, match="num_generations=3"):
        NFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=3)
    # Gradient accumulation counts: 2 x 3 = 6 images form two groups of 3.
    config = NFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, num_generations=3
    )
    assert (config.images_per_rollout, config.prompts_per_rollout, config.optimizer_steps_per_rollout) == (6, 2, 1)
    # A rollout of several optimizer steps: 2 images x 6 micro-batches = 12 images, 4 groups, 2 optimizer steps.
    config = NFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        steps_per_generation=6,
        num_generations=3,
    )
    assert (config.images_per_rollout, config.prompts_per_rollout, config.optimizer_steps_per_rollout) == (12, 4, 2)


#: A bad value for every field NFTConfig adds to TrainingArguments: each must be refused with a message that names
#: the field. A new field without an entry here fails `test_every_field_refuses_a_bad_value_naming_it`.
BAD_VALUES = {
    "num_generations": 1,
    "steps_per_generation": 3,  # not a multiple of gradient_accumulation_steps=2 (set by the test)
    "num_inference_steps": 0,
    "guidance_scale": 0.5,
    "resolution": -64,
    "sampler": "DPMSolverMultistep",
    "sampler_kwargs": "{not json",
    "max_sequence_length": 0,
    "num_frames": 0,
    "reward_weights": [1.0, float("nan")],
    "scale_rewards": "global",
    "advantage_clip": 0.0,
    "group_filter_min_reward_std": -0.05,
    "group_filter_max_reward_mean": float("nan"),
    "overlap_reward_scoring": "yes",
    "per_device_rollout_batch_size": 0,
    "prompt_embedding_cache_size": -1,
    "quantization": "int4",
    "gguf_file": "flux1-dev-Q4_0.gguf",  # without quantization="gguf"
    "quantize_text_encoders": True,  # without a quantization method
    "offload_text_encoders_and_vae": "yes",
    "video_reward_frames": 0,
    "video_reward_aggregation": "max",
    "reward_failure_policy": "ignore",
    "reward_retries": -1,
    "reward_retry_backoff": -1.0,
    "reward_timeout": 0.0,
    "nft_beta": 0.0,
    "beta": 0.04,  # GRPO's KL coefficient, and the old name of nft_beta
    "kl_coef": -1e-4,
    "velocity_norm_penalty": -1.0,
    "velocity_norm_margin": -0.1,
    "reference_refresh_steps": -1,
    "loss_type": "l2",
    "negative_loss": "no",
    "train_timestep_fraction": 1.5,
    "old_policy_decay_schedule": "cosine",
    "old_policy_decay_rate": -0.001,
    "old_policy_decay_max": 1.0,
    "old_policy_decay_delay": -1,
    "max_nonfinite_steps": -1,
    "ema_decay": 1.0,
    "eval_num_inference_steps": 0,
    "eval_sampler": "Euler",
    "sample_logging_steps": -1,
    "sample_logging_num_images": 0,
    "early_stopping_reward": float("inf"),
    "reward_hacking_guard": "on",
    "reward_hacking_metric": 3,
    "reward_hacking_patience": 0,
    "reward_hacking_threshold": -0.1,
    "use_peft": "true",
    "lora_r": 0,
    "lora_alpha": 0,
    "lora_dropout": 1.0,
    "lora_target_modules": [],
}


def test_every_field_refuses_a_bad_value_naming_it(tmp_path):
    base_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    own_fields = [field.name for field in dataclasses.fields(NFTConfig) if field.name not in base_fields]
    assert sorted(BAD_VALUES) == sorted(own_fields), "give every NFTConfig field a bad value in BAD_VALUES"
    for name, value in BAD_VALUES.items():
        with pytest.raises(ValueError, match=rf"^{name}\b|\b{name}=") as error:
            NFTConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, **{name: value})
        assert "is invalid" in str(error.value) or name in str(error.value), (name, str(error.value))


# TrainingArguments' numbers that transformers takes unchecked: a negative learning rate used to fail only when the
# optimizer was built, a negative seed at the first rollout, a zero batch size with a ZeroDivisionError.
INHERITED_BAD_VALUES = {
    "learning_rate": -1e-4,
    "weight_decay": -1.0,
    "adam_beta1": 1.0,
    "adam_beta2": -0.1,
    "adam_epsilon": 0.0,
    "max_grad_norm": -1.0,
    "per_device_train_batch_size": 0,
    "per_device_eval_batch_size": 0,
    "gradient_accumulation_steps": 0,
    "max_steps": -5,
    "logging_steps": -1,
    "save_steps": 0,
    "eval_steps": -1,
    "seed": -1,
    "dataloader_num_workers": -1,
}


@pytest.mark.parametrize(("name", "value"), INHERITED_BAD_VALUES.items(), ids=list(INHERITED_BAD_VALUES))
def test_inherited_numbers_are_checked_naming_the_field(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"^{name}={value!r} is invalid: "):
        NFTConfig(output_dir=str(tmp_path), **{name: value})


def test_num_train_epochs_is_checked_when_it_decides_the_length(tmp_path):
    with pytest.raises(ValueError, match=r"^num_train_epochs=0 is invalid"):
        NFTConfig(output_dir=str(tmp_path), num_train_epochs=0)
    NFTConfig(output_dir=str(tmp_path), num_train_epochs=0, max_steps=5)  # max_steps decides
