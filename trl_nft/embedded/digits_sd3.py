"""`digits-sd3`: a real, pretrained (if tiny) text-to-image model on which DiffusionNFT visibly learns on CPU.

scikit-learn's `load_digits` (1797 real 8 x 8 handwritten digits) rendered at 16 x 16 pixels is the data. The builder
(`python -m trl_nft.embedded.digits_sd3`, seeded, about 5 minutes on 2 CPU cores) trains, on a fixed training split:

- a 4-channel `AutoencoderKL` (VAE scale 2, 16 x 16 images <-> 4 x 8 x 8 latents);
- the reward classifier: a small CNN on 16 x 16 images (`DigitClassifier`, the `digit_accuracy` reward);
- a *different* held-out judge: a logistic regression on the 8 x 8 downsampled image (the `digit_judge` reward, for
  `eval_reward_funcs` only, never trained on);
- a tiny SD3 transformer, pretrained with rectified flow on prompts such as "a handwritten digit seven" (the text
  encoders are `tiny-sd3`'s, frozen), stopped early while it follows its prompt poorly: the pinned base has a
  CFG-free accuracy of at most 0.45 under the reward classifier, which leaves room for RL to show.

The weights it writes ship in the package (the pipeline in `DIGITS_SD3_PATH`, the classifier and the judge with the
rewards, in `trl_nft/rewards/digit_weights/`; about 6 MB): the conditioning is learnt abruptly during
pretraining, so a rebuild on other hardware or another torch may stop at another base; shipping pins it.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

from ..prompts.digits import digit_prompt
from ..rewards.digit_models import (
    CLASSIFIER_FILE,
    DIGIT_WEIGHTS_PATH,
    DIGITS_RESOLUTION,
    JUDGE_FILE,
    DigitClassifier,
    DigitJudge,
    judge_features,
    to_grayscale,
)


DIGITS_SD3_PATH = os.path.join(os.path.dirname(__file__), "digits_sd3")
MAX_BASE_ACCURACY = 0.45  # the pinned base's CFG-free accuracy must not exceed this
# Prompt length in tokens, for both CLIP encoders and T5 (the tokenizers' `model_max_length`). The tiny character-level
# tokenizers need 24 for "a handwritten digit seven"; every context token is attended to by every block, so padding to
# SD3's 77 + 128 would make the transformer three times slower.
CONTEXT_TOKENS = 32


# ---------------------------------------------------------------------------------------------- data


def load_digit_images(seed: int = 0, test_fraction: float = 0.2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits rendered as 16 x 16 grayscale images in [0, 1] (`[N, 1, 16, 16]`) with their labels,
    split by `seed` into `train` and `test` (held out from every model the builder trains)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().unsqueeze(1) / 16
    images = F.interpolate(images, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def load_digits_sd3(path: str = DIGITS_SD3_PATH) -> StableDiffusion3Pipeline:
    """The `digits-sd3` pipeline (16 x 16 images), loaded with `StableDiffusion3Pipeline.from_pretrained`."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} holds no digits-sd3 build: run `python -m trl_nft.embedded.digits_sd3`.")
    pipeline = StableDiffusion3Pipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------- the builder


