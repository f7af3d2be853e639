"""`digits-sd3-turbo`: the shipped step-distilled pipeline loads offline and samples at its 2 steps what `digits-sd3`
samples at 10, which `digits-sd3` itself cannot at 2; its preset parses; on it, the velocity-norm penalty holds the
norm inflation that NFT causes (slow)."""

import dataclasses
import json
import os

import pytest
import torch
import yaml
from diffusers import StableDiffusion3Pipeline

from trl_nft import DiffusionNFTTrainer, NFTConfig
from trl_nft.embedded import EMBEDDED_MODELS, MODEL_PRESETS, model_preset
from trl_nft.embedded.digits_sd3_turbo import (
    DIGITS_SD3_TURBO_PATH,
    DIGITS_SD3_TURBO_STEPS,
    MAX_JUDGE_GAP,
    TEACHER_STEPS,
    judge_and_classifier_accuracy,
)
from trl_nft.models import load_pipeline
from trl_nft.prompts.digits import digit_prompts
from trl_nft.rewards import get_reward
from trl_nft.scripts.nft import make_parser


def test_turbo_samples_at_two_steps_what_digits_sd3_samples_at_ten():
    turbo, teacher = load_pipeline("digits-sd3-turbo"), load_pipeline("digits-sd3")
    assert isinstance(turbo, StableDiffusion3Pipeline) and "digits-sd3-turbo" in EMBEDDED_MODELS
    assert turbo.transformer.dtype == torch.float32  # shipped in float16, loaded for training in float32
    # Only the transformer is its own: every other component is digits-sd3's.
    assert set(os.listdir(DIGITS_SD3_TURBO_PATH)) == {"transformer", "build_info.json"}
    assert turbo.vae.config == teacher.vae.config and turbo.scheduler.config == teacher.scheduler.config

    # On the same noise (5 images of each digit), the turbo's 2-step samples land near the teacher's 10-step ones and
    # are as sharp; the teacher's own 2-step samples are the blurred average a flow model draws in one jump.
    reference = judge_and_classifier_accuracy(teacher, TEACHER_STEPS, per_digit=5)
    distilled = judge_and_classifier_accuracy(turbo, DIGITS_SD3_TURBO_STEPS, per_digit=5)
    undistilled = judge_and_classifier_accuracy(teacher, DIGITS_SD3_TURBO_STEPS, per_digit=5)

    def distance(result):
        return (result["latents"] - reference["latents"]).pow(2).mean().sqrt().item()

    assert distance(distilled) < 0.5 * distance(undistilled)
    assert distilled["sharpness"] > 0.9 * reference["sharpness"] > undistilled["sharpness"]
    # The builder's measurement on 300 images: the judge target of the issue.
    with open(os.path.join(DIGITS_SD3_TURBO_PATH, "build_info.json")) as file:
        info = json.load(file)
    assert info["judge_gap"] <= MAX_JUDGE_GAP


def test_turbo_preset_parses_and_samples_as_distilled():
    assert MODEL_PRESETS["digits-sd3-turbo"] == "digits_sd3_turbo.yaml"
    script_args, config, *_, remaining = make_parser().parse_args_and_config(
        ["--config", model_preset("digits-sd3-turbo")], return_remaining_strings=True
    )
    assert remaining == [] and script_args.model_name_or_path == "digits-sd3-turbo"
    assert config.num_inference_steps == DIGITS_SD3_TURBO_STEPS and config.guidance_scale == 1.0
    assert config.kl_coef > 0  # the distilled recipe keeps the pull toward the distilled base


@pytest.mark.slow
def test_the_velocity_norm_penalty_holds_the_norm_inflation_nft_causes_on_the_turbo(make_config):
    """A short version of docs/benchmarks.md's measurement: the turbo preset's settings (KL 0.1 toward the distilled
    base) for 160 steps, with and without the velocity-norm penalty; the control is the run without it."""
    with open(model_preset("digits-sd3-turbo")) as file:
        preset = yaml.safe_load(file)
    fields = {field.name for field in dataclasses.fields(NFTConfig)}
    excluded = {"output_dir", "max_steps", "eval_strategy", "eval_steps", "eval_on_start", "save_steps", "report_to"}
    excluded |= {"reward_hacking_metric", "sample_logging_steps", "logging_steps"}
    settings = {key: value for key, value in preset.items() if key in fields and key not in excluded}

    def late_norm_ratio(penalty: float) -> float:
        config = make_config(**{**settings, "max_steps": 160, "velocity_norm_penalty": penalty, "logging_steps": 8})
        trainer = DiffusionNFTTrainer(
            "digits-sd3-turbo", get_reward("digit_accuracy"), args=config, train_dataset=digit_prompts()
        )
        trainer.train()
        ratios = [log["velocity_norm_ratio"] for log in trainer.state.log_history if "velocity_norm_ratio" in log]
        return sum(ratios[len(ratios) // 2 :]) / len(ratios[len(ratios) // 2 :])  # steps 81-160

    free, penalised = late_norm_ratio(0.0), late_norm_ratio(10.0)
    # Measured (docs/benchmarks.md, the turbo runs kl0.1 and kl0.1_penalty, steps 81-160): 1.076 and 0.983.
    assert free > 1.03, f"NFT raised the velocity norm by only {free - 1:.3f} over the base's"
    assert penalised < free - 0.04 and penalised < 1.01, f"with the penalty {penalised:.3f}, without {free:.3f}"
