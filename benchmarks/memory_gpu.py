"""Measured against predicted peak GPU memory of the memory presets (docs/memory.md), on one GPU.

Each preset (`examples/configs/flux_dev_24gb.yaml`, `qwen_image_48gb.yaml`, `sd35m_16gb.yaml`) runs its architecture
with random weights (built offline on the GPU in bf16 by `families_gpu.py`'s and `sd35_medium_gpu.py`'s builders, the
tiny offline tokenizers) through the real `DiffusionNFTTrainer` for `--steps` (2) optimizer steps of one group, with
the preset's memory settings (quantization, activation checkpointing, offloading, batch sizes, resolution, LoRA), the
JPEG reward and the simple prompts. `torch.cuda.max_memory_allocated` over the run (after the model is built and
quantized) is compared with `trl_nft.memory`'s prediction for the same pipeline and settings (goal: within 15%). A
quantized preset saves the random pipeline to a temporary folder and loads it quantized, as the trainer does with a
pipeline instance (the GPU machine's disk holds it).

    python benchmarks/memory_gpu.py                       # on the GPU; JSON to $OUT/memory_gpu.json
    python benchmarks/memory_gpu.py --presets sd35m_16gb  # one preset
    python benchmarks/memory_gpu.py --tiny --device cpu   # the same code path at tiny sizes, on CPU (no peaks)

Run it as a script (`python benchmarks/...`), which puts this folder on the import path.
"""

import argparse
import gc
import json
import os
import time
import traceback

import torch
from datasets import Dataset
from families_gpu import FAMILIES
from overhead import PROMPTS, environment, write_results
from sd35_medium_gpu import SD35_MEDIUM, TINY, build_sd3_pipeline

from trl_nft import DiffusionNFTTrainer
from trl_nft.memory import GIB, MemoryModel, MemorySettings
from trl_nft.scripts.nft import make_parser


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "flux_dev_24gb": (FAMILIES["flux-dev"].build, FAMILIES["flux-dev"].sizes, FAMILIES["flux-dev"].tiny_sizes),
    "qwen_image_48gb": (FAMILIES["qwen-image"].build, FAMILIES["qwen-image"].sizes, FAMILIES["qwen-image"].tiny_sizes),
    "sd35m_16gb": (build_sd3_pipeline, SD35_MEDIUM, TINY),
}


def preset_config(name: str, output_dir: str, steps: int, tiny: bool, device: str):
    """The preset's `NFTConfig`, cut to `steps` optimizer steps of one group (its memory settings unchanged)."""
    path = os.path.join(REPO, "examples", "configs", f"{name}.yaml")
    _, config = make_parser().parse_args_and_config(["--config", path, "--output_dir", output_dir])
    config.gradient_accumulation_steps = config.steps_per_generation = max(
        1, config.num_generations // config.per_device_train_batch_size
    )
    config.max_steps, config.save_strategy, config.report_to = steps, "no", []
    config.eval_strategy, config.sample_logging_steps, config.disable_tqdm = "no", 0, True
    config.bf16, config.use_cpu = device != "cpu", device == "cpu"
    if device == "cpu" and config.quantization in ("nf4", "int8"):
        config.quantization = "int8-weight-only"  # bitsandbytes needs a GPU: the tiny CPU run checks the code path
    if tiny:
        config.resolution, config.max_sequence_length = 128, 64
    return config


def run_preset(name: str, args: argparse.Namespace) -> dict:
    build, sizes, tiny_sizes = PRESETS[name]
    config = preset_config(name, os.path.join(args.out, name), args.steps, args.tiny, args.device)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    pipeline = build(tiny_sizes if args.tiny else sizes, args.device, dtype)
    settings = MemorySettings.from_config(config)
    start = time.perf_counter()
    predicted = MemoryModel(pipeline, settings).estimate(settings)
    result = {
        "settings": {key: str(value) for key, value in vars(settings).items()},
        "estimate_seconds": time.perf_counter() - start,
        "predicted_peak_gib": predicted.peak / GIB,
        "predicted_sampling_peak_gib": predicted.rollout_peak / GIB,
        "predicted_training_peak_gib": predicted.training_peak / GIB,
        "predicted_table": predicted.table(),
    }
    rows = Dataset.from_dict({"prompt": PROMPTS})
    trainer = DiffusionNFTTrainer(pipeline, "jpeg_compressibility", args=config, train_dataset=rows)
    del pipeline  # the trainer holds its own (quantized) copy
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["resident_after_build_gib"] = torch.cuda.memory_allocated() / GIB
    trainer.train()
    if args.device == "cuda":
        measured = torch.cuda.max_memory_allocated() / GIB
        result["measured_peak_gib"] = measured
        result["predicted_over_measured"] = result["predicted_peak_gib"] / measured
    del trainer
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the code path, on any device)")
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "benchmarks", "results")))
    args = parser.parse_args()
    results = {"environment": environment(args.device), "presets": {}}
    path = os.path.join(args.out, "memory_gpu.json")
    for name in args.presets:
        try:
            results["presets"][name] = run_preset(name, args)
        except Exception as error:  # an out-of-memory error in one preset still runs the others
            results["presets"][name] = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write_results(results, path)
        print(json.dumps({name: {k: v for k, v in results["presets"][name].items() if k != "predicted_table"}}))


if __name__ == "__main__":
    main()
