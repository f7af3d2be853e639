"""The GPU benchmark scripts' code paths, checked on a CPU with tiny dimensions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def test_families_gpu_tiny_runs_both_families(tmp_path):
    # As the GPU run: a subprocess (the script imports `overhead` from its own folder), results under $OUT, offline.
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "families_gpu.py"), "--tiny", "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "families_gpu.json").read_text())

    assert [family["family"] for family in results["families"]] == ["flux-dev", "qwen-image"]
    for family in results["families"]:
        assert family["error"] is None, family.get("traceback")
        # The tiny run takes the full-size run's path: checkpointing on, as at 1024 px on an H200.
        assert family["settings"]["activation_checkpointing"] and family["checkpointing_active"]
        assert family["settings"]["lora_r"] == 64 and family["settings"]["num_images"] == 4
        last = family["last"]
        for key in ("rollout_seconds", "train_seconds", "iteration_seconds", "iteration_seconds_per_image"):
            assert math.isfinite(last[key]) and last[key] > 0, (family["family"], key, last[key])
        assert last["iteration_seconds"] >= last["rollout_seconds"] + last["train_seconds"]
        assert math.isfinite(last["rollout_images_per_second"]) and math.isfinite(
            last["train_sample_steps_per_second"]
        )
    assert "| flux-dev |" in completed.stdout and "| qwen-image |" in completed.stdout
