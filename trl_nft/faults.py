"""What a run does when training itself goes wrong: a step whose gradients are not finite is skipped (and too many in
a row stop the run), and running out of memory says which setting to lower. Reward failures have their policy in
`trl_nft.rewards.scoring`."""

import contextlib

import torch
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


class NonFiniteStepGuard(TrainerCallback):
    """Before each optimizer step, skip it if any gradient of `params` (the trained weights) is NaN or infinite: the
    gradients are dropped (`grad = None`), so the optimizer leaves those weights and its moments untouched. Skipped
    steps are counted in `metrics` (`faults/nonfinite_steps_skipped`); more than `max_in_a_row` in a row stop the run
    with a `RuntimeError` (the last checkpoint stays resumable)."""

    def __init__(self, params: list[torch.Tensor], max_in_a_row: int, metrics: dict[str, list[float]]):
        self.params, self.max_in_a_row, self.metrics = params, max_in_a_row, metrics
        self.in_a_row = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [param.grad for param in self.params if param.grad is not None]
        # One reduction and one host sync per step; the gradients are already all-reduced, so every process agrees.
        finite = bool(torch.stack([torch.isfinite(grad).all() for grad in grads]).all()) if grads else True
        self.metrics["faults/nonfinite_steps_skipped"].append(0.0 if finite else 1.0)
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        for param in self.params:
            param.grad = None
        if self.in_a_row > self.max_in_a_row:
            raise RuntimeError(
                f"Step {state.global_step + 1}: the gradients were not finite (a NaN or infinite loss) for "
                f"{self.in_a_row} optimizer steps in a row, more than max_nonfinite_steps={self.max_in_a_row}. "
                "Lower learning_rate, check the rewards and the mixed precision (bf16 is safer than fp16), then resume "
                "from the last checkpoint."
            )
        logger.warning(
            f"Step {state.global_step + 1}: the gradients are not finite; the step is skipped ({self.in_a_row} in a "
            f"row; the run stops after max_nonfinite_steps={self.max_in_a_row})."
        )


@contextlib.contextmanager
def explain_out_of_memory(stage: str, advice: str):
    """Re-raise an out-of-memory error inside the context with what ran out of memory (`stage`) and the settings to
    change (`advice`)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise torch.OutOfMemoryError(f"Out of memory during {stage}. {advice} ({error})") from error
