"""`trl nft` / `trl-nft nft` from an installed package, TRL-style flags and presets, and bad input."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import trl_nft_trl_plugin
from trl_nft import NFTConfig
from trl_nft.embedded import MODEL_PRESETS, model_preset
from trl_nft.models import resolve_model_name
from trl_nft.scripts.nft import NFTScriptArguments, make_parser, parse_rewards, with_model_preset


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_RUN = [
    "--max_steps",
    "1",
    "--per_device_train_batch_size",
    "4",
    "--num_generations",
    "4",
    "--num_inference_steps",
    "2",
    "--lora_r",
    "4",
    "--save_steps",
    "1",
    "--sample_logging_steps",
    "1",
]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("entry_point", [["trl", "nft"], ["trl-nft", "nft"]])
def test_both_entry_points_train_from_a_yaml_config_with_overriding_flags(entry_point, tmp_path):
    config = {
        "model_name_or_path": "tiny-sd3",
        "reward": ["jpeg_incompressibility"],
        "dataset": "simple",
        "output_dir": str(tmp_path / "from-config"),
        "max_steps": 50,
        "report_to": "none",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    output_dir = tmp_path / "from-flag"
    result = _run(
        [
            str(BIN / entry_point[0]),
            *entry_point[1:],
            "--config",
            "run.yaml",
            "--output_dir",
            str(output_dir),
            *TINY_RUN,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "from-config").exists()  # the flag won over the config file
    assert load_file(output_dir / "pytorch_lora_weights.safetensors")  # the LoRA
    card = (output_dir / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "diffusers"
    assert (output_dir / "samples" / "step_000001.png").is_file()  # the sample grid
    assert (output_dir / "checkpoint-1" / "trainer_state.json").is_file()  # max_steps 1 from the flags, not 50


def test_trl_help_lists_nft():
    result = _run([str(BIN / "trl"), "--help"], cwd=ROOT)
    assert result.returncode == 0 and "nft" in result.stdout and "DiffusionNFT" in result.stdout


def test_trl_nft_help_documents_every_flag():
    help_text = make_parser(prog="trl nft").format_help()
    fields = [*NFTScriptArguments.__dataclass_fields__, *NFTConfig.__dataclass_fields__]
    undocumented = [name for name in fields if not name.startswith("_") and f"--{name}" not in help_text]
    assert undocumented == []
    assert "--model " in help_text  # the alias of --model_name_or_path


def test_the_hook_degrades_to_a_clear_message_when_trl_changes(monkeypatch):
    class Loader:
        def exec_module(self, module):
            pass  # a future trl.cli.commands without get_commands

    monkeypatch.setattr(sys, "argv", ["trl", "nft", "--model", "tiny-sd3"])
    with pytest.raises(SystemExit, match=r"run `trl-nft nft --model tiny-sd3` instead"):
        trl_nft_trl_plugin._PatchingLoader(Loader()).exec_module(types.ModuleType("trl.cli.commands"))
    monkeypatch.setattr(sys, "argv", ["trl", "sft"])  # other TRL commands are left alone
    trl_nft_trl_plugin._PatchingLoader(Loader()).exec_module(types.ModuleType("trl.cli.commands"))


def test_presets_parse_with_the_released_settings():
    packaged = [Path(model_preset(name)) for name in MODEL_PRESETS]
    for path in sorted((ROOT / "examples" / "configs").glob("*.yaml")) + packaged:
        script_args, config, *_, remaining = make_parser().parse_args_and_config(
            ["--config", str(path)], return_remaining_strings=True
        )
        assert remaining == [], path.name
        if path.name.startswith("sd35m"):
            assert resolve_model_name(script_args.model_name_or_path) == "stabilityai/stable-diffusion-3.5-medium"
            assert (config.resolution, config.num_inference_steps, config.guidance_scale) == (512, 10, 1.0)
            assert (config.lora_r, config.lora_alpha, config.learning_rate, config.ema_decay) == (32, 64, 3e-4, 0.9)
            assert config.num_generations == 24 and config.images_per_rollout * 8 == 48 * 24  # on 8 processes
            assert config.nft_beta == (0.1 if "ocr" in path.name or "multi" in path.name else 1.0)
        if path.name == "flux_dev_pickscore.yaml":  # Flow-Factory's FLUX.1-dev NFT recipe: 48 groups of 16 on 8 GPUs
            assert resolve_model_name(script_args.model_name_or_path) == "black-forest-labs/FLUX.1-dev"
            assert (config.resolution, config.num_inference_steps, config.guidance_scale) == (384, 8, 1.0)
            assert config.num_generations == 16 and config.images_per_rollout * 8 == 48 * 16
        if path.name.startswith("qwen_image_pickscore"):
            assert resolve_model_name(script_args.model_name_or_path) == "Qwen/Qwen-Image"
        if path.name.endswith("_edit_judge.yaml"):  # Edit-R1's DiffusionNFT settings
            assert script_args.reward == ["edit_judge"]
            assert (config.resolution, config.num_inference_steps, config.num_generations) == (512, 6, 12)
            assert (config.learning_rate, config.kl_coef, config.use_peft) == (3e-4, 1e-4, True)
            assert (config.group_filter_min_reward_std, config.group_filter_max_reward_mean) == (0.05, 0.9)
        if path.name == "digits_sd3.yaml":  # ten prompts x 8 images per rollout, 8 optimizer steps on it
            assert (config.images_per_rollout, config.optimizer_steps_per_rollout) == (80, 8)


def test_an_embedded_model_with_a_preset_starts_from_it_and_flags_override():
    # `trl nft --model digits-sd3` trains with the preset's settings (a run that learns), not the library defaults.
    script_args, config = make_parser().parse_args_and_config(
        with_model_preset(["--model", "digits-sd3", "--max_steps", "5"])
    )
    assert (script_args.model_name_or_path, script_args.reward, script_args.dataset) == (
        "digits-sd3",
        ["digit_accuracy"],
        "digits",
    )
    assert (config.learning_rate, config.lora_r, config.loss_type, config.max_steps) == (1e-3, 8, "velocity", 5)
    assert with_model_preset(["--model_name_or_path=digits-sd3"])[:2] == ["--config", model_preset("digits-sd3")]
    # A config of the user's own replaces the preset; models without one are left alone.
    for argv in (["--config", "my.yaml", "--model", "digits-sd3"], ["--model", "tiny-sd3"], ["--max_steps", "3"]):
        assert with_model_preset(argv) == argv


def test_rewards_with_weights_and_options():
    rewards, weights = parse_rewards(["jpeg_compressibility,jpeg_incompressibility:2"], [])
    assert [reward.__name__ for reward in rewards] == ["jpeg_compressibility", "jpeg_incompressibility"]
    assert weights == [1.0, 2.0]
    assert parse_rewards(["jpeg_compressibility"], [])[1] is None
    rewards, _ = parse_rewards(["clip_score"], ['clip_score={"checkpoint": "my/clip", "batch_size": 2}'])
    assert (rewards[0].checkpoint, rewards[0].batch_size) == ("my/clip", 2)


def _main(tmp_path, *argv):
    from trl_nft.scripts.nft import main

    return main(*make_parser().parse_args_and_config(["--output_dir", str(tmp_path), "--report_to", "none", *argv]))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "sd35-medium"], r"Did you mean 'sd3.5-medium'"),
        (["--reward", "pickscor"], r"Did you mean 'pickscore'"),
        (["--dataset", "genevl"], r"Did you mean 'geneval'"),
        (["--reward", "jpeg_compressibility:2", "--reward_weights", "1"], "given twice"),
        (["--eval_strategy", "steps"], "needs --eval_dataset"),
        (["--dataset_path", "prompts.txt"], "--dataset_path only applies to --dataset ocr"),
        (["--dataset", "ocr"], "--dataset ocr needs --dataset_path"),
        (["--reward", "ocr:x"], "must be a number"),
        (["--reward_kwargs", "clip_score={}"], "which no --reward names"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        _main(tmp_path, *argv)


def test_digits_eval_dataset_logs_the_classifier_accuracy_and_the_held_out_judge(tmp_path):
    # `--eval_dataset digits` with the digit_accuracy reward: the benchmark's two held-out metrics at every evaluation.
    trainer = _main(
        tmp_path,
        *("--model", "digits-sd3", "--reward", "digit_accuracy", "--eval_dataset", "digits"),
        *("--max_steps", "1", "--per_device_train_batch_size", "16", "--num_generations", "8"),
        *("--num_inference_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no"),
    )
    assert trainer.eval_reward_func_names == ["digit_classifier_top1", "digit_judge"]
    evaluation = next(entry for entry in trainer.state.log_history if "eval_reward" in entry)
    for name in ("digit_accuracy", "digit_classifier_top1", "digit_judge"):
        assert 0.0 <= evaluation[f"eval_rewards/{name}/mean"] <= 1.0
