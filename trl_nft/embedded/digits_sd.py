"""`digits-sd`: the digits benchmark's model as an SD1.x pipeline (a UNet with epsilon prediction on SD's VP schedule),
for side-by-side runs against TRL 0.23's `DDPOTrainer`, which trains SD1.x pipelines only.

The data, the reward classifier and the judge are `digits-sd3`'s (`trl_nft.embedded.digits_sd3`, `trl_nft.rewards.digit_models`). The builder
(`python -m trl_nft.embedded.digits_sd`, seeded, about 9 minutes on one CPU thread) assembles:

- `digits-sd3`'s 4-channel `AutoencoderKL` (VAE scale 2, 16 x 16 images <-> 4 x 8 x 8 latents), reused as it is. An
  SD1.x pipeline applies only `scaling_factor` (no `shift_factor`): the copy saved here drops the shift and carries the
  scaling factor measured on the *unshifted* training latents (`1 / RMS`), so that the latents the UNet sees have unit
  second moment; their small mean (about -0.03) is left in the data;
- a character-level CLIP tokenizer (prompts of about 24 tokens, `model_max_length` 32) and a tiny random CLIP text
  encoder, frozen, as `tiny-sd`'s;
- a tiny `UNet2DConditionModel` (0.36 M parameters, cross-attention at 4 x 4; epsilon prediction, SD's scaled-linear
  betas, so that DDIM and DDPO apply unchanged), pretrained on the training split's latents with their prompts ("a
  handwritten digit seven"; 10% empty prompts, for CFG), stopped early while it follows its prompt poorly: the pinned
  base has a CFG-free accuracy of at most 0.45 under the reward classifier (measured on 200 images; 0.355, and 0.575
  at CFG 5), which leaves room for RL to show. A 10-step sample of 80 images takes about 1.3 s on one thread.

The weights it writes ship in the package (`DIGITS_SD_PATH`, about 2.3 MB); as for `digits-sd3`, the conditioning is
learnt abruptly during pretraining, so shipping pins the base.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ..prompts.digits import digit_prompt
from ..rewards.digit_models import DIGITS_RESOLUTION, load_classifier
from .digits_sd3 import DIGITS_SD3_PATH, classifier_accuracy, load_digit_images, pretrain_weak_base, write_build_info
from .tiny import _SD_BETAS, _as_loaded, _clip_text_config, _clip_tokenizer


DIGITS_SD_PATH = os.path.join(os.path.dirname(__file__), "digits_sd")
PROMPT_TOKENS = 32  # the tokenizer's model_max_length: the longest digit prompt is 24 characters and 2 special tokens


def load_digits_sd(path: str = DIGITS_SD_PATH) -> StableDiffusionPipeline:
    """The `digits-sd` pipeline (16 x 16 images), loaded with `StableDiffusionPipeline.from_pretrained`."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} holds no digits-sd build: run `python -m trl_nft.embedded.digits_sd`.")
    pipeline = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------- the builder


def make_portable(path: str) -> None:
    """Make the saved pipeline load under transformers 4.x too (TRL 0.23's era, for the DDPO comparison), not only
    the transformers 5 that wrote it: add the slow tokenizer's `vocab.json` and (empty) `merges.txt` next to
    `tokenizer.json`, and store the text encoder's weights under their 4.x names (`text_model.` prefix), which
    transformers 5 also loads."""
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    with open(os.path.join(path, "tokenizer", "vocab.json"), "w") as file:
        json.dump(tokenizer.get_vocab(), file)
    with open(os.path.join(path, "tokenizer", "merges.txt"), "w") as file:
        file.write("#version: 0.2\n")
    weights = os.path.join(path, "text_encoder", "model.safetensors")
    state = load_file(weights)
    prefix = "text_model."
    save_file({k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}, weights, {"format": "pt"})


def sd_vae(images: torch.Tensor, path: str = DIGITS_SD3_PATH) -> AutoencoderKL:
    """`digits-sd3`'s VAE with SD1.x's latent normalisation: no shift, `scaling_factor` = 1 / RMS of the unshifted
    latents of `images` (`[N, 1, 16, 16]` in [0, 1])."""
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
    with torch.no_grad():
        latents = vae.encode(images.expand(-1, 3, -1, -1) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=None, scaling_factor=1 / latents.pow(2).mean().sqrt().item())
    return vae


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=DIGITS_RESOLUTION // 2,  # latents are 8 x 8 (VAE scale 2)
        in_channels=4,
        out_channels=4,
        # cross-attention at 4 x 4 only (and in the mid block): attention over 8 x 8 would triple the sampling time
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=32,  # the tiny CLIP text encoder's width
    )


