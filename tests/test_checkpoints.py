"""Checkpoints are whole or absent: runs killed (SIGKILL, whole process group) while training or while saving resume with
`--resume_from_checkpoint true` to the weights of an uninterrupted run; resumed runs never train past `max_steps`;
rotation; clear errors (docs/reliability.md, "Checkpoints and resuming")."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers.trainer_callback import TrainerState

from trl_nft import DiffusionNFTTrainer
from trl_nft.checkpointing import (
    MANIFEST_NAME,
    atomic_checkpoint_dir,
    is_whole_checkpoint,
    newest_whole_checkpoint,
    remove_interrupted_saves,
)
from trl_nft.scripts.nft import main, make_parser


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LORA = "pytorch_lora_weights.safetensors"
# 8 optimizer steps, one prompt (4 images) each, a checkpoint every 2; a high learning rate, so that every step moves
# the weights clearly.
RUN = [
    *("--model", "tiny-sd3", "--reward", "jpeg_incompressibility", "--dataset", "simple", "--report_to", "none"),
    *("--max_steps", "8", "--save_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4"),
    *("--num_inference_steps", "2", "--lora_r", "4", "--learning_rate", "1e-2", "--sample_logging_steps", "0"),
    *("--disable_tqdm", "true", "--logging_steps", "1"),
]

# Runs `trl_nft/scripts/nft.py` (what `trl nft` launches) stopped at one point of the run, where it creates the file
# `marker` and waits to be killed: `training` in the middle of the step after `step`, `old_policy` in the save of
# `step` once the old policy is in the temporary folder, `trainer_state` in that save once transformers has written
# everything (the last file before the rename).
STOPPED_RUN = """
import pathlib, re, runpy, sys, time
from transformers.trainer_callback import TrainerState
from trl_nft import DiffusionNFTTrainer, nft_trainer

point, step, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])


def stop_at(global_step):
    if global_step == step:
        marker.touch()
        time.sleep(600)


compute_loss, save_policy, save_to_json = (
    DiffusionNFTTrainer.compute_loss, nft_trainer.save_policy, TrainerState.save_to_json
)
if point == "training":
    def stopped(self, *args, **kwargs):
        stop_at(self.state.global_step)
        return compute_loss(self, *args, **kwargs)
    DiffusionNFTTrainer.compute_loss = stopped
elif point == "old_policy":
    def stopped(module, adapter_name, output_dir, *args):
        save_policy(module, adapter_name, output_dir, *args)
        saved_in = re.search(r"checkpoint-(\\d+)", output_dir)  # the policies a checkpoint's save writes
        if saved_in:
            stop_at(int(saved_in.group(1)))
    nft_trainer.save_policy = stopped
elif point == "trainer_state":
    def stopped(self, path):
        save_to_json(self, path)
        stop_at(self.global_step)
    TrainerState.save_to_json = stopped
sys.argv = ["nft.py", *sys.argv[4:]]
runpy.run_module("trl_nft.scripts.nft", run_name="__main__")
"""


@contextlib.contextmanager
def _one_thread():
    # In-process runs compute as the subprocesses do (OMP_NUM_THREADS=1), so that their weights can be compared exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with _one_thread():
        yield


@pytest.fixture
def counted_steps(monkeypatch) -> list[int]:
    """The global step at each micro-step that `DiffusionNFTTrainer` trains from now on."""
    steps, training_step = [], DiffusionNFTTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionNFTTrainer, "training_step", counted)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The output_dir of an uninterrupted run."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    with _one_thread():
        _main(output_dir)
    return output_dir


def _main(output_dir: Path, *argv: str) -> DiffusionNFTTrainer:
    return main(*make_parser().parse_args_and_config([*RUN, "--output_dir", str(output_dir), *argv]))


def _checkpoint_weights(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA weights of a checkpoint: the EMA (its top level), the trained and the old policy."""
    paths = {"ema": LORA, "trained": f"policy/{LORA}", "old": f"old_policy/{LORA}"}
    return {name: load_file(checkpoint / path) for name, path in paths.items()}


