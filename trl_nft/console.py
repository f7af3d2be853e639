"""What a run prints, made to read like a TRL run's: a short line of the metrics that matter at each log (every
metric still reaches the trackers and `trainer.state.log_history`), progress bars that write no escape codes into a
redirected log, the last step always logged, and the closing list of what the run left on disk. (The launcher's own
quieting of accelerate is `trl_nft.cli`'s: it stays free of these imports.)"""

import fnmatch
import os
import re

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback


#: What the console line shows, in this order (`*`: any reward's name). An allow-list: metrics added later reach the
#: trackers and the log history without lengthening the line.
CONSOLE_METRICS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "reward",
    "reward_std",
    "rewards/*/mean",
    "eval_reward",
    "eval_rewards/*/mean",
    "train_runtime",
    "train_loss",
    "epoch",
)
#: Counters of things that went wrong: shown only when not 0.
FAULT_METRICS = "faults/*"


def console_metrics(logs: dict) -> dict:
    """The entries of `logs` the console shows: `CONSOLE_METRICS` in their order, then the non-zero fault counters."""
    shown = {}
    for pattern in CONSOLE_METRICS:
        shown.update((key, value) for key, value in logs.items() if fnmatch.fnmatchcase(key, pattern))
    shown.update((key, value) for key, value in logs.items() if fnmatch.fnmatchcase(key, FAULT_METRICS) and value)
    return shown


class ShortProgressCallback(ProgressCallback):
    """transformers' progress bar, whose log lines show `console_metrics` only."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_metrics(logs or {}), **kwargs)


class ShortPrinterCallback(PrinterCallback):
    """transformers' printer (`disable_tqdm=True`), printing `console_metrics` only."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_metrics(logs or {}), **kwargs)


class LogLastStepCallback(TrainerCallback):
    """Log at the last step too (transformers logs every `logging_steps` only), so that a run whose length is not a
    multiple of `logging_steps` still logs its final metrics: the model card and the closing summary read them."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.logging_strategy == "steps" and state.global_step >= state.max_steps:
            control.should_log = True


def use_short_console_logs(callback_handler: CallbackHandler) -> None:
    """Swap transformers' own progress bar and printer in `callback_handler` for the short-line ones, in place (a
    notebook's progress table, or a user's own subclass, is left as it is), and log the last step."""
    short = {ProgressCallback: ShortProgressCallback, PrinterCallback: ShortPrinterCallback}
    callbacks = callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) in short:
            callbacks[index] = short[type(callback)]()
    callback_handler.add_callback(LogLastStepCallback())


def rollout_progress_bar(total: int, description: str, show: bool) -> tqdm:
    """A bar under the training bar for the images of one rollout (or evaluation), cleared when done. Drawn only on a
    terminal: below another bar, tqdm moves the cursor with escape codes, which a redirected log would keep."""
    return tqdm(total=total, desc=description, unit="img", leave=False, disable=None if show else True)


def saved_files_summary(output_dir: str) -> str:
    """What a finished run left in `output_dir`, one line per kind of file found there (nothing that is not there)."""
    entries = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    lines = []
    if "pytorch_lora_weights.safetensors" in entries:
        lines.append(f'the LoRA: pipeline.load_lora_weights("{output_dir}")')
    weights = sorted(entry for entry in entries if os.path.isfile(os.path.join(output_dir, entry, "config.json")))
    lines += [f"the fine-tuned {entry} (from_pretrained(..., subfolder={entry!r}))" for entry in weights]
    if "README.md" in entries:
        lines.append("the model card: README.md" + (", its images in images/" if "images" in entries else ""))
    samples = os.path.join(output_dir, "samples")
    grids = [name for name in os.listdir(samples) if name.endswith(".png")] if "samples" in entries else []
    if grids:
        lines.append(f"{len(grids)} sample grid{'s' if len(grids) > 1 else ''}: samples/")
    checkpoints = sorted(
        (entry for entry in entries if re.fullmatch(r"checkpoint-\d+", entry)), key=lambda name: int(name[11:])
    )
    if checkpoints:
        lines.append(f"checkpoints: {', '.join(checkpoints)}")
    if not lines:
        return f"Nothing was saved in {output_dir}."
    return f"Saved in {output_dir}:\n" + "\n".join(f"  {line}" for line in lines)
