"""What a run prints: TRL's cadence and a short line of the metrics that matter (every metric still reaching the trackers
and the log history), progress bars fit for a redirected log, no accelerate warning on a plain run, and a closing
message that lists what is on disk."""

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trl_nft import DiffusionNFTTrainer, NFTConfig
from trl_nft.cli import _without_accelerate_default_warning
from trl_nft.console import console_metrics, rollout_progress_bar, saved_files_summary


def test_the_console_line_keeps_the_metrics_that_matter_and_faults_only_when_not_zero():
    logs = {
        "loss": 0.1,
        "grad_norm": 0.2,
        "learning_rate": 3e-4,
        "reward": 1.5,
        "reward_std": 0.3,
        "rewards/clip/mean": 0.25,
        "rewards/clip/std": 0.01,
        "rewards/ocr/mean": 0.5,
        "frac_reward_zero_std": 0.0,
        "optimality/mean": 0.5,
        "velocity_norm_ratio/low_noise": 1.01,
        "timing/rollout_seconds": 3.0,
        "faults/reward_retries": 0.0,
        "faults/dropped_samples": 2.0,
        "epoch": 0.5,
    }
    assert list(console_metrics(logs)) == [
        *("loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/clip/mean", "rewards/ocr/mean"),
        *("epoch", "faults/dropped_samples"),
    ]
    evaluation = {"eval_reward": 1.0, "eval_rewards/clip/mean": 0.3, "eval_rewards/geneval/counting": 0.5}
    assert list(console_metrics(evaluation)) == ["eval_reward", "eval_rewards/clip/mean"]


def test_a_run_prints_short_lines_while_trackers_and_log_history_get_every_metric(
    make_config, prompts_dataset, tmp_path, capsys
):
    # disable_tqdm: transformers' printer, one line per log. 3 steps, logged every 2: at step 2, and at the last.
    config = make_config(max_steps=3, logging_steps=2, report_to="tensorboard", sample_logging_steps=0)
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert [entry["step"] for entry in logged] == [2, 3]
    assert {"optimality/mean", "faults/reward_retries", "timing/rollout_seconds", "loss/kl"} <= set(logged[0])
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [list(line) for line in printed[:2]] == [list(console_metrics(entry)) for entry in logged]
    assert list(printed[0]) == [
        *("loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/jpeg_incompressibility/mean"),
        "epoch",
    ]
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/optimality/mean", "train/faults/reward_retries", "train/loss/kl"} <= set(events.Tags()["scalars"])


def test_logs_follow_trl_every_10_steps():
    assert NFTConfig(output_dir="unused").logging_steps == 10


def test_rollout_progress_bars_are_not_drawn_into_a_redirected_output():
    # Under pytest, stderr is not a terminal: below the training bar tqdm would write cursor moves into the log.
    assert not sys.stderr.isatty()
    with rollout_progress_bar(4, "Sampling", show=True) as bar:
        assert bar.disable
    with rollout_progress_bar(4, "Sampling", show=False) as bar:
        assert bar.disable


def test_accelerates_warning_about_its_defaults_is_left_out_only_for_a_plain_run(caplog):
    launch_logger = logging.getLogger("accelerate.commands.launch")
    header = "The following values were not passed to `accelerate launch` and had defaults used instead:\n"
    footer = (
        "\nTo avoid this warning pass in values for each of the problematic parameters or run `accelerate config`."
    )
    plain = header + "\t`--num_processes` was set to a value of `1`\n\t`--dynamo_backend` was set to a value of `'no'`"
    several_gpus = header + "\t`--num_processes` was set to a value of `2`\n\t\tMore than one GPU was found, enabling"
    with caplog.at_level(logging.WARNING, "accelerate.commands.launch"), _without_accelerate_default_warning():
        launch_logger.warning(plain + footer)
        launch_logger.warning(several_gpus + footer)
        launch_logger.warning("another warning")
    assert [record.getMessage() for record in caplog.records] == [several_gpus + footer, "another warning"]
    launch_logger.warning(plain + footer)  # outside the launch, nothing is filtered
    assert caplog.records[-1].getMessage() == plain + footer


def test_a_plain_trl_nft_run_leaves_a_short_log_without_escape_codes(tmp_path):
    # `trl nft --model tiny-sd3 --max_steps 20 > log 2>&1`, as a user runs it: TRL's cadence (logs at steps 10 and
    # 20), progress bars without cursor moves, no accelerate warning, and a closing message that lists what is on
    # disk: no sample grid (the first is due at step 50).
    command = [str(Path(sys.executable).parent / "trl"), "nft", "--model", "tiny-sd3", "--max_steps", "20"]
    command += ["--output_dir", "out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "log", "w") as log:
        result = subprocess.run(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "log").read_text()
    assert result.returncode == 0, text[-3000:]
    assert len(text.splitlines()) < 60 and "\x1b" not in text
    lines = text.splitlines()
    metrics = [line.rsplit("\r", 1)[-1] for line in lines if "'reward': " in line]
    assert len(metrics) == 2 and all("'rewards/jpeg_incompressibility/mean'" in line for line in metrics)
    assert "optimality/mean" not in text and "faults/" not in text and "velocity_norm_ratio" not in text
    assert "were not passed to `accelerate launch`" not in text
    closing = text.split("Saved in out:\n", 1)[1].splitlines()
    assert closing == [
        '  the LoRA: pipeline.load_lora_weights("out")',
        "  the model card: README.md, its images in images/",
        "  checkpoints: checkpoint-20",
    ]


def test_the_closing_message_lists_what_is_on_disk_and_nothing_else(tmp_path):
    assert saved_files_summary(str(tmp_path)) == f"Nothing was saved in {tmp_path}."
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("card")
    assert saved_files_summary(str(tmp_path)).splitlines()[1:] == [
        "  the fine-tuned transformer (from_pretrained(..., subfolder='transformer'))",
        "  the model card: README.md",
    ]
    (tmp_path / "samples").mkdir()
    for step in (50, 100):
        (tmp_path / "samples" / f"step_{step:06d}.png").write_bytes(b"")
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert saved_files_summary(str(tmp_path)).splitlines()[3:] == [
        "  2 sample grids: samples/",
        "  checkpoints: checkpoint-50, checkpoint-100",
    ]
