"""The policies of one NFT run (`DiffusionNFTTrainer.policies`): the trained policy, the frozen old (sampling) policy
and reference beside it, and the evaluation EMA; which one the pipeline's denoiser acts as, and their soft updates.

With LoRA they share one denoiser: the trained adapter and the old one, the reference being the denoiser with its
adapters disabled (with `reference_refresh_steps`, a third adapter: `trl_nft.reference`). Fully fine-tuned, the old
policy is an EMA copy of the denoiser and the reference a frozen copy (only when `kl_coef > 0`).

The evaluation EMA is a list of tensors rather than diffusers' `EMAModel`: that one's warm-up gives decay 0 at the first
step, the released code's (`objective.ema_decay`) 0.1. The LoRA weights are cast to float32 here rather than with
diffusers' `cast_training_params`, which casts only the trained adapter, not the frozen old and reference ones."""

import contextlib
import copy
import json
import warnings

import torch
from diffusers.configuration_utils import FrozenDict
from peft import LoraConfig
from transformers import TrainerCallback

from .forwards import BASE_MODEL
from .nft_config import NFTConfig
from .objective import ema_decay, old_policy_decay, soft_update_
from .reference import REFERENCE_ADAPTER, REFERENCE_POLICY_DIR


TRAINED_ADAPTER, OLD_ADAPTER = "default", "old"
OLD_POLICY_DIR = "old_policy"
TRAINED_POLICY_DIR = "policy"  # in checkpoints with an EMA: the raw trained weights (the top level holds the EMA)