def _batches(n: int, batch_size: int, generator: torch.Generator):
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (augmentation of the classifier's training images)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(images, labels, generator, steps: int = 1500) -> DigitClassifier:
    classifier = DigitClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    batches = _batches(len(labels), 64, generator)
    for _ in range(steps):
        index = next(batches)
        loss = F.cross_entropy(classifier(_shift(images[index], generator)), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


def train_judge(images, labels, seed: int) -> DigitJudge:
    from sklearn.linear_model import LogisticRegression

    features = judge_features(images).numpy()
    model = LogisticRegression(C=0.1, max_iter=2000, random_state=seed).fit(features, labels.numpy())
    return DigitJudge(
        torch.tensor(model.coef_, dtype=torch.float32), torch.tensor(model.intercept_, dtype=torch.float32)
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DIGITS_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def train_vae(images, generator, steps: int, log) -> AutoencoderKL:
    vae = build_vae().train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    batches = _batches(len(images), 32, generator)
    for step in range(steps):
        x = images[next(batches)].expand(-1, 3, -1, -1) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():  # SD3's latent normalisation, measured on the training images
        latents = vae.encode(images.expand(-1, 3, -1, -1) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    return vae


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=DIGITS_RESOLUTION // 2,  # latents are 8 x 8 (VAE scale 2)
        patch_size=1,
        in_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,  # tiny-sd3's T5 width
        caption_projection_dim=64,
        pooled_projection_dim=64,  # tiny-sd3's two pooled CLIP embeddings
        out_channels=4,
        pos_embed_max_size=8,
    )


@torch.no_grad()
def sample_digits(pipeline, transformer, embeds, digits, generator, steps: int = 10, guidance_scale: float = 1.0):
    """Images (`[B, 3, 16, 16]` in [0, 1]) for `digits`, with SD3's Euler flow sampler, from prompt embeddings
    `embeds` (per digit, and index 10: the empty prompt) as the pipeline computes them."""
    prompt_embeds, pooled = embeds
    vae = pipeline.vae
    latents = torch.randn(len(digits), 4, 8, 8, generator=generator)
    sigmas = torch.linspace(1, 0, steps + 1)
    cond = (prompt_embeds[digits], pooled[digits])
    uncond = (prompt_embeds[[10] * len(digits)], pooled[[10] * len(digits)])
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:], strict=True):
        timestep = torch.full((len(digits),), sigma.item() * 1000)
        velocity = transformer(latents, cond[0], cond[1], timestep, return_dict=False)[0]
        if guidance_scale != 1.0:
            uncond_velocity = transformer(latents, uncond[0], uncond[1], timestep, return_dict=False)[0]
            velocity = uncond_velocity + guidance_scale * (velocity - uncond_velocity)
        latents = latents + (next_sigma - sigma) * velocity
    images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def classifier_accuracy(sample, denoiser, classifier, guidance_scale=1.0, per_digit=30, seed=1234) -> float:
    """Accuracy of the reward classifier on `per_digit` images of each digit drawn from fixed noise by
    `sample(denoiser, digits, generator, guidance_scale)` (a builder's own sampler)."""
    generator = torch.Generator().manual_seed(seed)
    digits = torch.arange(10).repeat_interleave(per_digit)
    denoiser.eval()
    images = sample(denoiser, digits, generator, guidance_scale)
    denoiser.train()
    with torch.no_grad():
        return (classifier(to_grayscale(images)).argmax(1) == digits).float().mean().item()


def base_accuracy(pipeline, transformer, embeds, classifier, guidance_scale=1.0) -> float:
    """`classifier_accuracy` of `transformer` with `sample_digits` (300 images)."""

    def sample(model, digits, generator, scale):
        return sample_digits(pipeline, model, embeds, digits, generator, guidance_scale=scale)

    return classifier_accuracy(sample, transformer, classifier, guidance_scale)


def pretrain_weak_base(denoiser, denoising_loss, latents, labels, accuracy, generator, log, eval_every, max_steps):
    """Pretrain `denoiser` on the training latents conditioned on their digits (10% on the empty prompt, index 10,
    for CFG), `denoising_loss(denoiser, x0, condition)` per batch of 32, and pin it while it follows its prompt poorly:
    every `eval_every` steps `accuracy(denoiser)` (CFG-free) is measured, and training stops at the first evaluation
    at or above 0.30, returning that snapshot, or the previous one if it overshot `MAX_BASE_ACCURACY`. Returns the
    denoiser and the `(step, accuracy)` history."""
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-3, weight_decay=0.0)
    batches = _batches(len(labels), 32, generator)
    previous, history = None, []
    for step in range(1, max_steps + 1):
        index = next(batches)
        condition = torch.where(torch.rand(len(index), generator=generator) < 0.1, 10, labels[index])
        loss = denoising_loss(denoiser, latents[index], condition)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0:
            value = accuracy(denoiser)
            history.append((step, round(value, 3)))
            log(f"{type(denoiser).__name__} step {step}: loss {loss.item():.4f}, CFG-free accuracy {value:.3f}")
            if value >= 0.30:
                if value > MAX_BASE_ACCURACY and previous is not None:
                    denoiser.load_state_dict(previous)
                    history.append((step - eval_every, history[-2][1]))
                break
            previous = {key: value.clone() for key, value in denoiser.state_dict().items()}
    return denoiser.eval(), history


def pretrain_transformer(pipeline, images, labels, classifier, generator, log, eval_every=40, max_steps=3000):
    """Rectified flow (SD3's logit-normal times) on the VAE latents of the training images, pinned early by
    `pretrain_weak_base`."""
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=CONTEXT_TOKENS
        )
        vae = pipeline.vae
        latents = vae.encode(images.expand(-1, 3, -1, -1) * 2 - 1).latent_dist.mean
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    embeds = (prompt_embeds, pooled)

    def flow_matching_loss(transformer, x0, condition):
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(len(x0), generator=generator)).view(-1, 1, 1, 1)
        xt = (1 - t) * x0 + t * noise
        velocity = transformer(xt, prompt_embeds[condition], pooled[condition], t.flatten() * 1000, return_dict=False)[
            0
        ]
        return F.mse_loss(velocity, noise - x0)

    def accuracy(transformer):
        return base_accuracy(pipeline, transformer, embeds, classifier)

    transformer, history = pretrain_weak_base(
        build_transformer().train(),
        flow_matching_loss,
        latents,
        labels,
        accuracy,
        generator,
        log,
        eval_every,
        max_steps,
    )
    return transformer, embeds, history


