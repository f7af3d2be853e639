"""FLUX.2 [klein] (MMDiT + single-stream blocks, rectified flow, a Qwen3 text encoder) through `Flux2KleinPipeline`.

What is particular to FLUX.2-klein, all read from diffusers' `Flux2KleinPipeline`:
- prompts are encoded by Qwen3 inside its chat template (thinking off), padded to `max_sequence_length` tokens, and
  the hidden states of three of its layers (9, 18, 27) are concatenated per token (`prompt_embeds`; no padding mask:
  the transformer attends to the padding, as in the pipeline); the text tokens' positions follow from their number;
- latents are patchified and packed: each 2 x 2 patch of the VAE's `[C, h, w]` latents is one token of `4 C`
  channels, normalised by the VAE's batch-norm statistics, so the rollout latents (and everything the trainer does
  with them) are `[B, h w / 4, 4 C]`; the transformer also takes the tokens' 4-D positions (`img_ids`);
- the denoiser's timestep is the flow time `t` itself (the pipeline passes `timestep / 1000`), and its output the
  velocity `eps - x0`; the schedule shifts with the image sequence length and the number of steps (`mu`, from
  `compute_empirical_mu`), so a rollout's time grid depends on both;
- guidance: the step-distilled checkpoints (FLUX.2-klein-4B and -9B, `is_distilled=True` in their `model_index.json`)
  sample without any; the base checkpoints (FLUX.2-klein-base-*) take classifier-free guidance, a second pass on the
  empty prompt every step. The pipeline never feeds the transformer's guidance embedding (`guidance=None`);
- reference images (`image=`, optional): each is encoded by the VAE at its mode, patchified, normalised and packed as
  the target's latents, and all are joined after the target's tokens along the sequence, the i-th at positions
  `T = 10 (i + 1)` (the target's T is 0); the output is cut back to the target's tokens. The pipeline takes them only
  as PIL images, the same for the whole batch, and shrinks any above a 1024² area to it: here each row has its own,
  resized to the run's `resolution` (square, as the target; said once in the log; at most 1024), encoded once per
  rollout, and fed to the pipeline's transformer calls as the pipeline joins them.
"""

import contextlib
import inspect

import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from torch import nn

from .base import MMDIT_ATTENTION_TARGETS, DiffusionAdapter, Rollout, check_resolution_multiple, packed_grid_side
from .condition_images import check_condition_counts, resize_condition_images


#: The negative prompt of FLUX.2-klein's CFG: the pipeline's own, the empty prompt.
NEGATIVE_PROMPT = ""
#: The conditioning's entries for reference images: each row's references' packed latents `[B, 4 n, 4 C]` and their
#: positions `[B, 4 n, 4]` (`n` tokens per reference; zero after the row's own references, so that every row, whatever
#: its count, has one shape), and how many references each row has, `[B]`.
REFERENCE_KEYS = ("image_latents", "image_latent_ids", "image_counts")
#: `Flux2KleinPipeline` shrinks references above a 1024² area to it; `Flux2ImageProcessor.check_image_input` refuses
#: sides under 64 px.
REFERENCE_MAX_SIDE = 1024
REFERENCE_MIN_SIDE = 64