class Policies:
    """The trained, old and reference policies on the denoiser of `adapter` (a `trl_nft.models` adapter of
    `pipeline`), set up from `args` (`lora_*`, `use_peft`, `kl_coef`, `reference_refresh_steps`) or `peft_config`.

    Attributes: `use_lora`, `lora_config` (None when fully fine-tuned), `old_model` / `ref_model` (the frozen copies of
    full fine-tuning, else None), `trained` / `old` / `reference` (the tensors of each policy's weights, aligned; the
    reference's only when refreshed), `reference_adapter` (the adapter name of the reference in a mixed-adapter batch)
    and `ema` (the evaluation EMA's tensors, after `to()`, when `args.ema_decay > 0`)."""

    def __init__(self, pipeline, adapter, args: NFTConfig, peft_config: LoraConfig | None):
        self.pipeline, self.adapter = pipeline, adapter
        denoiser = adapter.denoiser
        _speak_transformers_trainer(denoiser)
        self.use_lora = args.use_peft or peft_config is not None
        self.old_model = self.ref_model = None
        self.ema: list[torch.Tensor] | None = None
        self._ema_decay = args.ema_decay
        refreshed = args.reference_refresh_steps > 0  # needs kl_coef > 0 (NFTConfig checks)
        self.reference_adapter = REFERENCE_ADAPTER if refreshed else BASE_MODEL
        if self.use_lora:
            self.lora_config = peft_config or LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(args.lora_target_modules or adapter.lora_target_modules),
            )
            denoiser.add_adapter(copy.deepcopy(self.lora_config), adapter_name=OLD_ADAPTER)
            with warnings.catch_warnings():  # PEFT warns about a second adapter, which is the design here
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                denoiser.add_adapter(copy.deepcopy(self.lora_config), adapter_name=TRAINED_ADAPTER)
                if refreshed:  # added last, so that the trained adapter's initialisation is that of any other run
                    denoiser.add_adapter(copy.deepcopy(self.lora_config), adapter_name=REFERENCE_ADAPTER)
            denoiser.set_adapter(TRAINED_ADAPTER)
            names = dict(denoiser.named_parameters())
            trained = [n for n in names if f".{TRAINED_ADAPTER}." in n]

            def params_of(adapter_name: str) -> list[torch.Tensor]:
                return [names[n.replace(f".{TRAINED_ADAPTER}.", f".{adapter_name}.")] for n in trained]

            self.trained, self.old = params_of(TRAINED_ADAPTER), params_of(OLD_ADAPTER)
            self.reference = params_of(REFERENCE_ADAPTER) if refreshed else []
            for param in self.trained + self.old + self.reference:
                param.data = param.data.float()
        else:
            self.lora_config = None
            denoiser.float().requires_grad_(True)
            self.old_model = copy.deepcopy(denoiser).requires_grad_(False)
            if args.kl_coef > 0:
                self.ref_model = copy.deepcopy(denoiser).requires_grad_(False)
            self.trained = list(denoiser.parameters())
            self.old = list(self.old_model.parameters())
            self.reference = list(self.ref_model.parameters()) if refreshed else []
        self.start_frozen_as_trained()

    def start_frozen_as_trained(self) -> None:
        """The old policy (and a refreshed reference) become copies of the trained one, as at the start of a run."""
        for frozen in (self.old, self.reference):
            if frozen:  # no reference weights unless refreshed
                soft_update_(frozen, self.trained, decay=0.0)

    def to(self, device: torch.device) -> None:
        """Move the frozen copies of full fine-tuning to `device`, and start the evaluation EMA there."""
        for module in (self.old_model, self.ref_model):
            if module is not None:
                module.to(device)
        if self._ema_decay > 0:
            self.ema = [param.detach().clone() for param in self.trained]

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The frozen copies of full fine-tuning (none with LoRA)."""
        return [module for module in (self.old_model, self.ref_model) if module is not None]

    # ------------------------------------------------------------------ which policy the denoiser acts as

    @contextlib.contextmanager
    def acting_as_old(self):
        """Within this context the pipeline's denoiser is the old (sampling) policy, in eval mode (no LoRA dropout)."""
        denoiser = self.adapter.denoiser
        if self.use_lora:
            with self.acting_as_adapter(OLD_ADAPTER):
                yield denoiser
        else:
            setattr(self.pipeline, self.adapter.denoiser_name, self.old_model)
            try:
                yield self.old_model
            finally:
                setattr(self.pipeline, self.adapter.denoiser_name, denoiser)

    @contextlib.contextmanager
    def acting_as_adapter(self, adapter_name: str):
        """Within this context the denoiser runs the frozen LoRA adapter `adapter_name`, in eval mode."""
        denoiser = self.adapter.denoiser
        denoiser.set_adapter(adapter_name)
        with eval_mode(denoiser):
            try:
                yield denoiser
            finally:
                denoiser.set_adapter(TRAINED_ADAPTER)

    @contextlib.contextmanager
    def acting_as_reference(self):
        """Within this context, the yielded module is the reference: the frozen base model, or with
        `reference_refresh_steps` the policy of the latest refresh (`trl_nft.reference`)."""
        if self.use_lora and self.reference:
            with self.acting_as_adapter(REFERENCE_ADAPTER) as denoiser:
                yield denoiser
        elif self.use_lora:
            denoiser = self.adapter.denoiser
            denoiser.disable_adapters()
            try:
                yield denoiser
            finally:
                denoiser.enable_adapters()
        else:
            yield self.ref_model

    @contextlib.contextmanager
    def evaluation_weights(self):
        """Within this context the trained weights hold their EMA (unchanged when `ema_decay = 0`)."""
        if self.ema is None:
            yield
            return
        trained = [param.detach().clone() for param in self.trained]
        copy_(self.trained, self.ema)
        try:
            yield
        finally:
            copy_(self.trained, trained)

    def frozen(self, denoiser: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
        """The frozen policies a checkpoint holds beside the trained one: (folder, LoRA adapter, module) each."""
        policies = [(OLD_POLICY_DIR, OLD_ADAPTER, denoiser if self.use_lora else self.old_model)]
        if self.reference:  # refreshed: no longer the base model
            policies.append((REFERENCE_POLICY_DIR, REFERENCE_ADAPTER, denoiser if self.use_lora else self.ref_model))
        return policies


class SoftUpdatesCallback(TrainerCallback):
    """After each optimizer step `i`, soft-update the evaluation EMA toward the trained weights
    (`theta_ema <- d_i theta_ema + (1 - d_i) theta`, `objective.ema_decay`); after the last optimizer step of each
    rollout (`rollout_done()`), the old policy too (`theta_old <- eta theta_old + (1 - eta) theta`, with `eta` from
    the configured `objective.old_policy_decay` schedule), appending `eta` to `metrics["old_policy_decay"]`."""

    def __init__(self, policies: Policies, rollout_done, metrics: dict[str, list[float]]):
        self.policies, self.rollout_done, self.metrics = policies, rollout_done, metrics

    def on_step_end(self, args, state, control, **kwargs):
        if self.rollout_done():
            decay = old_policy_decay(
                state.global_step // args.optimizer_steps_per_rollout,
                args.old_policy_decay_schedule,
                rate=args.old_policy_decay_rate,
                maximum=args.old_policy_decay_max,
                delay=args.old_policy_decay_delay,
            )
            soft_update_(self.policies.old, self.policies.trained, decay)
            self.metrics["old_policy_decay"].append(decay)
        if self.policies.ema is not None:
            soft_update_(self.policies.ema, self.policies.trained, ema_decay(state.global_step, args.ema_decay))


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Within this context `module` is in eval mode (no dropout); its mode is restored after."""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


@torch.no_grad()
def copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


class _LoggableConfig(FrozenDict):
    """A diffusers model config that also has the `to_dict()`/`to_json_string()` that transformers' loggers call."""

    def to_dict(self) -> dict:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def _speak_transformers_trainer(denoiser: torch.nn.Module) -> None:
    """Let `transformers.Trainer` drive a diffusers model: its loggers read `model.config` as a transformers config,
    and it enables activation checkpointing through the transformers method names."""
    denoiser._internal_dict = _LoggableConfig(denoiser.config)

    def enable_checkpointing(**kwargs):
        denoiser.enable_gradient_checkpointing()

    denoiser.activation_checkpointing_enable = denoiser.gradient_checkpointing_enable = enable_checkpointing
