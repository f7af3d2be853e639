"""What the model families' tests share: the calls a pipeline makes to its denoiser, a saved LoRA reloaded into a fresh
pipeline, and a short `trl nft` run."""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from trl_nft.preflight import check_launch
from trl_nft.scripts import nft


def module_calls(module: torch.nn.Module, run: Callable) -> list[tuple[tuple, dict, torch.Tensor]]:
    """The positional and keyword arguments and the first output of every call of `module` during `run()`, which runs
    without gradients."""
    calls = []
    hook = module.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, kwargs, output[0])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            run()
    finally:
        hook.remove()
    return calls


def assert_the_saved_lora_reproduces_the_policy(trainer, build_fresh: Callable, output_dir: Path, **call) -> None:
    """Save the trainer's LoRA to `output_dir` and load it into `build_fresh()`: the fresh pipeline samples what the
    trained policy (its EMA, which is what is saved) samples, within 1e-4, and not what the base samples. Both sample
    with the model's own scheduler, 4 steps from fixed noise; `call` adds the family's pipeline arguments. A video
    pipeline's videos (its `frames`) are compared as its images are."""
    trainer.save_model(str(output_dir))

    def images(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(5)
        output = pipeline(
            prompt=["a photo of object number 3"], num_inference_steps=4, generator=generator, output_type="np", **call
        )
        return np.asarray(output[0])  # the first output: `images`, or a video pipeline's `frames`

    trainer.pipeline.scheduler = trainer.adapter.model_scheduler  # as a fresh pipeline's
    with trainer.policies.evaluation_weights():
        expected = images(trainer.pipeline)
    fresh = build_fresh()
    base = images(fresh)
    fresh.load_lora_weights(str(output_dir))
    loaded = images(fresh)
    assert np.abs(loaded - base).max() > 1e-3, "training should have changed the policy"
    assert np.abs(loaded - expected).max() <= 1e-4


def run_trl_nft(model: str, tmp_path: Path, *flags: str) -> Path:
    """`trl nft --model MODEL` for one optimizer step of 4 images, offline, from `tmp_path`: the checks `trl nft` makes
    before it launches (`trl_nft.preflight`), then the training script that accelerate launches, on the arguments the
    launcher gives it, in this process (how `trl nft` launches it is the subject of test_cli.py, test_launcher.py and
    test_console.py). It must write the denoiser's LoRA and a model card naming the model. Returns the output folder."""
    output_dir = tmp_path / "out"
    argv = [
        "--model",
        model,
        "--reward",
        "jpeg_compressibility",
        "--dataset",
        "simple",
        "--output_dir",
        str(output_dir),
    ]
    argv += ["--report_to", "none", "--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "4"]
    argv += ["--num_generations", "4", "--num_inference_steps", "2", "--disable_tqdm", "true", *flags]
    working_dir = os.getcwd()
    os.chdir(tmp_path)  # relative paths are the user's
    try:
        script_argv, _ = check_launch(argv)
        nft.main(*nft.make_parser().parse_args_and_config(nft.with_model_preset(script_argv)))
    finally:
        os.chdir(working_dir)
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith(("transformer.", "unet.")) for key in weights)
    assert model in (output_dir / "README.md").read_text()
    return output_dir
