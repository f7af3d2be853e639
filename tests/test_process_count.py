"""The same `trl nft` run, with the same global batch, seed and steps, ends with the same LoRA on 1 process, on 2
processes, and on 2 machines (simulated on loopback: two `accelerate launch` with machine ranks 0 and 1, gloo): every
random draw of a sample is keyed by its index in the whole rollout (trl_nft/randomness.py), not by the process.

Tolerance: float rounding, which Adam amplifies in the few weights whose gradient is near its epsilon (1e-8): at
learning rate 1e-2, 3 steps on digits-sd3, the largest difference measured is 4.6e-4 of the largest weight and
8e-5 of each layer's LoRA update `B A` (a run on 1 process with 2 micro-batches instead of 1 differs from it by
5e-5 and 3e-5). Before the draws were keyed by sample, 2 processes ended 1.1e-1 and 1.6 away: another run."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


RUN = ["--model", "digits-sd3", "--max_steps", "3", "--steps_per_generation", "1", "--num_generations", "4"]
RUN += ["--learning_rate", "1e-2", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no"]
RUN += ["--sample_logging_steps", "0", "--disable_tqdm", "true", "--report_to", "none"]
ROOT = Path(__file__).parent.parent
GLOBAL_BATCH = 8  # images per rollout and optimizer step: 2 prompts x 4


def _launch(output_dir: Path, *launch_flags: str, processes: int = 1) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "trl"), "nft", *launch_flags, *RUN]
    command += ["--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--output_dir", str(output_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*processes: subprocess.Popen) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]


def _lora(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "pytorch_lora_weights.safetensors")


def _assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    scale = max(value.abs().max().item() for value in ours.values())
    difference = max((ours[key] - theirs[key]).abs().max().item() for key in ours)
    assert difference <= 2e-3 * scale, f"weights differ by {difference:.2e} (largest weight {scale:.2e})"
    for key in (key for key in ours if ".lora_A." in key):
        update, other = (lora[key.replace(".lora_A.", ".lora_B.")] @ lora[key] for lora in (ours, theirs))
        assert (update - other).norm() <= 1e-3 * update.norm(), key


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    output_dir = tmp_path_factory.mktemp("one-process")
    _finish(_launch(output_dir))
    return _lora(output_dir)


def test_one_and_two_processes_end_with_the_same_weights(one_process, tmp_path):
    config = ROOT / "examples" / "accelerate_configs" / "cpu_two_processes.yaml"  # the shipped one
    _finish(_launch(tmp_path, "--accelerate_config", str(config), "--use_cpu", processes=2))
    _assert_same_weights(one_process, _lora(tmp_path))


def test_two_machines_on_loopback_end_with_the_weights_of_one(one_process, tmp_path):
    """accelerate's multi-node flags, as on a cluster: one process on each of two "machines" (ranks 0 and 1) meeting
    at the main process's address."""
    port = str(_free_port())
    machines = [
        _launch(
            tmp_path / f"machine{rank}",
            *("--multi_gpu", "--use_cpu", "--num_processes", "2", "--num_machines", "2"),
            *("--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port),
            processes=2,
        )
        for rank in (0, 1)
    ]
    _finish(*machines)
    _assert_same_weights(one_process, _lora(tmp_path / "machine0"))  # the main process (machine 0) saves
    assert not (tmp_path / "machine1").exists()


FSDP2_ON_CPU = """\
distributed_type: FSDP
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_state_dict_type: FULL_STATE_DICT}
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def test_a_sharding_config_on_cpu_is_refused_rather_than_run_as_independent_copies(tmp_path):
    """accelerate runs an FSDP (or DeepSpeed) config on CPU as processes that never form a group: each would train
    its own copy and normalise its own rewards."""
    config = tmp_path / "fsdp2_cpu.yaml"
    config.write_text(FSDP2_ON_CPU)
    run = _launch(tmp_path / "out", "--accelerate_config", str(config))
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 1
    assert "2 processes were launched but the Trainer does not run distributed" in output
    assert "--multi_gpu --use_cpu" in output


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples" / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_the_shipped_accelerate_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_machines == 1 and config.num_processes >= 2
    assert config.distributed_type.value in ("MULTI_GPU", "DEEPSPEED", "FSDP")
