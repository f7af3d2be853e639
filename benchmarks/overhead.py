"""Cost of one DiffusionNFT iteration, and the trainer's overhead over the same work done by hand.

Two implementations of the same iteration run alternately in one process:

- **trainer**: `DiffusionNFTTrainer.train()`; its rollout / reward / train split comes from the timings it logs
  (`timing/*_seconds` in `trainer.state.log_history`), its total is the wall-clock of each of its steps.
- **direct**: the same work written straight against diffusers, peft and torch (`DirectNFT` below): encode the prompts
  once, sample with the pipeline and the same DPM-Solver++ flow scheduler, decode with the VAE, score with the JPEG
  reward, then for each training time an old-policy forward, a reference forward (when `kl_coef > 0`) and a policy
  forward + backward through `trl_nft.objective.nft_loss`, then clipping, an AdamW step on the LoRA parameters and the
  old-policy soft update.

A callback runs the direct iterations between the trainer's steps, so both see the same machine state and the
trainer/direct ratio is measured in one run; medians over the rounds remove most of the remaining noise.

    python benchmarks/overhead.py                       # tiny-sd3 on CPU, kl_coef 1e-4 and 0
    python benchmarks/overhead.py --device cuda --model stabilityai/stable-diffusion-3.5-medium --resolution 512

`benchmarks/sd35_medium_gpu.py` imports `run_benchmark` from here for the SD3.5-Medium architecture on a GPU.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import diffusers
import numpy as np
import peft
import torch
import transformers
from datasets import Dataset
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from peft import LoraConfig
from PIL import Image
from transformers import PrinterCallback, TrainerCallback

import trl_nft
from trl_nft import DiffusionNFTTrainer, NFTConfig
from trl_nft.models import SD3Adapter, load_pipeline
from trl_nft.objective import (
    forward_process,
    group_advantages,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    soft_update_,
)
from trl_nft.rewards.jpeg import jpeg_compressibility


PHASES = ("rollout", "reward", "train")
PROMPTS = [
    "a photo of a red bicycle leaning against a brick wall",
    "an oil painting of a lighthouse in a storm",
    "a bowl of ramen on a wooden table, top-down view",
    "a watercolor fox sleeping in the snow",
    "a neon sign that says open in a rainy street",
    "a close-up of a bee on a sunflower",
    "a cozy reading nook with a cat, warm light",
    "a futuristic city skyline at dawn",
]


def synchronized_clock(device: torch.device) -> float:
    """`time.perf_counter()` after the device has finished its queued work, so GPU time lands in the right phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_config(
    output_dir: str,
    *,
    device: str,
    bf16: bool,
    resolution: int | None,
    batch_size: int,
    num_generations: int,
    num_inference_steps: int,
    max_sequence_length: int,
    kl_coef: float,
    max_steps: int,
    compiled: bool = False,
) -> NFTConfig:
    """The trainer's configuration; the direct implementation reads its hyper-parameters from the same object."""
    return NFTConfig(
        output_dir=output_dir,
        use_cpu=device == "cpu",
        bf16=bf16,
        resolution=resolution,
        per_device_train_batch_size=batch_size,
        num_generations=num_generations,
        num_inference_steps=num_inference_steps,
        max_sequence_length=max_sequence_length,
        kl_coef=kl_coef,
        max_steps=max_steps,
        torch_compile=compiled,
        logging_steps=1,  # one log_history entry (with its timings) per step
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


class DirectNFT:
    """One DiffusionNFT iteration written directly against diffusers, peft and torch: the baseline of the benchmark.

    It does the trainer's work and nothing else: the same pipeline class and sampler, two LoRA adapters on one
    transformer (trained and old policy; reference = adapters disabled), the same loss function, clipping, fused AdamW
    and soft update. What it leaves out is the trainer's bookkeeping (Trainer loop, dataloader, logging, metrics,
    reproducible CPU-side random streams), which is exactly the overhead being measured.
    """

    def __init__(self, pipeline: DiffusionPipeline, config: NFTConfig, device: torch.device, compiled: bool = False):
        self.pipeline = pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.config = config
        self.device = device
        self.resolution = config.resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        self.step = 0
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)

        # The trainer's default sampler: DPM-Solver++(2M) switched to flow sigmas with the model's shift.
        base = pipeline.scheduler.config
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            {key: value for key, value in base.items() if key != "shift"},
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=base.get("shift", 1.0),
        )

        # Trained and old policy as two adapters on one transformer, LoRA weights in float32 as in the trainer.
        transformer = pipeline.transformer
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(SD3Adapter.lora_target_modules),
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            transformer.add_adapter(lora_config, adapter_name="old")
            transformer.add_adapter(lora_config, adapter_name="default")
        transformer.set_adapter("default")
        names = dict(transformer.named_parameters())
        trained = [name for name in names if ".default." in name]
        self.trained_params = [names[name] for name in trained]
        self.old_params = [names[name.replace(".default.", ".old.")] for name in trained]
        for param in self.trained_params + self.old_params:
            param.data = param.data.float()
        soft_update_(self.old_params, self.trained_params, decay=0.0)
        if compiled:  # torch.compile of each transformer block, as diffusers' regional compilation does
            for block in transformer.transformer_blocks:
                block.compile()
        self.optimizer = torch.optim.AdamW(
            self.trained_params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
            fused=True,  # transformers' default optimizer, adamw_torch_fused
        )

    def autocast(self):
        # bf16 as in the trainer: frozen weights stored in bf16, forwards autocast, LoRA weights and the loss in fp32.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor):
        with self.autocast():
            return self.pipeline.transformer(
                hidden_states=noisy,
                timestep=sigmas * self.pipeline.scheduler.config.num_train_timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()

    def iteration(self, unique_prompts: list[str]) -> dict[str, float]:
        """One full iteration on `num_generations` images per prompt; returns the seconds of each phase and in total."""
        config, pipeline, transformer = self.config, self.pipeline, self.pipeline.transformer
        group = config.num_generations
        start = synchronized_clock(self.device)

        # Rollout: encode each prompt once, sample its group with the old policy, decode to images.
        with torch.no_grad():
            embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt=unique_prompts,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=config.max_sequence_length,
            )
            embeds, pooled = embeds.repeat_interleave(group, dim=0), pooled.repeat_interleave(group, dim=0)
            transformer.set_adapter("old")
            with self.autocast():
                latents = pipeline(
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=1.0,
                    height=self.resolution,
                    width=self.resolution,
                    generator=torch.Generator("cpu").manual_seed(self.step),
                    output_type="latent",
                    max_sequence_length=config.max_sequence_length,
                ).images
            transformer.set_adapter("default")
            grid = pipeline.scheduler.timesteps.float().to(self.device) / pipeline.scheduler.config.num_train_timesteps
            vae = pipeline.vae
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor)[0]
            pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
            images = [Image.fromarray(image) for image in pixels.astype(np.uint8)]
        rollout_end = synchronized_clock(self.device)

        # Reward, then optimality probabilities from the group-normalised advantages.
        prompts = [prompt for prompt in unique_prompts for _ in range(group)]
        rewards = torch.tensor(jpeg_compressibility(images, prompts))
        advantages = group_advantages(rewards, group, config.scale_rewards)
        optimality = optimality_probability(advantages, config.advantage_clip).to(self.device)
        reward_end = synchronized_clock(self.device)

        # Training on the forward process at a random 99 % of the rollout's times per image, fresh noise each time.
        num_images, num_times = len(latents), len(grid)
        num_train_times = max(1, int(num_times * config.train_timestep_fraction))
        picks = torch.rand(num_images, num_times, device=self.device).argsort(dim=1)[:, :num_train_times]
        for j in range(num_train_times):
            sigmas = grid[picks[:, j]]
            noise = torch.randn_like(latents)
            noisy, _ = forward_process(latents, noise, sigmas)
            with torch.no_grad():
                transformer.set_adapter("old")
                old_velocity = self.velocity(noisy, sigmas, embeds, pooled)
                transformer.set_adapter("default")
                reference_velocity = None
                if config.kl_coef > 0:
                    transformer.disable_adapters()
                    reference_velocity = self.velocity(noisy, sigmas, embeds, pooled)
                    transformer.enable_adapters()
            loss = nft_loss(
                self.velocity(noisy, sigmas, embeds, pooled),
                old_velocity,
                noisy.float(),
                latents.float(),
                noise.float(),
                sigmas,
                optimality,
                nft_beta=config.nft_beta,
                loss_type=config.loss_type,
                advantage_clip=config.advantage_clip,
                reference_velocity=reference_velocity,
                kl_coef=config.kl_coef,
            )
            (loss.loss / num_train_times).backward()
        train_end = synchronized_clock(self.device)

        # Clipping, optimizer step and old-policy soft update (reported as "other").
        torch.nn.utils.clip_grad_norm_(self.trained_params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        decay = old_policy_decay(
            self.step,
            config.old_policy_decay_schedule,
            rate=config.old_policy_decay_rate,
            maximum=config.old_policy_decay_max,
            delay=config.old_policy_decay_delay,
        )
        soft_update_(self.old_params, self.trained_params, decay)
        end = synchronized_clock(self.device)
        return {
            "rollout": rollout_end - start,
            "reward": reward_end - rollout_end,
            "train": train_end - reward_end,
            "total": end - start,
        }


class InterleaveCallback(TrainerCallback):
    """Alternates the two implementations inside one `trainer.train()` call and times the trainer's steps.

    After every `steps` trainer steps it runs `steps` direct iterations. A trainer step's time is the wall-clock from
    the end of the previous step (or of the direct iterations that followed it) to the end of this one: a full cycle of
    the Trainer loop, including dataloader, logging, optimizer and the old-policy update (a callback registered before
    this one), and excluding the direct work.
    """

    def __init__(self, direct: DirectNFT, steps: int, label: str):
        self.direct, self.steps, self.label = direct, steps, label
        self.trainer_seconds: list[float] = []
        self.direct_timings: list[dict[str, float]] = []
        # On a GPU: the highest allocation during each side's work.
        self.peak_memory_gib = {"trainer": 0.0, "direct": 0.0}
        self._last = 0.0

    def _reset_peak(self) -> None:
        if self.direct.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.direct.device)

    def _record_peak(self, impl: str) -> None:
        if self.direct.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.direct.device) / 2**30
            self.peak_memory_gib[impl] = max(self.peak_memory_gib[impl], peak)

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset_peak()
        self._last = synchronized_clock(self.direct.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer_seconds.append(synchronized_clock(self.direct.device) - self._last)
        self._record_peak("trainer")
        print(
            f"[{self.label}] trainer step {state.global_step}/{state.max_steps}: {self.trainer_seconds[-1]:.3f} s",
            flush=True,
        )
        if state.global_step % self.steps == 0:
            self._reset_peak()
            num_prompts = args.per_device_train_batch_size // args.num_generations
            for _ in range(self.steps):
                first = self.direct.step * num_prompts
                unique_prompts = [PROMPTS[(first + i) % len(PROMPTS)] for i in range(num_prompts)]
                self.direct_timings.append(self.direct.iteration(unique_prompts))
                print(
                    f"[{self.label}] direct iteration {len(self.direct_timings)}: {self.direct_timings[-1]['total']:.3f} s",
                    flush=True,
                )
            self._record_peak("direct")
            self._reset_peak()
        self._last = synchronized_clock(self.direct.device)


def summarize(timings: list[dict[str, float]], num_images: int, num_train_times: int) -> dict:
    """Medians of each phase and of the total, the remainder ("other") and the throughputs they imply."""
    median = {key: statistics.median(t[key] for t in timings) for key in (*PHASES, "total")}
    median["other"] = statistics.median(t["total"] - sum(t[phase] for phase in PHASES) for t in timings)
    return {
        "iterations": timings,
        "median_seconds": median,
        "rollout_images_per_second": num_images / median["rollout"],
        "train_sample_steps_per_second": num_images * num_train_times / median["train"],
        "seconds_per_image": median["total"] / num_images,
    }


def run_config(
    pipeline_factory: Callable[[], DiffusionPipeline],
    *,
    kl_coef: float,
    device: str,
    bf16: bool,
    resolution: int | None,
    batch_size: int,
    num_generations: int,
    num_inference_steps: int,
    max_sequence_length: int,
    steps: int,
    repeats: int,
    compiled: bool = False,
) -> dict:
    """Measure one configuration: one warm-up round, then `repeats` rounds of `steps` trainer steps followed by `steps`
    direct iterations. Builds two pipelines with `pipeline_factory` (one each: the trainer adds its own adapters).
    `compiled`: both sides compile the transformer's blocks (the trainer with `torch_compile`); the warm-up round
    holds the compilation."""
    label = f"kl_coef={kl_coef:g}, {'compiled' if compiled else 'eager'}"
    with tempfile.TemporaryDirectory() as output_dir:
        config = make_config(
            output_dir,
            device=device,
            bf16=bf16,
            resolution=resolution,
            batch_size=batch_size,
            num_generations=num_generations,
            num_inference_steps=num_inference_steps,
            max_sequence_length=max_sequence_length,
            kl_coef=kl_coef,
            max_steps=(1 + repeats) * steps,
            compiled=compiled,
        )
        start = time.perf_counter()
        trainer = DiffusionNFTTrainer(
            model=pipeline_factory(),
            reward_funcs="jpeg_compressibility",
            args=config,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )
        direct = DirectNFT(pipeline_factory(), config, trainer.accelerator.device, compiled=compiled)
        print(f"[{label}] built trainer and direct pipelines in {time.perf_counter() - start:.1f} s", flush=True)

        trainer.remove_callback(PrinterCallback)  # the per-step log dicts would drown the progress lines
        interleave = InterleaveCallback(direct, steps, label)
        trainer.add_callback(interleave)  # after the old-policy update, so that it is inside the trainer's step
        start = time.perf_counter()
        trainer.train()
        wall_clock = time.perf_counter() - start

    # Guards on "same work": the same sampler and time grid, and the same number of trained (LoRA) parameters.
    if trainer.pipeline.scheduler.__class__ is not direct.pipeline.scheduler.__class__ or not torch.equal(
        trainer.pipeline.scheduler.timesteps.cpu(), direct.pipeline.scheduler.timesteps.cpu()
    ):
        raise RuntimeError(
            "The trainer and the direct implementation sampled with different schedulers or time grids."
        )
    trainer_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainer_params != sum(p.numel() for p in direct.trained_params):
        raise RuntimeError("The trainer and the direct implementation train different numbers of parameters.")

    # The trainer's own split, one log entry per step; the first round is the warm-up and is left out.
    logs = [entry for entry in trainer.state.log_history if "timing/train_seconds" in entry]
    trainer_timings = [
        {**{phase: entry[f"timing/{phase}_seconds"] for phase in PHASES}, "total": total}
        for entry, total in zip(logs, interleave.trainer_seconds, strict=True)
    ][steps:]
    direct_timings = interleave.direct_timings[steps:]

    num_images = batch_size
    num_train_times = max(1, int(num_inference_steps * config.train_timestep_fraction))
    trainer_summary = summarize(trainer_timings, num_images, num_train_times)
    direct_summary = summarize(direct_timings, num_images, num_train_times)
    result = {
        "kl_coef": kl_coef,
        "compiled": compiled,
        "resolution": trainer.resolution,
        "num_train_times": num_train_times,
        "trained_parameters": trainer_params,
        "trainer": trainer_summary,
        "direct": direct_summary,
        "ratio_trainer_over_direct": {
            key: trainer_summary["median_seconds"][key] / direct_summary["median_seconds"][key]
            for key in (*PHASES, "total")
        },
        # Each trainer step against the direct iteration next to it in time: robust to load that drifts during the run.
        "paired_ratio_total_median": statistics.median(
            t["total"] / d["total"] for t, d in zip(trainer_timings, direct_timings, strict=True)
        ),
        "train_call_seconds": wall_clock,
    }
    if direct.device.type == "cuda":
        # Both pipelines stay on the GPU throughout, so each peak includes the other side's weights.
        result["peak_memory_gib_both_pipelines"] = interleave.peak_memory_gib

    # Free both pipelines before the next configuration builds its own.
    del trainer, direct, interleave
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_benchmark(
    pipeline_factory: Callable[[], DiffusionPipeline],
    *,
    kl_coefs: tuple[float, ...] = (1e-4, 0.0),
    compile_modes: tuple[bool, ...] = (False,),
    device: str = "cpu",
    bf16: bool = False,
    resolution: int | None = None,
    batch_size: int = 16,
    num_generations: int = 8,
    num_inference_steps: int = 10,
    max_sequence_length: int = 128,
    steps: int = 1,
    repeats: int = 5,
    model_name: str = "",
    extra_settings: dict | None = None,
    output: str | None = None,
) -> dict:
    """Trainer vs. direct iteration for each `kl_coef` and compile mode (False: eager); returns a JSON-ready dict (see `format_table`). With `output`,
    the results so far are written there after each configuration, so a run cut short still leaves numbers."""
    settings = {
        "model": model_name,
        "device": device,
        "dtype": "bf16" if bf16 else "fp32",
        "resolution": resolution,
        "batch_size": batch_size,
        "num_generations": num_generations,
        "num_inference_steps": num_inference_steps,
        "max_sequence_length": max_sequence_length,
        "steps_per_round": steps,
        "measured_rounds": repeats,
        "warmup_rounds": 1,
        **(extra_settings or {}),
    }
    results = {"settings": settings, "environment": environment(device), "configs": []}
    for kl_coef, compiled in ((kl_coef, compiled) for kl_coef in kl_coefs for compiled in compile_modes):
        results["configs"].append(
            run_config(
                pipeline_factory,
                kl_coef=kl_coef,
                compiled=compiled,
                device=device,
                bf16=bf16,
                resolution=resolution,
                batch_size=batch_size,
                num_generations=num_generations,
                num_inference_steps=num_inference_steps,
                max_sequence_length=max_sequence_length,
                steps=steps,
                repeats=repeats,
            )
        )
        print(format_table({"configs": results["configs"][-1:]}), flush=True)
        if output:
            write_results(results, output)
    return results


def environment(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl_nft": trl_nft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(results: dict) -> str:
    """The results as a markdown table: per configuration, the trainer and direct medians and their ratio."""
    lines = [
        "| kl_coef | compiled | impl | rollout s | reward s | train s | other s | total s | rollout img/s | train sample-steps/s | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in results["configs"]:
        kl_coef, compiled = f"{config['kl_coef']:g}", "yes" if config.get("compiled") else "no"
        for impl in ("trainer", "direct"):
            summary = config[impl]
            median = summary["median_seconds"]
            lines.append(
                f"| {kl_coef} | {compiled} | {impl} | {median['rollout']:.3f} | {median['reward']:.3f} | "
                f"{median['train']:.3f} | {median['other']:.3f} | {median['total']:.3f} | "
                f"{summary['rollout_images_per_second']:.1f} | {summary['train_sample_steps_per_second']:.1f} | "
                f"{summary['seconds_per_image']:.4f} |"
            )
        ratio = config["ratio_trainer_over_direct"]
        lines.append(
            f"| {kl_coef} | {compiled} | **trainer / direct** | {ratio['rollout']:.3f} | {ratio['reward']:.3f} | "
            f"{ratio['train']:.3f} | | **{ratio['total']:.3f}** (paired: {config['paired_ratio_total_median']:.3f}) | | | |"
        )
    return "\n".join(lines)


def write_results(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}", flush=True)


def add_common_arguments(
    parser: argparse.ArgumentParser, *, batch_size: int, steps: int, repeats: int, compile_default: str = "eager"
) -> None:
    """Flags shared by the benchmark scripts (each passes its own defaults)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="Weights and autocast dtype (default: bf16 on cuda, fp32 on cpu).",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Image side in pixels (default: the model's own)."
    )
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help="Images per iteration (per_device_train_batch_size)."
    )
    parser.add_argument("--num-generations", type=int, default=8, help="Images per prompt (group size).")
    parser.add_argument("--num-inference-steps", type=int, default=10, help="Rollout sampler steps.")
    parser.add_argument("--steps", type=int, default=steps, help="Iterations of each implementation per round.")
    parser.add_argument("--repeats", type=int, default=repeats, help="Measured rounds (after one warm-up round).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 with --device cpu, torch's own with cuda). On a CPU shared with other "
        "jobs, multi-threaded kernels slow down many-fold when the cores are oversubscribed; 1 thread degrades gracefully.",
    )
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=[1e-4, 0.0], help="kl_coef values to measure.")
    parser.add_argument(
        "--compile",
        choices=("eager", "compiled", "both"),
        default=compile_default,
        help="Eager, the transformer's blocks compiled (trainer: torch_compile), or both, each kl_coef.",
    )


def compile_modes(args: argparse.Namespace) -> tuple[bool, ...]:
    """The `--compile` choice as `run_benchmark`'s `compile_modes`."""
    return {"eager": (False,), "compiled": (True,), "both": (False, True)}[args.compile]


def parse_common(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, bool]:
    """Parse the flags, set torch's CPU threads, and return the arguments and whether to run in bf16."""
    args = parser.parse_args()
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    bf16 = (args.dtype or ("bf16" if args.device == "cuda" else "fp32")) == "bf16"
    return args, bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sd3", help="'tiny-sd3', a local folder or a Hub id (SD3 family).")
    add_common_arguments(parser, batch_size=16, steps=1, repeats=12)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "overhead_cpu.json"))
    args, bf16 = parse_common(parser)
    dtype = torch.bfloat16 if bf16 else torch.float32
    results = run_benchmark(
        lambda: load_pipeline(args.model, torch_dtype=dtype),
        kl_coefs=tuple(args.kl_coefs),
        compile_modes=compile_modes(args),
        device=args.device,
        bf16=bf16,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_generations=args.num_generations,
        num_inference_steps=args.num_inference_steps,
        steps=args.steps,
        repeats=args.repeats,
        model_name=args.model,
        output=args.output,
    )
    print(format_table(results), flush=True)


if __name__ == "__main__":
    main()
