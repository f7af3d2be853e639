"""One DiffusionNFT run on `digits-sd3` (or `--model digits-sd3-turbo`, from its own preset): accuracy of the reward
classifier and of the held-out judge, the images' sharpness and diversity, against optimizer steps and training
wall-clock (evaluation time excluded), with the velocity-norm metrics logged in between, written as JSON; the base's
and the latest evaluation's images as PNG grids beside it.

    python benchmarks/digits/run.py --name default --max_steps 60 --eval_every 10
    python benchmarks/digits/run.py --name control --shuffle_rewards      # rewards permuted within each rollout
    python benchmarks/digits/run.py --name beta0.1 --set nft_beta=0.1         # any NFTConfig field
    python benchmarks/digits/run.py --name gamed --add_reward jpeg_incompressibility:100  # a reward term to game
    python benchmarks/digits/run.py --name turbo --model digits-sd3-turbo   # the step-distilled model, its preset

Evaluation: the `digits` test split (each digit 10 times, one image per prompt, fixed noise), CFG-free, the
trainer's `evaluate()` (EMA weights when `ema_decay > 0`).
"""

import argparse
import json
import os
import random
import tempfile
import time

import torch
import yaml
from transformers import TrainerCallback

from trl_nft import DiffusionNFTTrainer, NFTConfig
from trl_nft.callbacks import RewardHackingGuardCallback
from trl_nft.embedded import model_preset
from trl_nft.embedded.digits_sd3_turbo import image_sharpness
from trl_nft.prompts.digits import digit_prompts
from trl_nft.rewards import get_reward, to_tensor
from trl_nft.rewards.digit_models import to_grayscale


# The settings every run starts from, those of the model's CLI preset (digits-sd3's for a folder; `--set` overrides
# any of them); the preset's script arguments (model, reward, prompts) and output settings are this script's own.
SCRIPT_KEYS = {"model_name_or_path", "reward", "dataset", "eval_dataset", "output_dir", "max_steps", "eval_steps"}
SCRIPT_KEYS |= {"eval_strategy", "eval_on_start", "logging_steps", "save_steps", "sample_logging_steps", "report_to"}
SCRIPT_KEYS |= {"seed"}


def preset_settings(model: str) -> dict:
    with open(model_preset(model) or model_preset("digits-sd3")) as file:
        return {key: value for key, value in yaml.safe_load(file).items() if key not in SCRIPT_KEYS}


