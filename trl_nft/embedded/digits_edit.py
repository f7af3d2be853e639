"""`digits-edit`: a real, pretrained (if tiny) FLUX.1 Kontext instruction-editing model on which DiffusionNFT visibly
learns on CPU.

The task: redraw a handwritten source digit as the digit an instruction asks for ("write the digit after this one":
`(d + 1) % 10`; the prompt set, `trl_nft.prompts.digits_edit`, holds the instructions). The builder
(`python -m trl_nft.embedded.digits_edit`, seeded; 1.5 minutes on one free core) assembles a `FluxKontextPipeline`:

- `digits-sd3`'s VAE (4 channels, scale 2: the pipeline's `vae_scale_factor` is 2, so 16 x 16 images <-> 8 x 8
  latents <-> 4 x 4 packed tokens of 16 channels) and its frozen tiny text encoders: its CLIP text encoder (loaded as
  the `CLIPTextModel` FLUX takes; its pooled output) and its T5, with their tokenizers (32 tokens);
- a tiny `FluxTransformer2DModel` (0.46 M parameters: 2 joint and 2 single-stream blocks of width 64; no guidance
  input: a guidance-distilled model needs a CFG teacher, and this one is trained from scratch), pretrained with
  rectified flow as `FluxKontextPipeline` feeds it: the target's noisy tokens, then the source's (the VAE's mode,
  shifted and scaled, position ids at first coordinate 1), the output cut back to the target's; the target is a random
  *other* training image of the asked-for digit. A linear probe on the target's tokens, trained beside it to name the
  asked-for digit and then dropped, makes it learn to read the source within hundreds of steps (on the denoising loss
  alone a first build was still at chance after 1100). Pretraining stops early while the model edits poorly: every
  `eval_every` steps the held-out judge (`digit_judge`) reads edits of the prompt set's 200 test sources (never seen by
  any digits model), sampled by the pipeline itself with the preset's settings (10 Euler steps), and the first
  snapshot at or above 0.30 is kept (the one before if it overshot `MAX_BASE_ACCURACY`).

It also writes the prompt set's source digits (`trl_nft/prompts/digit_images.safetensors`: the split of
`digits-sd3`'s builder, rendered as the 8-bit images the prompt set hands out, so that the model trains on exactly
those). As for `digits-sd3`, the weights ship in the package (about 3 MB): where pretraining stops depends on every
rounding on the way, so a rebuild on other hardware or another torch may stop at another base; shipping pins it.

`FluxKontextPipeline` fixes its default size (1024 px) in code, resizes the target to `max_area` (1024² pixels) and
the source to Kontext's preferred resolutions (about 1024 px): `load_digits_edit` sets the default to 16 px; called
directly, the pipeline needs `height=16, width=16, max_area=256, _auto_resize=False` (the trainer's adapter does so).
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ..prompts.digits_edit import DIGIT_IMAGES_PATH, INSTRUCTIONS, edit_target, save_source_digits
from ..rewards.digit_models import DIGITS_RESOLUTION, load_classifier, load_judge, to_grayscale
from .digits_sd3 import DIGITS_SD3_PATH, _batches, load_digit_images, write_build_info
from .tiny_flux import FLUX_SCHEDULER_CONFIG


DIGITS_EDIT_PATH = os.path.join(os.path.dirname(__file__), "digits_edit")
MAX_BASE_ACCURACY = 0.45  # the pinned base's judge accuracy on held-out sources must not exceed this
STOP_ACCURACY = 0.30  # pretraining stops at the first evaluation at or above this
PROBE_WEIGHT = 0.5  # of the auxiliary probe's cross-entropy beside the denoising loss
NUM_INFERENCE_STEPS = 10  # the preset's rollouts


def load_digits_edit(path: str = DIGITS_EDIT_PATH) -> FluxKontextPipeline:
    """The `digits-edit` pipeline (16 x 16 images), loaded with `FluxKontextPipeline.from_pretrained`."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} holds no digits-edit build: run `python -m trl_nft.embedded.digits_edit`.")
    pipeline = FluxKontextPipeline.from_pretrained(path)
    return _sized(pipeline)


def _sized(pipeline: FluxKontextPipeline) -> FluxKontextPipeline:
    # The pipeline's native size is fixed in code (1024 px), not in a config: this model's is 16 px.
    pipeline.default_sample_size = DIGITS_RESOLUTION // pipeline.vae_scale_factor
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------- the builder


def build_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2 x 2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,  # digits-sd3's T5 width
        pooled_projection_dim=32,  # its CLIP text encoder's width
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),  # image index / height / width: they sum to the head dimension
    )


