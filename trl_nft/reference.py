"""A periodically refreshed reference policy (`reference_refresh_steps`, as in GARDO): every N optimizer steps the
reference of the KL penalty becomes the current policy.

With LoRA the reference is a third adapter, `"ref"`, on the same frozen weights, copied from the trained adapter at the
start and at each refresh. It is never merged into the base weights: the saved LoRA stays relative to the original base
model, and a quantized base could not take a merge. Fully fine-tuned, the trained weights are copied into the frozen
reference copy. Checkpoints save the reference in `reference_policy/`."""

import torch
from transformers import TrainerCallback

from .objective import soft_update_


REFERENCE_ADAPTER = "ref"
REFERENCE_POLICY_DIR = "reference_policy"


class ReferenceRefreshCallback(TrainerCallback):
    """After every `every_steps`-th optimizer step, the reference's weights become copies of the trained ones."""

    def __init__(self, trained_params: list[torch.Tensor], reference_params: list[torch.Tensor], every_steps: int):
        self.trained_params, self.reference_params, self.every_steps = trained_params, reference_params, every_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps == 0:
            soft_update_(self.reference_params, self.trained_params, decay=0.0)