def build_digits_sd3(
    output_dir: str = DIGITS_SD3_PATH,
    reward_dir: str = DIGIT_WEIGHTS_PATH,
    seed: int = 0,
    vae_steps: int = 1500,
    log=None,
) -> dict:
    """Train every part on the training split with seed `seed`; write the model to `output_dir` (the pipeline in
    diffusers' layout and `build_info.json`) and the digit rewards' models to `reward_dir` (`reward_classifier.safetensors`,
    `judge.safetensors`)."""
    from .tiny import build_tiny_sd3

    start = time.time()
    log = log or (lambda message: print(f"[{time.time() - start:6.0f} s] {message}", flush=True))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = load_digit_images(seed)
    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]

    def accuracy(model, images, labels):
        with torch.no_grad():
            return (model(images).argmax(1) == labels).float().mean().item()

    classifier = train_classifier(train_images, train_labels, generator)
    judge = train_judge(train_images, train_labels, seed)
    info = {
        "seed": seed,
        "classifier_test_accuracy": accuracy(classifier, test_images, test_labels),
        "judge_test_accuracy": accuracy(judge, test_images, test_labels),
    }
    log(f"classifier {info['classifier_test_accuracy']:.3f}, judge {info['judge_test_accuracy']:.3f} (held out)")

    vae = train_vae(train_images, generator, vae_steps, log)
    with torch.no_grad():
        x = test_images.expand(-1, 3, -1, -1) * 2 - 1
        reconstructions = (vae.decode(vae.encode(x).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    mse = F.mse_loss(reconstructions, test_images.expand(-1, 3, -1, -1)).item()
    info["vae_test_psnr"] = 10 * np.log10(1 / mse)
    info["classifier_reconstruction_accuracy"] = accuracy(classifier, to_grayscale(reconstructions), test_labels)
    log(
        f"vae PSNR {info['vae_test_psnr']:.1f} dB, classifier on reconstructions {info['classifier_reconstruction_accuracy']:.3f}"
    )

    tiny = build_tiny_sd3(seed)  # its tokenizers and frozen text encoders
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tiny.components[name].model_max_length = CONTEXT_TOKENS
    pipeline = StableDiffusion3Pipeline(
        transformer=build_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        **{key: value for key, value in tiny.components.items() if key.startswith(("text_encoder", "tokenizer"))},
    )
    transformer, embeds, history = pretrain_transformer(
        pipeline, train_images, train_labels, classifier, generator, log
    )
    pipeline.transformer = transformer
    info["pretraining_history"] = history
    info["base_accuracy_cfg_free"] = base_accuracy(pipeline, transformer, embeds, classifier)
    for scale in (2, 3):
        info[f"base_accuracy_cfg_{scale}"] = base_accuracy(pipeline, transformer, embeds, classifier, scale)
    info["build_seconds"] = round(time.time() - start)
    info["torch"] = torch.__version__
    log(
        f"base accuracy: CFG-free {info['base_accuracy_cfg_free']:.3f}, CFG 2 {info['base_accuracy_cfg_2']:.3f}, CFG 3 {info['base_accuracy_cfg_3']:.3f}"
    )

    os.makedirs(output_dir, exist_ok=True)
    pipeline.save_pretrained(output_dir)
    os.makedirs(reward_dir, exist_ok=True)
    save_file(classifier.state_dict(), os.path.join(reward_dir, CLASSIFIER_FILE))
    save_file(
        {"weight": judge.weight.contiguous(), "bias": judge.bias.contiguous()}, os.path.join(reward_dir, JUDGE_FILE)
    )
    write_build_info(output_dir, info)
    return info


def write_build_info(output_dir: str, info: dict) -> None:
    """A builder's record (`build_info.json`: measured accuracies, pretraining history, versions), floats to 3 places."""
    with open(os.path.join(output_dir, "build_info.json"), "w") as file:
        json.dump({key: round(v, 3) if isinstance(v, float) else v for key, v in info.items()}, file, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the digits-sd3 model, its reward classifier and judge.")
    parser.add_argument("--output_dir", default=DIGITS_SD3_PATH)
    parser.add_argument("--reward_dir", default=DIGIT_WEIGHTS_PATH, help="where the classifier and the judge go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_digits_sd3(args.output_dir, args.reward_dir, args.seed)


if __name__ == "__main__":
    main()