class RecordEvaluations(TrainerCallback):
    """Keeps every evaluation's accuracies with the training time spent before it (evaluations excluded) and the
    mean training reward logged since the previous one, and rewrites the result file after each, so that an
    interrupted run keeps its points; with `guard` (the trainer's reward-hacking guard), the steps it warned at."""

    def __init__(self, path: str, result: dict):
        self.path, self.result, self.guard = path, result, None
        self.points, self.evaluation_seconds, self.start, self.last_step_end = [], 0.0, 0.0, 0.0
        self.train_rewards, self.train_norms = [], {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_step_end = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.train_rewards.append(logs["reward"])
        for key, value in (logs or {}).items():  # the velocity-norm instruments (issue [guard])
            if key.startswith(("velocity_norm_ratio", "loss/velocity_norm")):
                self.train_norms.setdefault(key, []).append(value)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The trainer evaluates right after a step ends (or before training, for the base point).
        now = time.perf_counter()
        point = {
            "step": state.global_step,
            "train_seconds": round(self.last_step_end - self.start - self.evaluation_seconds, 1),
            "reward": round(metrics["eval_reward"], 4),
            "classifier_accuracy": round(metrics["eval_rewards/digit_classifier_top1/mean"], 4),
            "judge_accuracy": round(metrics["eval_rewards/digit_judge/mean"], 4),
            "sharpness": round(metrics["eval_rewards/sharpness/mean"], 4),
            "diversity": round(metrics["eval_rewards/diversity/mean"], 4),
        }
        if self.train_rewards:
            point["train_reward"] = round(sum(self.train_rewards) / len(self.train_rewards), 4)
            self.train_rewards = []
        for key, values in self.train_norms.items():  # means of the values logged since the previous evaluation
            point[key] = round(sum(values) / len(values), 4)
        self.train_norms = {}
        self.evaluation_seconds += now - self.last_step_end
        self.points.append(point)
        print("EVAL", json.dumps(point), flush=True)
        stem = os.path.splitext(self.path)[0]
        save_grid(f"{stem}_step0.png" if state.global_step == 0 else f"{stem}.png")  # the base, and the latest
        self.write()

    def on_train_end(self, args, state, control, **kwargs):
        self.write()  # the guard acts after this callback at each evaluation: its last warning lands here

    def write(self) -> None:
        guard = {"guard_triggered_steps": self.guard.triggered_steps} if self.guard else {}
        with open(self.path, "w") as file:
            json.dump({**self.result, **guard, "points": self.points}, file, indent=1)


def sharpness(images, prompts, **columns) -> list[float]:
    """Each image's total variation per pixel (`image_sharpness`), which falls as an image blurs or fades."""
    return image_sharpness(to_grayscale(to_tensor(images))).tolist()


def diversity(images, prompts, **columns) -> list[float]:
    """Each image's RMS pixel distance to the mean image of its prompt's images in the same evaluation batch (the
    preset evaluates all 100 at once): falls toward 0 as samples of a prompt collapse onto one image."""
    gray = to_grayscale(to_tensor(images)).flatten(1)
    groups = {prompt: [i for i, p in enumerate(prompts) if p == prompt] for prompt in prompts}
    means = torch.stack([gray[groups[prompt]].mean(dim=0) for prompt in prompts])
    LAST_EVALUATION["images"] = to_grayscale(to_tensor(images))
    return (gray - means).pow(2).mean(dim=1).sqrt().tolist()


LAST_EVALUATION = {}  # the images of the latest evaluation, kept by `diversity` for `save_grid`


def save_grid(path: str) -> None:
    """The latest evaluation's images as a PNG grid (one column per prompt of the `digits` test split)."""
    from torchvision.utils import save_image

    save_image(LAST_EVALUATION["images"], path, nrow=10, padding=1, pad_value=0.5)


def digit_accuracy_reward(shuffle: bool, seed: int):
    """The `digit_accuracy` reward, or with `shuffle` the control: its values permuted within each rollout (the same
    reward distribution, no link to the images)."""
    reward, rng = get_reward("digit_accuracy"), random.Random(seed)

    def digit_accuracy(images, prompts, **columns):
        values = reward(images, prompts, **columns)
        if shuffle:
            rng.shuffle(values)
        return values

    return digit_accuracy


def run_config(benchmark: str, args, settings: dict) -> NFTConfig:
    """The `NFTConfig` of a benchmark run: `settings`, nothing saved, evaluated every `args.eval_every` steps."""
    return NFTConfig(
        output_dir=os.path.join(tempfile.gettempdir(), benchmark, args.name),
        max_steps=args.max_steps,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=args.eval_every,
        **settings,
    )


def run_record(args, model: str, settings: dict) -> dict:
    """What the JSON of a run says about it, before its evaluations."""
    return {
        "name": args.name,
        "model": model,
        "settings": settings,
        "shuffle_rewards": args.shuffle_rewards,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
    }


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="digits-sd3", help="a digits model: an embedded name or a folder")
    parser.add_argument("--max_steps", type=int, default=800)
    parser.add_argument("--eval_every", type=int, default=80)
    parser.add_argument("--shuffle_rewards", action="store_true", help="control: permute rewards within each rollout")
    parser.add_argument(
        "--add_reward",
        nargs="*",
        default=[],
        metavar="NAME:WEIGHT",
        help="more training rewards with their weights (digit_accuracy weighs 1)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="NFTConfig overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    overrides = dict(item.split("=", 1) for item in args.set)
    settings = {**preset_settings(args.model), **{key: parse_value(value) for key, value in overrides.items()}}
    added = [item.rsplit(":", 1) for item in args.add_reward]
    if added:
        settings["reward_weights"] = [1.0, *(float(weight) for _, weight in added)]
    torch.manual_seed(args.seed)
    digit_accuracy = digit_accuracy_reward(args.shuffle_rewards, args.seed)
    config = run_config("digits-benchmark", args, settings)
    os.makedirs(args.results_dir, exist_ok=True)
    result = run_record(args, args.model, settings)
    evaluation = RecordEvaluations(os.path.join(args.results_dir, f"{args.name}.json"), result)
    trainer = DiffusionNFTTrainer(
        args.model,
        [digit_accuracy, *(get_reward(name) for name, _ in added)],
        args=config,
        train_dataset=digit_prompts(),
        eval_dataset=digit_prompts(repeats=10),
        eval_reward_funcs=["digit_classifier_top1", "digit_judge", sharpness, diversity],
        callbacks=[evaluation],
    )
    callbacks = trainer.callback_handler.callbacks
    evaluation.guard = next((item for item in callbacks if isinstance(item, RewardHackingGuardCallback)), None)
    evaluation.on_train_begin(config, trainer.state, trainer.control)
    trainer.evaluate()  # the base model
    trainer.train()


if __name__ == "__main__":
    main()
