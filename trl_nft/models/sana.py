"""SANA (linear-attention DiT, rectified flow, a Gemma-2 text encoder, the 32x DC-AE) through `SanaPipeline`: the SANA
1.0 and 1.5 text-to-image checkpoints.

What is particular to SANA, all read from diffusers' `SanaPipeline`:
- prompts are lowercased (the pipeline's `clean_caption=False`, its default, which the adapter keeps: cleaning needs
  `bs4` and `ftfy` and rewrites captions), then the pipeline's complex human instruction (the default of its
  `__call__`'s `complex_human_instruction`, which `encode_prompt` alone does not apply) is put before each one and
  Gemma-2 encodes the whole; the pipeline keeps `<bos>` and the last `max_sequence_length - 1` positions, which are
  the prompt's tokens (having read the instruction: Gemma is causal), right-padded, with their padding mask
  `prompt_attention_mask`, which the transformer's cross-attention takes;
- latents are the DC-AE's `[C, h, w]` (scale 32 for SANA), scaled by its `scaling_factor` only; the transformer's
  patches are 1 x 1;
- the transformer takes the scheduler's timestep `1000 t` (times its `timestep_scale`, 1 for SANA) and predicts the
  rectified-flow velocity `eps - x0` itself (SANA's scheduler steps in `flow_prediction`): no conversion;
- the pipeline hands the scheduler only the number of steps (no sigmas, no `mu`), so every flow sampler can drive it;
  the default is SANA's own, DPM-Solver++(2M) on flow sigmas shifted by a constant (3 up to 2K px), so a rollout's
  time grid is the same at every resolution;
- guidance is classifier-free: the empty prompt, encoded without the instruction, is a second half of the batch in
  the same transformer call, combined as `neg + w (pos - neg)`; the trainer's `guidance_scale` is that `w`, and 1
  samples CFG-free;
- the pipeline's resolution binning is off: it would snap every size to its aspect-ratio table (a 512 px request on a
  1024 px model samples at 1024 px) and resize the decoded image.
"""

import inspect
import math

import torch
from diffusers import SanaPipeline
from torch import nn

from .base import SELF_AND_CROSS_ATTENTION_TARGETS, DiffusionAdapter, Rollout, check_resolution_multiple


#: The complex human instruction `SanaPipeline.__call__` puts before every prompt by default (NVlabs/Sana's app config).
COMPLEX_HUMAN_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
#: The negative prompt of SANA's CFG: the pipeline's own, the empty prompt.
NEGATIVE_PROMPT = ""
#: `SanaPipeline.check_inputs` refuses heights and widths that are not multiples of 32, whatever the VAE.
PIPELINE_MULTIPLE = 32


class SanaAdapter(DiffusionAdapter):
    pipeline_classes = (SanaPipeline,)
    denoiser_name = "transformer"
    # NVIDIA's own DiffusionNFT recipe for SANA-1.5 1.6B (nvidia-cosmos/cosmos-rl, configs/sana/sana-image-nft.toml): the
    # query, key, value and output projections of every block's linear self-attention (`attn1`) and cross-attention
    # (`attn2`); the GLUMBConv feed-forward layers are convolutions, left alone. diffusers' DreamBooth-LoRA SANA script
    # targets only `to_q`, `to_k` and `to_v` of both.
    lora_target_modules = SELF_AND_CROSS_ATTENTION_TARGETS
    # Gemma's own limit is far beyond any prompt; the pipeline keeps `<bos>` and about `max_sequence_length - 1` of the
    # prompt's tokens (from the instruction's last token on).
    prompt_token_limits = {"tokenizer": "max_sequence_length"}

    def default_resolution(self) -> int:
        # The transformer's native latent side, as the pipeline's resolution binning reads it (SANA 1.6B 1024px: 32).
        return self.denoiser.config.sample_size * self.pipeline.vae_scale_factor

    def check_resolution(self, resolution: int) -> None:
        scale, patch = self.pipeline.vae_scale_factor, self.denoiser.config.patch_size
        check_resolution_multiple(
            resolution,
            math.lcm(PIPELINE_MULTIPLE, scale * patch),
            "SANA",
            f"SanaPipeline takes multiples of {PIPELINE_MULTIPLE}, and the VAE scale {scale} x the transformer's "
            f"{patch} x {patch} patches",
        )

    def pipeline_size_arguments(self, resolution: int) -> dict:
        # Without binning, as `sample` calls it: the pipeline would otherwise snap the size to its aspect-ratio table.
        return {**super().pipeline_size_arguments(resolution), "use_resolution_binning": False}

    def check_guidance(self, guidance_scale: float) -> None:
        # SANA-Sprint's transformer embeds a guidance scale, which `SanaPipeline` never passes: its time embedding then
        # fails on the first forward, whatever the scale. SANA-Sprint samples with its own pipeline.
        if self.pipeline.transformer.config.guidance_embeds:
            raise ValueError(
                "This SANA transformer embeds a guidance scale (guidance_embeds=True in its config: SANA-Sprint), which "
                f"SanaPipeline cannot run at any guidance_scale (got guidance_scale={guidance_scale}). Use a SANA "
                f"checkpoint with guidance_embeds=False, such as Efficient-Large-Model/Sana_1600M_1024px_diffusers, "
                f"whose guidance is CFG (guidance_scale > 1 samples against the empty prompt)."
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, negative_embeds, negative_mask = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=self.classifier_free_guidance,
            negative_prompt=NEGATIVE_PROMPT,
            device=self.denoiser.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION,  # as `SanaPipeline.__call__` encodes
        )
        conditioning = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if self.classifier_free_guidance:  # one empty-prompt row per prompt, as the pipeline encodes it
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask)
        return conditioning

    @torch.no_grad()
    def sample(self, conditioning, num_inference_steps, resolution, generator) -> Rollout:
        latents = self._pipeline_latents(
            conditioning,
            num_inference_steps,
            resolution,
            generator,
            negative_prompt=None,  # the pipeline refuses a negative prompt next to negative embeddings
            use_resolution_binning=False,
        )
        # The denoiser was queried at the scheduler's timesteps `1000 t`: those over 1000 are the flow times.
        return Rollout(latents=latents, sigmas=self._visited_flow_times(latents.device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipeline, vae = self.pipeline, self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return pipeline.image_processor.postprocess(images, output_type="pt").float()

    def predict_velocity(self, model: nn.Module, noisy_latents, sigmas, conditioning) -> torch.Tensor:
        # As the pipeline: inputs in the transformer's dtype, at its timestep `1000 t x timestep_scale`, output in float.
        transformer = self.denoiser
        timestep = sigmas * self.model_scheduler.config.num_train_timesteps * transformer.config.timestep_scale
        return model(
            noisy_latents.to(transformer.dtype),
            encoder_hidden_states=conditioning["prompt_embeds"].to(transformer.dtype),
            encoder_attention_mask=conditioning["prompt_attention_mask"],
            timestep=timestep,
            return_dict=False,
        )[0].float()
