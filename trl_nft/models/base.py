"""The interface between the trainer and one model family.

The trainer never asks which model it trains: it asks an adapter to encode prompts, to sample clean latents with the
family's diffusers pipeline, to decode them, and to predict the flow velocity at `(x_t, t, c)`. Adding a family means
writing one small subclass of `DiffusionAdapter` and registering it in `trl_nft.models` (see CONTRIBUTING.md).
"""

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from torch import nn

from .samplers import build_sampler


@dataclass
class Rollout:
    """What one sampling pass keeps: the clean latents and the time grid the sampler visited (no trajectories)."""

    latents: torch.Tensor  # [B, C, h, w], the final x0 in the denoiser's latent space
    sigmas: torch.Tensor  # [S], the noise levels t in (0, 1] at which the sampler evaluated the denoiser


class DiffusionAdapter:
    """Base class of the model-family adapters. Subclasses set the class attributes and implement the methods."""

    #: Pipeline classes this adapter drives.
    pipeline_classes: tuple[type[DiffusionPipeline], ...] = ()
    #: Attribute of the pipeline that holds the trained denoiser.
    denoiser_name: str = "transformer"
    #: Modules LoRA targets by default.
    lora_target_modules: tuple[str, ...] = ()
    #: Whether the model is a rectified flow (else VP diffusion): decides which samplers can drive it.
    is_flow: bool = True

    def __init__(self, pipeline: DiffusionPipeline):
        self.pipeline = pipeline
        self.model_scheduler = pipeline.scheduler  # the model's own; every sampler is built from its config

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [m for name, m in self.pipeline.components.items() if name.startswith("text_encoder") and m is not None]

    def default_resolution(self) -> int:
        """The model's native image side in pixels."""
        raise NotImplementedError

    def check_resolution(self, resolution: int) -> None:
        """Raise a `ValueError` naming `resolution` if the model cannot generate square images of that size."""
        raise NotImplementedError

    def set_sampler(self, sampler, sampler_kwargs: dict | None = None) -> None:
        """Make the pipeline roll out with `sampler` (a diffusers scheduler class name or instance)."""
        self.pipeline.scheduler = build_sampler(sampler, self.model_scheduler, sampler_kwargs, flow=self.is_flow)

    def encode_prompts(self, prompts: list[str], negative: bool) -> dict[str, torch.Tensor]:
        """Text conditioning for `prompts`, batch-first tensors; with `negative`, also the empty-prompt conditioning
        that classifier-free guidance needs (keys prefixed with `negative_`)."""
        raise NotImplementedError

    def sample(
        self,
        conditioning: dict[str, torch.Tensor],
        num_inference_steps: int,
        guidance_scale: float,
        resolution: int,
        generator: torch.Generator,
    ) -> Rollout:
        """Run the family's diffusers pipeline from precomputed conditioning and return the clean latents."""
        raise NotImplementedError

    @torch.no_grad()
    def _pipeline_latents(self, conditioning, num_inference_steps, guidance_scale, resolution, generator, **extra):
        """Clean latents from the family's pipeline, run from precomputed conditioning (`extra`: family options)."""
        return self.pipeline(
            **conditioning,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="latent",
            **extra,
        ).images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents to images as a float tensor `[B, 3, H, W]` in `[0, 1]`."""
        raise NotImplementedError

    def predict_velocity(
        self,
        model: nn.Module,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The rectified-flow velocity `v(x_t, t, c)` predicted by `model` (the denoiser, possibly wrapped)."""
        raise NotImplementedError

    def save_lora_weights(self, output_dir: str, lora_state_dict: dict, adapter_metadata: dict) -> None:
        """Write `lora_state_dict` in the diffusers format that `pipeline.load_lora_weights(output_dir)` reads."""
        raise NotImplementedError