class Flux2KleinAdapter(DiffusionAdapter):
    pipeline_classes = (Flux2KleinPipeline,)
    denoiser_name = "transformer"
    # Flow-Factory's FLUX.2-klein targets for its NFT and GRPO recipes (`Flux2KleinAdapter.default_target_modules`):
    # the double-stream blocks' attention and feed-forward projections, and the single-stream blocks' fused
    # query-key-value-MLP input projection. Flow-Factory lists `attn.to_out.0` for the single-stream blocks too, but
    # their output projection is `attn.to_out` (a layer, not a list), so there it names only the double-stream ones.
    lora_target_modules = (
        *MMDIT_ATTENTION_TARGETS,
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
    )

    prompt_token_limits = {"tokenizer": "max_sequence_length"}
    image_conditioning = "optional"
    #: Black Forest Labs documents up to 4 reference images for FLUX.2 [klein] (4B and 9B).
    max_condition_images = 4

    @property
    def is_distilled(self) -> bool:
        """Whether the checkpoint is step-distilled (FLUX.2-klein-4B, -9B), which samples without guidance."""
        return bool(self.pipeline.config.is_distilled)

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        scale = self.pipeline.vae_scale_factor
        check_resolution_multiple(
            resolution,
            scale * 2,
            "FLUX.2-klein",
            f"VAE scale {scale} x the 2 x 2 latent packing; the pipeline would silently resize any other size",
        )

    def check_guidance(self, guidance_scale: float) -> None:
        if guidance_scale > 1.0 and self.is_distilled:
            raise ValueError(
                f"guidance_scale={guidance_scale} is not supported by this FLUX.2-klein model: it is step-distilled "
                "(is_distilled=True in its model_index.json, as FLUX.2-klein-4B and -9B) and samples without "
                "guidance; Flux2KleinPipeline would ignore the scale. Set guidance_scale=1.0, or train a base "
                "checkpoint (e.g. black-forest-labs/FLUX.2-klein-base-4B), whose guidance is classifier-free."
            )

    def set_sampler(self, sampler=None, sampler_kwargs: dict | None = None) -> None:
        super().set_sampler(sampler, sampler_kwargs)
        scheduler = self.pipeline.scheduler
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        # `Flux2KleinPipeline` always passes `mu`, and its own sigmas unless the scheduler makes flow sigmas itself.
        if "mu" not in accepted or not (scheduler.config.get("use_flow_sigmas") or "sigmas" in accepted):
            raise ValueError(
                f"sampler={type(scheduler).__name__!r} cannot sample FLUX.2-klein: Flux2KleinPipeline passes the "
                "scheduler a shift `mu` and, unless it uses flow sigmas (`use_flow_sigmas=True`), its own sigmas. Use "
                "DPMSolverMultistepScheduler (the default), UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler "
                "(the model's own), by class name."
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        conditioning = {"prompt_embeds": self._encode(prompts)}
        if self.classifier_free_guidance:
            negative = self._encode([NEGATIVE_PROMPT])
            conditioning["negative_prompt_embeds"] = negative.expand(len(prompts), -1, -1)
        return conditioning

    @torch.no_grad()
    def encode_conditions(
        self, prompts: list[str], images: list[list[Image.Image]] | None = None, resolution: int | None = None
    ) -> dict[str, torch.Tensor]:
        conditioning = self.encode_prompts(prompts)
        if images is None:
            return conditioning
        check_condition_counts(prompts, images, self.max_condition_images, "FLUX.2-klein")
        resolution = resolution or self.default_resolution()
        side = min(resolution, REFERENCE_MAX_SIDE)
        if side < REFERENCE_MIN_SIDE:
            raise ValueError(
                f"resolution={resolution} is too small for FLUX.2-klein's reference images, which are resized to it: "
                f"Flux2KleinPipeline takes references of at least {REFERENCE_MIN_SIDE} px a side. Set resolution to "
                f"{REFERENCE_MIN_SIDE} or more, or train without the 'image' column."
            )
        pipeline, device = self.pipeline, self.denoiser.device
        latents, latent_ids = [], []
        for row in resize_condition_images(images, side, pipeline.image_processor, "FLUX.2-klein"):
            # The pipeline's preprocessing of a reference of this size, then its encoding of a row's references.
            pixels = [pipeline.image_processor.preprocess(image, side, side, resize_mode="crop") for image in row]
            row_latents, row_ids = pipeline.prepare_image_latents(pixels, 1, None, device, pipeline.vae.dtype)
            per_reference = row_latents.shape[1] // len(row)
            padding = (self.max_condition_images - len(row)) * per_reference
            latents.append(nn.functional.pad(row_latents, (0, 0, 0, padding)))
            latent_ids.append(nn.functional.pad(row_ids, (0, 0, 0, padding)))
        conditioning["image_latents"] = torch.cat(latents)
        conditioning["image_latent_ids"] = torch.cat(latent_ids)
        conditioning["image_counts"] = torch.tensor([len(row) for row in images], device=device)
        return conditioning

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """The pipeline's encoding of `prompts`, `[B, max_sequence_length, 3 D]` (its `text_ids` are not kept: they
        follow from the number of tokens)."""
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts, device=self.denoiser.device, max_sequence_length=self.max_sequence_length
        )
        return embeds

    @torch.no_grad()
    def sample(self, conditioning, num_inference_steps, resolution, generator) -> Rollout:
        prompts = {key: value for key, value in conditioning.items() if key not in REFERENCE_KEYS}
        with self._references_joined(conditioning):
            # With `output_type="latent"` the pipeline returns the VAE's latents (unpacked, de-normalised); the
            # rollout keeps the denoiser's own, which the pipeline hands its step-end callback.
            final = {}

            def keep_latents(pipeline, step, timestep, tensors):
                final["latents"] = tensors["latents"]
                return {}

            self._pipeline_latents(
                prompts,
                num_inference_steps,
                resolution,
                generator,
                max_sequence_length=self.max_sequence_length,
                callback_on_step_end=keep_latents,
            )
        latents = final["latents"]
        # The denoiser was queried at `timestep / 1000` for each scheduler timestep: those are the flow times.
        return Rollout(latents=latents, sigmas=self._visited_flow_times(latents.device))

    @contextlib.contextmanager
    def _references_joined(self, conditioning: dict[str, torch.Tensor]):
        """Within this context the pipeline's transformer calls (conditional and CFG passes) take the rows' reference
        tokens after the target's, as `Flux2KleinPipeline(image=...)` makes them; the pipeline cuts the output back
        to the target's tokens itself. Nothing changes for text-only rows."""
        if "image_latents" not in conditioning:
            yield
            return

        def join(module, args, kwargs):
            return args, {**kwargs, **self._joined(kwargs["hidden_states"], kwargs["img_ids"], conditioning)}

        handle = self.denoiser.register_forward_pre_hook(join, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _joined(self, hidden_states, latent_ids, conditioning) -> dict[str, torch.Tensor | dict]:
        """The transformer's `hidden_states` and `img_ids` with each row's references after the target's tokens, as
        the pipeline joins them, and, when rows have different numbers of references, an attention mask that hides
        the padding (`joint_attention_kwargs`; rows with the batch's most references see exactly the pipeline's
        sequence)."""
        counts = conditioning["image_counts"]
        per_reference = conditioning["image_latents"].shape[1] // self.max_condition_images
        used = int(counts.max()) * per_reference
        references = conditioning["image_latents"][:, :used].to(hidden_states.dtype)
        # The transformer takes the first row's positions for all: those of a row with the most references.
        reference_ids = conditioning["image_latent_ids"][counts.argmax(), :used].expand(len(counts), -1, -1)
        joined = {
            "hidden_states": torch.cat([hidden_states, references], dim=1),
            "img_ids": torch.cat([latent_ids, reference_ids], dim=1),
        }
        if bool((counts < counts.max()).any()):
            # Keys of the joint sequence: the text's and the target's tokens, then the references' (padding hidden).
            before = hidden_states.shape[1] + conditioning["prompt_embeds"].shape[1]
            keep = torch.arange(used, device=counts.device) < (counts * per_reference)[:, None]
            mask = torch.cat([keep.new_ones(len(keep), before), keep], dim=1)
            joined["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
        return joined

    def _latent_ids(self, packed: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The pipeline's positions `(T, H, W, L)` of the tokens of `packed` latents `[B, s^2, 4 C]`, and `s`."""
        side = packed_grid_side(packed, "FLUX.2-klein")
        grid = packed.new_empty(len(packed), 0, side, side)  # `_prepare_latent_ids` reads only the grid's shape
        return self.pipeline._prepare_latent_ids(grid).to(packed.device), side

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipeline, vae = self.pipeline, self.pipeline.vae
        latent_ids, side = self._latent_ids(latents)
        latents = pipeline._unpack_latents_with_ids(latents, latent_ids, side, side)
        # The VAE's batch-norm statistics, undone as the pipeline does, then the 2 x 2 patches unfolded.
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        latents = pipeline._unpatchify_latents(latents * std + mean)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipeline.image_processor.postprocess(images, output_type="pt").float()

    def predict_velocity(self, model: nn.Module, noisy_latents, sigmas, conditioning) -> torch.Tensor:
        prompt_embeds = conditioning["prompt_embeds"]
        hidden_states, latent_ids = noisy_latents.to(self.denoiser.dtype), self._latent_ids(noisy_latents)[0]
        inputs = {"hidden_states": hidden_states, "img_ids": latent_ids}
        if "image_latents" in conditioning:
            inputs = self._joined(hidden_states, latent_ids, conditioning)
        velocity = model(
            timestep=sigmas.to(noisy_latents.dtype),
            guidance=None,
            encoder_hidden_states=prompt_embeds,
            txt_ids=self.pipeline._prepare_text_ids(prompt_embeds).to(noisy_latents.device),
            return_dict=False,
            **inputs,
        )[0]
        return velocity[:, : noisy_latents.shape[1]]  # the target's tokens
