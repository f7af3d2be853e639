"""A policy on disk, as saving and resuming write and read it: a LoRA adapter in diffusers' format
(`pipeline.load_lora_weights(folder)`), or a fully fine-tuned denoiser in `folder/<denoiser>/`."""

import os

import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from .models.base import DiffusionAdapter


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def save_policy(
    module: torch.nn.Module,
    adapter_name: str,
    output_dir: str,
    adapter: DiffusionAdapter,
    lora_config: LoraConfig | None,
) -> None:
    """Write `module`'s policy to `output_dir`: its LoRA `adapter_name` (with `lora_config`, the family pipeline's
    format), or, without a `lora_config`, the whole denoiser."""
    os.makedirs(output_dir, exist_ok=True)
    if lora_config is not None:
        state_dict = get_peft_model_state_dict(module, adapter_name=adapter_name)
        adapter.save_lora_weights(output_dir, state_dict, lora_config.to_dict())
    else:
        module.save_pretrained(os.path.join(output_dir, adapter.denoiser_name))


def load_policy(
    module: torch.nn.Module,
    adapter_name: str,
    directory: str,
    checkpoint: str,
    adapter: DiffusionAdapter,
    is_lora: bool,
) -> None:
    """Load the policy `save_policy` wrote in `directory` (part of `checkpoint`) into `module`; a `ValueError` names
    what is missing or does not match."""
    if is_lora:
        path = os.path.join(directory, LORA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"Can't resume from {checkpoint}: {path} is missing.")
        prefix = f"{adapter.denoiser_name}."
        state_dict = {k.removeprefix(prefix): v for k, v in safetensors.torch.load_file(path).items()}
        result = set_peft_model_state_dict(module, state_dict, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(f"{path} does not match this model's LoRA: unexpected {result.unexpected_keys[:3]}.")
    else:
        folder = os.path.join(directory, adapter.denoiser_name)
        if not os.path.isdir(folder):
            raise ValueError(f"Can't resume from {checkpoint}: {folder} is missing.")
        loaded = type(module).from_pretrained(folder, torch_dtype=torch.float32)
        module.load_state_dict(loaded.state_dict())