def build_pipeline(text_encoders_path: str = DIGITS_SD3_PATH) -> FluxKontextPipeline:
    """The pipeline with a fresh transformer (seed it first) and `digits-sd3`'s VAE, text encoders and tokenizers."""

    def load(model_class, subfolder):
        return model_class.from_pretrained(text_encoders_path, subfolder=subfolder)

    # FLUX.1's: the shift follows the target's sequence length (16 tokens here: about 1.6).
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    pipeline = FluxKontextPipeline(
        scheduler=scheduler,
        vae=load(AutoencoderKL, "vae").eval(),
        text_encoder=load(CLIPTextModel, "text_encoder").eval(),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        text_encoder_2=load(T5EncoderModel, "text_encoder_3").eval(),
        tokenizer_2=load(T5Tokenizer, "tokenizer_3"),
        transformer=build_transformer(),
    )
    return _sized(pipeline)


def source_digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`digits-sd3`'s split (its VAE, classifier and judge never saw the test split) as the prompt set hands it out:
    8-bit images `[N, 16, 16]` (so that the model trains on exactly what it will edit) and labels, by split."""
    data = load_digit_images()
    return {split: ((images[:, 0] * 255).round().to(torch.uint8), labels) for split, (images, labels) in data.items()}


@torch.no_grad()
def encode_images(pipeline: FluxKontextPipeline, images: torch.Tensor) -> torch.Tensor:
    """`[N, 1, 16, 16]` images in [0, 1] -> packed latents `[N, 16, 16]`, as the pipeline encodes a condition."""
    latents = pipeline._encode_vae_image(images.expand(-1, 3, -1, -1) * 2 - 1, generator=None)
    return pipeline._pack_latents(latents, *latents.shape)


def token_ids(pipeline: FluxKontextPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tokens' positions (`img_ids`: the target's, then the source's at first coordinate 1) and the text
    tokens' (`txt_ids`, zero), as the pipeline builds them for a 16 px target and source."""
    side = DIGITS_RESOLUTION // pipeline.vae_scale_factor // 2
    target = pipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    source = target.clone()
    source[..., 0] = 1
    return torch.cat([target, source]), torch.zeros(pipeline.tokenizer_2.model_max_length, 3)


@torch.no_grad()
def sample_edits(pipeline, sources, embeds, instructions, generator) -> torch.Tensor:
    """Edits `[B, 3, 16, 16]` in [0, 1] of `sources` (packed latents) per `instructions` (indices into `embeds`, the
    instructions' prompt embeddings), sampled by the pipeline itself with the preset's settings."""
    prompt_embeds, pooled = embeds
    side = DIGITS_RESOLUTION // pipeline.vae_scale_factor
    return pipeline(
        image=pipeline._unpack_latents(sources, DIGITS_RESOLUTION, DIGITS_RESOLUTION, pipeline.vae_scale_factor),
        prompt_embeds=prompt_embeds[instructions],
        pooled_prompt_embeds=pooled[instructions],
        height=side * pipeline.vae_scale_factor,
        width=side * pipeline.vae_scale_factor,
        max_area=DIGITS_RESOLUTION**2,
        num_inference_steps=NUM_INFERENCE_STEPS,
        generator=generator,
        output_type="pt",
    ).images


