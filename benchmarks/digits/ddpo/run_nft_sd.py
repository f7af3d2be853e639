"""Our `DiffusionNFTTrainer` on `digits-sd` (the SD1.x digits pipeline DDPO trains in `run_ddpo.py`), with the same
reward and the same evaluation protocol (`common.Evaluator`: 100 images, fixed noise, deterministic DDIM 10 steps,
CFG-free and CFG 5), in the main environment:

    python benchmarks/digits/ddpo/run_nft_sd.py --max_seconds 900
    python benchmarks/digits/ddpo/run_nft_sd.py --name nft_lr1e-4 --set learning_rate=1e-4

Settings: `NFT_SETTINGS`, pinned here rather than read from `trl_nft/presets/digits_sd3.yaml` (that preset's
full fine-tuning settings, with the SD1.x changes: DDIM rollouts, a UNet-sized learning rate); `--set FIELD=VALUE`
overrides any NFTConfig field. Training is CFG-free (DiffusionNFT's design). `train_seconds` is the trainer's
wall-clock with evaluations excluded (from the start of training to the end of each evaluated step).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import Evaluator  # noqa: E402
from run import parse_value  # noqa: E402  (benchmarks/digits/run.py)

from trl_nft import DiffusionNFTTrainer, NFTConfig  # noqa: E402
from trl_nft.prompts.digits import digit_prompts  # noqa: E402


#: A rollout is the ten prompts x 8 images, trained on in 8 full fine-tuning steps of 10 images, 4 of its 10 times
#: each. At the digits-sd3 preset's learning rate (1e-3) this UNet collapses within 8 steps; 3e-4 learnt fastest of
#: 1e-4 and 3e-4 in 100 s trials.
NFT_SETTINGS = {
    "per_device_train_batch_size": 10,
    "steps_per_generation": 8,
    "num_generations": 8,
    "num_inference_steps": 10,
    "sampler": "DDIMScheduler",
    "train_timestep_fraction": 0.4,
    "use_peft": False,
    "learning_rate": 3e-4,
    "nft_beta": 1.0,
    "advantage_clip": 1.0,
    "kl_coef": 0.0,
    "ema_decay": 0.0,
}


class EvaluateEvery(TrainerCallback):
    """Every `eval_every` optimizer steps (and before training), `common.Evaluator` on the trainer's pipeline; the
    time spent evaluating is excluded from `train_seconds`. Stops training after `max_seconds` of it. `trainer` is set
    once the trainer exists (it takes its callbacks at construction)."""

    def __init__(self, evaluator, eval_every, max_seconds, path, result):
        self.trainer, self.evaluator, self.path, self.result = None, evaluator, path, result
        self.eval_every, self.max_seconds = eval_every, max_seconds
        self.start, self.evaluation_seconds = None, 0.0

    def train_seconds(self, now: float) -> float:
        return now - self.start - self.evaluation_seconds

    def evaluate(self, step: int, now: float) -> None:
        point = {"step": step, "train_seconds": round(self.train_seconds(now), 1)}
        point.update(self.evaluator(self.trainer.pipeline))
        self.result["points"].append(point)
        print("EVAL", json.dumps(point), flush=True)
        with open(self.path, "w") as file:
            json.dump(self.result, file, indent=1)
        self.evaluation_seconds += time.perf_counter() - now

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.evaluate(0, self.start)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        over = self.train_seconds(now) >= self.max_seconds
        if state.global_step % self.eval_every == 0 or over:
            self.evaluate(state.global_step, now)
        if over:
            control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="nft")
    parser.add_argument("--max_seconds", type=float, default=900, help="training wall-clock budget")
    parser.add_argument("--eval_every", type=int, default=16, help="optimizer steps between evaluations")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="NFTConfig overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results_dir", default=os.path.join(HERE, "..", "results", "ddpo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    overrides = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    settings = {**NFT_SETTINGS, **overrides}
    config = NFTConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "digits-ddpo-benchmark", args.name),
        max_steps=100_000,  # stopped by the wall-clock budget
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=8,
        **settings,
    )
    os.makedirs(args.results_dir, exist_ok=True)
    result = {
        "name": args.name,
        "trainer": "trl_nft DiffusionNFTTrainer",
        "settings": settings,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "eval": "100 images (each digit 10x), fixed noise, DDIM 10 steps eta 0; CFG 1 and CFG 5",
        "points": [],
    }
    callback = EvaluateEvery(
        Evaluator(),
        args.eval_every,
        args.max_seconds,
        os.path.join(args.results_dir, f"{args.name}.json"),
        result,
    )
    trainer = DiffusionNFTTrainer(
        "digits-sd", "digit_accuracy", args=config, train_dataset=digit_prompts(), callbacks=[callback]
    )
    callback.trainer = trainer
    trainer.train()


if __name__ == "__main__":
    main()
