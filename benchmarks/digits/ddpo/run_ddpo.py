"""TRL 0.23.1's real `DDPOTrainer` on `digits-sd` (the SD1.x digits pipeline): accuracy against training wall-clock.

Runs in the virtual environment `setup_venv.sh` makes (TRL 0.23.1 and the diffusers / transformers of its era), never
in the main one, and imports nothing from the `trl_nft` package (see `common.py`):

    benchmarks/digits/ddpo/.venv/bin/python benchmarks/digits/ddpo/run_ddpo.py --max_seconds 900

Reward: the reward classifier's probability of the prompted digit (what `digit_accuracy` computes). Prompts: the ten
digit prompts, drawn at random. DDPO's defaults (PPO clip range 1e-4, advantage clip 5, learning rate 3e-4, eta 1,
CFG 5 at sampling and training, LoRA unless `--use_lora 0`; `compare.sh` fine-tunes fully, which learnt faster on
this tiny UNet) except where CPU sizing needs otherwise: 10 sampler steps, 80 images an epoch
(5 batches of 16), 16 images a training batch, fp32; per-prompt advantage normalisation is on (as in DDPO's own
runs). The sampling CFG stays at its default 5.0: TRL 0.23.1's CFG-free sampling is broken (its pipeline step always
concatenates the negative prompts), and its users ran CFG 5.

After every `--eval_every` epochs: `common.Evaluator` (100 images, fixed noise, deterministic DDIM, CFG-free and
CFG 5). `train_seconds` is the time spent in `DDPOTrainer.step` (sampling, rewards, training), evaluations
excluded. Points go to `--output` after each evaluation.
"""

import argparse
import json
import os
import platform
import random
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DIGITS_SD_PATH, Clock, Evaluator, load_standalone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_seconds", type=float, default=900, help="training wall-clock budget")
    parser.add_argument("--max_epochs", type=int, default=10_000)
    parser.add_argument("--eval_every", type=int, default=5, help="epochs between evaluations")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--use_lora", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "..", "results", "ddpo", "ddpo.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from accelerate import PartialState

    PartialState()  # before the trainer's Accelerator: without it, DDPOTrainer fails on a CPU-only machine

    import diffusers
    import transformers
    import trl
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    digit_models = load_standalone("rewards", "digit_models.py")
    prompts = load_standalone("prompts", "digits.py")
    classifier = digit_models.load_classifier()
    rng = random.Random(args.seed)

    def prompt_function():
        digit = rng.randrange(10)
        return prompts.digit_prompt(digit), {"digit": digit}

    @torch.no_grad()
    def reward_function(images, prompts, metadata):
        # images: [B, 3, 16, 16] in [0, 1] (DDPO decodes with output_type="pt")
        probabilities = classifier(digit_models.to_grayscale(images.float().cpu())).softmax(-1)
        targets = torch.tensor([m["digit"] for m in metadata])
        return probabilities[torch.arange(len(targets)), targets], {}

    config = DDPOConfig(
        num_epochs=args.max_epochs,
        sample_num_steps=10,
        sample_eta=1.0,
        sample_guidance_scale=5.0,
        sample_batch_size=16,
        sample_num_batches_per_epoch=5,  # 80 images an epoch
        train_batch_size=16,
        train_gradient_accumulation_steps=1,
        train_learning_rate=args.learning_rate,
        train_num_inner_epochs=1,
        train_cfg=True,
        train_timestep_fraction=1.0,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=16,
        per_prompt_stat_tracking_min_count=16,
        mixed_precision="no",
        log_with=None,
        save_freq=10**9,
        seed=args.seed,
        project_kwargs={"logging_dir": "/tmp/ddpo-digits/logs", "project_dir": "/tmp/ddpo-digits"},
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(DIGITS_SD_PATH, use_lora=bool(args.use_lora))
    trainer = DDPOTrainer(config, reward_function, prompt_function, pipeline)
    sd_pipeline = pipeline.sd_pipeline
    sd_pipeline.set_progress_bar_config(disable=True)
    evaluator = Evaluator()

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    result = {
        "name": "ddpo",
        "trainer": f"trl {trl.__version__} DDPOTrainer",
        "versions": {
            "trl": trl.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            key: value
            for key, value in config.to_dict().items()
            if key.startswith(("sample_", "train_", "per_prompt")) or key in {"seed", "mixed_precision"}
        },
        "use_lora": bool(args.use_lora),
        "torch_threads": torch.get_num_threads(),
        "eval": "100 images (each digit 10x), fixed noise, DDIM 10 steps eta 0; CFG 1 and CFG 5",
        "points": [],
    }
    clock, global_step, epoch = Clock(), 0, 0

    def evaluate():
        point = {"step": global_step, "epoch": epoch, "train_seconds": round(clock.train_seconds, 1)}
        point.update(evaluator(sd_pipeline))
        result["points"].append(point)
        print("EVAL", json.dumps(point), flush=True)
        with open(args.output, "w") as file:
            json.dump(result, file, indent=1)

    evaluate()  # the base model
    start = time.perf_counter()
    while epoch < args.max_epochs and clock.train_seconds < args.max_seconds:
        clock.start()
        global_step = trainer.step(epoch, global_step)
        clock.stop()
        epoch += 1
        if epoch % args.eval_every == 0:
            evaluate()
    if epoch % args.eval_every:
        evaluate()
    print(f"done: {epoch} epochs, {clock.train_seconds:.0f} s training, {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