def edit_accuracies(pipeline, sources, labels, embeds, readers: dict, seed: int = 1234) -> dict[str, float]:
    """For each reader (judge, classifier), how often it reads the asked-for digit in edits of `sources` with every
    instruction in turn (fixed noise); and how often the judge reads the *source* digit (a copy)."""
    instructions = torch.arange(len(sources)) % len(INSTRUCTIONS)
    names = list(INSTRUCTIONS)
    targets = torch.tensor([edit_target(names[i], int(d)) for i, d in zip(instructions, labels, strict=True)])
    pipeline.transformer.eval()
    images = to_grayscale(sample_edits(pipeline, sources, embeds, instructions, torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        reads = {name: reader(images).argmax(1) for name, reader in readers.items()}
    result = {name: (read == targets).float().mean().item() for name, read in reads.items()}
    result["judge_reads_source"] = (reads["judge"] == labels).float().mean().item()
    return result


def pretrain_weak_editor(pipeline, train, test, readers, generator, log, eval_every=50, max_steps=4000, batch=32):
    """Rectified flow (logit-normal times) on (source, instruction) -> a random training image of the asked-for digit,
    pinned early (see the module docstring). Returns the `(step, judge accuracy)` history."""
    (train_latents, train_labels), (test_latents, test_labels) = train, test
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipeline.encode_prompt(
            list(INSTRUCTIONS), prompt_2=None, device="cpu", max_sequence_length=pipeline.tokenizer_2.model_max_length
        )
    embeds = (prompt_embeds, pooled)
    image_ids, text_ids = token_ids(pipeline)
    by_digit = [torch.nonzero(train_labels == d).flatten() for d in range(10)]
    offsets = torch.tensor(list(INSTRUCTIONS.values()))
    transformer = pipeline.transformer.train()
    # The probe (see the module docstring) reads the asked-for digit from the target's tokens after the joint blocks.
    probe, features = torch.nn.Linear(transformer.inner_dim, 10), {}
    tokens = train_latents.shape[1]

    def keep_target_features(module, inputs, outputs):
        features["target"] = outputs[1][:, :tokens].mean(dim=1)  # (text, image) states: the target's tokens

    hook = transformer.transformer_blocks[-1].register_forward_hook(keep_target_features)
    parameters = [*transformer.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    batches = _batches(len(train_labels), batch, generator)
    previous, history = None, []
    for step in range(1, max_steps + 1):
        source = next(batches)
        instruction = torch.randint(len(INSTRUCTIONS), (batch,), generator=generator)
        target_digits = (train_labels[source] + offsets[instruction]) % 10
        target = torch.stack(
            [by_digit[d][torch.randint(len(by_digit[d]), (1,), generator=generator)][0] for d in target_digits]
        )
        x0 = train_latents[target]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(batch, generator=generator))
        xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        velocity = transformer(
            hidden_states=torch.cat([xt, train_latents[source]], dim=1),
            timestep=t,
            pooled_projections=pooled[instruction],
            encoder_hidden_states=prompt_embeds[instruction],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0][:, :tokens]
        loss = F.mse_loss(velocity, noise - x0) + PROBE_WEIGHT * F.cross_entropy(
            probe(features["target"]), target_digits
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0:
            accuracy = edit_accuracies(pipeline, test_latents, test_labels, embeds, readers)
            transformer.train()
            history.append((step, round(accuracy["judge"], 3)))
            log(f"step {step}: loss {loss.item():.4f}, " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
            if accuracy["judge"] >= STOP_ACCURACY:
                if accuracy["judge"] > MAX_BASE_ACCURACY and previous is not None:
                    transformer.load_state_dict(previous)
                    history.append(history[-2])
                break
            previous = {key: value.clone() for key, value in transformer.state_dict().items()}
    hook.remove()
    transformer.eval()
    return embeds, history


def build_digits_edit(
    output_dir: str = DIGITS_EDIT_PATH,
    images_path: str = DIGIT_IMAGES_PATH,
    seed: int = 0,
    num_eval_sources: int = 200,
    eval_every: int = 50,
    log=None,
) -> dict:
    """Pretrain the editor with seed `seed` on the training split of `digits-sd3`'s data; write the pipeline in
    diffusers' layout with `build_info.json` to `output_dir`, and the source digits to `images_path`."""
    start = time.time()
    log = log or (lambda message: print(f"[{time.time() - start:6.0f} s] {message}", flush=True))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    uint8 = source_digits()
    save_source_digits(uint8, images_path)
    pipeline = build_pipeline()
    encoded = {
        split: (encode_images(pipeline, images.unsqueeze(1).float() / 255), labels)
        for split, (images, labels) in uint8.items()
    }
    test_latents, test_labels = encoded["test"]
    test = (test_latents[:num_eval_sources], test_labels[:num_eval_sources])
    readers = {"judge": load_judge(), "classifier": load_classifier()}
    embeds, history = pretrain_weak_editor(
        pipeline, encoded["train"], test, readers, generator, log, eval_every=eval_every
    )
    base = edit_accuracies(pipeline, *test, embeds, readers)
    info = {
        "seed": seed,
        "transformer_parameters": sum(p.numel() for p in pipeline.transformer.parameters()),
        "pretraining_history": history,
        "base_judge_accuracy": base["judge"],
        "base_classifier_accuracy": base["classifier"],
        "base_judge_reads_source": base["judge_reads_source"],
        "num_eval_sources": len(test[1]),
        "build_seconds": round(time.time() - start),
        "torch": torch.__version__,
    }
    log(f"base: judge {base['judge']:.3f}, classifier {base['classifier']:.3f} on {len(test[1])} held-out sources")

    os.makedirs(output_dir, exist_ok=True)
    pipeline.save_pretrained(output_dir)
    write_build_info(output_dir, info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the digits-edit model and its prompt set's source digits.")
    parser.add_argument("--output_dir", default=DIGITS_EDIT_PATH)
    parser.add_argument("--images_path", default=DIGIT_IMAGES_PATH, help="where the source digits go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_every", type=int, default=50)
    args = parser.parse_args(argv)
    build_digits_edit(args.output_dir, args.images_path, args.seed, eval_every=args.eval_every)


if __name__ == "__main__":
    main()