def ddim_scheduler() -> DDIMScheduler:
    """SD1.x's DDIM configuration (scaled-linear betas, epsilon prediction), as `tiny-sd`'s."""
    return DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@torch.no_grad()
def sample_digits(pipeline, unet, embeds, digits, generator, steps: int = 10, guidance_scale: float = 1.0):
    """Images (`[B, 3, 16, 16]` in [0, 1]) for `digits` with `steps` of deterministic DDIM, from prompt embeddings
    `embeds` (per digit, and index 10: the empty prompt) as the pipeline computes them."""
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn(len(digits), 4, 8, 8, generator=generator)
    cond, uncond = embeds[digits], embeds[[10] * len(digits)]
    for t in scheduler.timesteps:
        timestep = torch.full((len(digits),), int(t))
        noise = unet(latents, timestep, cond, return_dict=False)[0]
        if guidance_scale != 1.0:
            uncond_noise = unet(latents, timestep, uncond, return_dict=False)[0]
            noise = uncond_noise + guidance_scale * (noise - uncond_noise)
        latents = scheduler.step(noise, t, latents).prev_sample
    images = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def base_accuracy(pipeline, unet, embeds, classifier, guidance_scale=1.0) -> float:
    """`classifier_accuracy` of `unet` with `sample_digits` (200 images)."""

    def sample(model, digits, generator, scale):
        return sample_digits(pipeline, model, embeds, digits, generator, guidance_scale=scale)

    return classifier_accuracy(sample, unet, classifier, guidance_scale, per_digit=20)


def pretrain_unet(pipeline, images, labels, classifier, generator, log, eval_every=50, max_steps=4000):
    """DDPM's epsilon objective (uniform timesteps, SD's betas) on the VAE latents of the training images, pinned
    early by `pretrain_weak_base`."""
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
        vae = pipeline.vae
        latents = vae.encode(images.expand(-1, 3, -1, -1) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    alphas_cumprod = ddim_scheduler().alphas_cumprod

    def epsilon_loss(unet, x0, condition):
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        return F.mse_loss(unet(xt, t, embeds[condition], return_dict=False)[0], noise)

    def accuracy(unet):
        return base_accuracy(pipeline, unet, embeds, classifier)

    unet, history = pretrain_weak_base(
        pipeline.unet.train(), epsilon_loss, latents, labels, accuracy, generator, log, eval_every, max_steps
    )
    return unet, embeds, history


def build_digits_sd(output_dir: str = DIGITS_SD_PATH, seed: int = 0, log=None) -> dict:
    """Assemble and pretrain the pipeline with seed `seed` on `digits-sd3`'s training split and write it to
    `output_dir` (diffusers' layout, and `build_info.json`). The reward classifier and judge stay `digits-sd3`'s."""
    start = time.time()
    log = log or (lambda message: print(f"[{time.time() - start:6.0f} s] {message}", flush=True))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = load_digit_images(seed)["train"]
    classifier = load_classifier()

    tokenizer = _clip_tokenizer()
    tokenizer.model_max_length = PROMPT_TOKENS
    pipeline = StableDiffusionPipeline(
        vae=sd_vae(train_images),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer)).eval(),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    info = {"seed": seed, "vae_scaling_factor": pipeline.vae.config.scaling_factor}
    info["unet_parameters"] = sum(p.numel() for p in pipeline.unet.parameters())
    unet, embeds, history = pretrain_unet(pipeline, train_images, train_labels, classifier, generator, log)
    info["pretraining_history"] = history
    info["base_accuracy_cfg_free"] = base_accuracy(pipeline, unet, embeds, classifier)
    info["base_accuracy_cfg_5"] = base_accuracy(pipeline, unet, embeds, classifier, guidance_scale=5.0)
    info["base_accuracy_images"] = 200
    info["build_seconds"] = round(time.time() - start)
    info["torch"] = torch.__version__
    log(f"base accuracy: CFG-free {info['base_accuracy_cfg_free']:.3f}, CFG 5 {info['base_accuracy_cfg_5']:.3f}")

    os.makedirs(output_dir, exist_ok=True)
    _as_loaded(pipeline).save_pretrained(output_dir)
    make_portable(output_dir)
    write_build_info(output_dir, info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the digits-sd model (an SD1.x pipeline on the digits).")
    parser.add_argument("--output_dir", default=DIGITS_SD_PATH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_digits_sd(args.output_dir, args.seed)


if __name__ == "__main__":
    main()