def _final_weights(output_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA weights a run leaves: the saved model (the EMA) and those of its last checkpoint."""
    return {"model": load_file(output_dir / LORA), **_checkpoint_weights(output_dir / "checkpoint-8")}


def _assert_equal_weights(weights, expected) -> None:
    assert weights.keys() == expected.keys()
    for name in expected:
        assert weights[name].keys() == expected[name].keys(), name
        for key, tensor in expected[name].items():
            assert torch.equal(weights[name][key], tensor), (name, key)


def _kill_when_stopped(point: str, step: int, output_dir: Path, tmp_path: Path) -> None:
    """Run `RUN` stopped at `point` of `step` (see `STOPPED_RUN`) and SIGKILL its whole process group there."""
    marker, log = tmp_path / "stopped", tmp_path / "stopped-run.log"
    command = [sys.executable, "-c", STOPPED_RUN, point, str(step), str(marker), *RUN, "--output_dir", str(output_dir)]
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=ENV, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a safety net for a hung run, not a timing assertion
        while not marker.exists():
            assert process.poll() is None, f"the run ended before its stop: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never reached its stop"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def _logged_steps(checkpoint: Path) -> list[int]:
    """The optimizer steps that logged a loss in the run(s) that led to `checkpoint`."""
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return [entry["step"] for entry in state.log_history if "loss" in entry]


def test_killed_while_training_resumes_from_true_to_the_weights_of_an_uninterrupted_run(
    reference, tmp_path, counted_steps, one_thread
):
    output_dir = tmp_path / "run"
    _kill_when_stopped("training", 5, output_dir, tmp_path)  # killed during step 6, after checkpoint-4
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]

    trainer = _main(output_dir, "--resume_from_checkpoint", "true")  # as `trl nft` passes it: a string
    assert counted_steps == [4, 5, 6, 7] and trainer.state.global_step == 8
    _assert_equal_weights(_final_weights(output_dir), _final_weights(reference))
    assert _logged_steps(output_dir / "checkpoint-8") == list(range(1, 9))


@pytest.mark.parametrize("point", ["old_policy", "trainer_state"])
def test_killed_while_saving_leaves_the_previous_checkpoint_whole_and_resumes_from_it(
    point, reference, tmp_path, one_thread
):
    output_dir = tmp_path / "run"
    _kill_when_stopped(point, 6, output_dir, tmp_path)  # killed while writing checkpoint-6
    assert not (output_dir / "checkpoint-6").exists()
    assert (output_dir / "tmp-checkpoint-6" / "checkpoint-6" / "old_policy" / LORA).is_file()
    assert newest_whole_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-4")
    _assert_equal_weights(  # as the uninterrupted run wrote it
        _checkpoint_weights(output_dir / "checkpoint-4"), _checkpoint_weights(reference / "checkpoint-4")
    )

    trainer = _main(output_dir, "--resume_from_checkpoint", "true")
    assert trainer.state.global_step == 8
    _assert_equal_weights(_final_weights(output_dir), _final_weights(reference))
    # The temporary folder is gone.
    assert sorted(path.name for path in output_dir.glob("*checkpoint-*")) == [f"checkpoint-{n}" for n in (2, 4, 6, 8)]


def test_resuming_from_the_last_checkpoint_trains_no_further_step(reference, tmp_path, counted_steps, one_thread):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    trainer = _main(output_dir, "--resume_from_checkpoint", str(output_dir / "checkpoint-8"))
    assert counted_steps == []
    assert trainer.state.global_step == 8
    assert not (output_dir / "checkpoint-9").exists()
    _assert_equal_weights(_final_weights(output_dir), _final_weights(reference))  # the saved model: the EMA
    # Its model card stays as the finished run wrote it, with its samples (a card of this process has none to show).
    assert (output_dir / "README.md").read_text() == (reference / "README.md").read_text()
    assert "images/sample_0.png" in (output_dir / "README.md").read_text()


def test_resuming_from_a_middle_checkpoint_trains_exactly_the_rest(reference, tmp_path, counted_steps, one_thread):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    trainer = _main(output_dir, "--resume_from_checkpoint", str(output_dir / "checkpoint-4"))
    assert counted_steps == [4, 5, 6, 7]
    assert trainer.state.global_step == 8
    _assert_equal_weights(_final_weights(output_dir), _final_weights(reference))  # checkpoints 6 and 8 replaced
    assert not list(output_dir.glob("tmp-*"))


def test_resume_true_without_a_whole_checkpoint_is_refused_naming_the_field(tmp_path, make_config, prompts_dataset):
    message = r"resume_from_checkpoint='true': output_dir=.* holds no whole checkpoint"
    with pytest.raises(ValueError, match=message):  # from the command line, before the model loads
        make_parser().parse_args_and_config([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"])
    (tmp_path / "run" / "tmp-checkpoint-2" / "checkpoint-2").mkdir(parents=True)  # a save that was killed
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", "jpeg_incompressibility", args=make_config(), train_dataset=prompts_dataset
    )
    for value in (True, "True", "last"):
        with pytest.raises(ValueError, match="resume_from_checkpoint=.* holds no whole checkpoint"):
            trainer.train(resume_from_checkpoint=value)


def test_a_folder_that_is_not_a_whole_checkpoint_is_refused_saying_what_is_missing(reference, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    checkpoint = output_dir / "checkpoint-8"
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "rng_state.pth").write_bytes(b"")

    def refused(path: Path, message: str):
        with pytest.raises(ValueError, match=message):
            _main(output_dir, "--resume_from_checkpoint", str(path))

    refused(
        checkpoint, r"is not a whole checkpoint: it lacks optimizer.pt; rng_state.pth as saved \(\d+ bytes, now 0\)"
    )
    refused(output_dir, f"is not a whole checkpoint: it lacks {MANIFEST_NAME}")  # the saved model is no checkpoint
    refused(output_dir / "checkpoint-5", "is not a folder")
    # `true` passes over the damaged checkpoint-8 for the newest whole one.
    assert newest_whole_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-6")


def test_rotation_keeps_the_newest_checkpoints_and_the_best_under_their_final_names(make_config, prompts_dataset):
    config = make_config(
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="eval_reward",
        num_inference_steps=2,
        learning_rate=1e-2,
    )
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        "jpeg_incompressibility",
        args=config,
        train_dataset=prompts_dataset,
        eval_dataset=prompts_dataset.select(range(2)),
    )
    trainer.train()
    output_dir = Path(config.output_dir)
    best = output_dir / f"checkpoint-{trainer.state.best_global_step}"
    kept = {output_dir / "checkpoint-4", best}
    if len(kept) == 1:  # the last is the best: the one before it stays too
        kept.add(output_dir / "checkpoint-3")
    assert set(output_dir.iterdir()) == kept
    assert all(is_whole_checkpoint(str(path)) for path in kept)
    assert trainer.state.best_model_checkpoint == str(best)
    for path in (best, output_dir / "checkpoint-4"):  # they recorded the best checkpoint under its final name
        assert TrainerState.load_from_json(str(path / "trainer_state.json")).best_model_checkpoint == str(best)


def test_atomic_checkpoint_dir_renames_whole_folders_only(tmp_path):
    final = tmp_path / "checkpoint-3"
    with atomic_checkpoint_dir(str(final)) as staging:
        assert Path(staging) == tmp_path / "tmp-checkpoint-3" / "checkpoint-3"
        (Path(staging) / "part").mkdir()
        (Path(staging) / "part" / "weights.bin").write_bytes(b"12345")
        assert not final.exists()
    assert is_whole_checkpoint(str(final)) and sorted(os.listdir(tmp_path)) == ["checkpoint-3"]

    with pytest.raises(RuntimeError), atomic_checkpoint_dir(str(final)) as staging:  # a save that fails
        (Path(staging) / "weights.bin").write_bytes(b"new")
        raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"] and (final / "part" / "weights.bin").is_file()

    with atomic_checkpoint_dir(str(final)) as staging:  # saved again at the same step: replaced
        (Path(staging) / "weights.bin").write_bytes(b"new")
    assert sorted(os.listdir(final)) == [MANIFEST_NAME, "weights.bin"] and is_whole_checkpoint(str(final))

    for name in ("tmp-checkpoint-7", "tmp-checkpoint-notes", "checkpoint-9"):
        (tmp_path / name).mkdir()
    remove_interrupted_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-9", "tmp-checkpoint-notes"]
    assert newest_whole_checkpoint(str(tmp_path)) == str(final)  # checkpoint-9 has no manifest


def _rollout_prompts(make_config, dataset, output_dir, checkpoint=None) -> list[tuple[int, str]]:
    """(step, prompt) of each rollout of an 8-step run that checkpoints every 2 steps (one prompt per rollout)."""
    config = make_config(
        output_dir=str(output_dir), max_steps=8, save_strategy="steps", save_steps=2, num_inference_steps=2
    )
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=dataset)
    rollouts, generate = [], trainer._generate_and_score

    def recorded(rows):
        rollouts.append((trainer.state.global_step, rows[0]["prompt"]))
        return generate(rows)

    trainer._generate_and_score = recorded
    trainer.train(resume_from_checkpoint=checkpoint)
    return rollouts


@pytest.mark.parametrize(
    "num_prompts",
    [
        pytest.param(16, id="in-the-first-epoch"),  # 16 steps an epoch
        pytest.param(4, id="in-a-later-epoch"),  # 4 steps an epoch: resumed in the second
    ],
)
def test_a_resumed_run_samples_the_prompts_of_an_uninterrupted_one(make_config, tmp_path, num_prompts):
    dataset = Dataset.from_dict({"prompt": [f"a photo of object number {i}" for i in range(num_prompts)]})
    uninterrupted = _rollout_prompts(make_config, dataset, tmp_path / "run")
    resumed = _rollout_prompts(make_config, dataset, tmp_path / "run", str(tmp_path / "run" / "checkpoint-6"))
    assert resumed == uninterrupted[6:]
