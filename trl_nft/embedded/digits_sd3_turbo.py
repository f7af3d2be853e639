"""`digits-sd3-turbo`: `digits-sd3` step-distilled to 2 steps, the test bed for DiffusionNFT on distilled models.

`digits-sd3` samples with 10 Euler steps of its `FlowMatchEulerDiscreteScheduler` (flow times 1, 0.889, ..., 0.112,
0.001, then 0). At 2 steps the same scheduler visits 1 and 0.001, both on that grid: one jump from pure noise to a
nearly clean image, then a last thousandth. Undistilled, that jump lands on the average of what the noise could become
(blurred: sharpness 0.073 against 0.088 at 10 steps). The builder (`python -m trl_nft.embedded.digits_sd3_turbo`,
seeded, about 5 minutes on one busy CPU thread) distils the teacher's 10-step sampler into those 2 steps in one stage
of progressive distillation (each student step is trained to land where the teacher's steps over its interval land:
9 of them, then 1):

- a bank of teacher trajectories: fixed noise, a prompt per trajectory ("a handwritten digit seven", CFG-free), run
  through the teacher's 10 Euler steps, kept at the student's times;
- the student, initialised from the teacher, regresses at a student time `s_j` on the teacher's state there the
  velocity `(x_teacher(s_{j+1}) - x_teacher(s_j)) / (s_{j+1} - s_j)` that one Euler step needs to reach the teacher's
  next state, the steps drawn in proportion to their length.

Only the transformer is new: the shipped folder (`DIGITS_SD3_TURBO_PATH`, 1.2 MB: float16 weights, loaded as float32)
holds it and `build_info.json`; `load_digits_sd3_turbo` takes every other component (scheduler, VAE, text encoders)
from `digits-sd3`'s folder. The pipeline samples as distilled with `num_inference_steps=2` (`DIGITS_SD3_TURBO_STEPS`;
the `digits-sd3-turbo` preset sets it) and `guidance_scale=1.0`. The builder measures the held-out judge's and the
reward classifier's accuracy and the images' sharpness, on the same 300 images' noise, of the teacher at 10 and 2
steps and of the student at 2; the student must draw within 0.05 of the teacher's 10-step judge accuracy.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from ..prompts.digits import digit_prompt
from ..rewards.digit_models import load_classifier, load_judge, to_grayscale
from .digits_sd3 import CONTEXT_TOKENS, DIGITS_SD3_PATH, load_digits_sd3, write_build_info


DIGITS_SD3_TURBO_PATH = os.path.join(os.path.dirname(__file__), "digits_sd3_turbo")
DIGITS_SD3_TURBO_STEPS = 2  # the distilled sampler: digits-sd3's FlowMatchEuler scheduler at 2 steps
TEACHER_STEPS = 10  # digits-sd3's sampler, which the student reproduces
MAX_JUDGE_GAP = 0.05  # the student's judge accuracy at 4 steps must be within this of the teacher's at 10


def load_digits_sd3_turbo(
    path: str = DIGITS_SD3_TURBO_PATH, base_path: str = DIGITS_SD3_PATH
) -> StableDiffusion3Pipeline:
    """The `digits-sd3-turbo` pipeline: `digits-sd3`'s components (from `base_path`) with the distilled transformer
    (from `path`). Sample it with `num_inference_steps=DIGITS_SD3_TURBO_STEPS` (4) and `guidance_scale=1.0`."""
    if not os.path.isfile(os.path.join(path, "transformer", "config.json")):
        raise FileNotFoundError(
            f"{path} holds no digits-sd3-turbo build: run `python -m trl_nft.embedded.digits_sd3_turbo`."
        )
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32)
    pipeline = StableDiffusion3Pipeline.from_pretrained(base_path, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------- the builder


def _prompt_embeddings(pipeline: StableDiffusion3Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """Each digit's prompt embeddings and pooled embeddings (index = digit), as the pipeline computes them."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            [digit_prompt(d) for d in range(10)],
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=CONTEXT_TOKENS,
        )
    return embeds, pooled


def _flow_times(pipeline: StableDiffusion3Pipeline, steps: int) -> torch.Tensor:
    """The flow times the pipeline's scheduler visits at `steps` steps, with the final 0."""
    pipeline.scheduler.set_timesteps(steps)
    return pipeline.scheduler.sigmas.clone()


@torch.no_grad()
def teacher_trajectories(transformer, embeds, noise, digits, times: torch.Tensor, keep: torch.Tensor, chunk=512):
    """Euler trajectories of `transformer` from `noise` (flow time 1) over `times` (with the final 0), conditioned on
    `digits`; returns the states at the times `keep` (indices into `times`), `[len(keep), N, ...]`."""
    kept = []
    for start in range(0, len(noise), chunk):
        x, index = noise[start : start + chunk], digits[start : start + chunk]
        states = [x]
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            timestep = torch.full((len(x),), t.item() * 1000)
            velocity = transformer(x, embeds[0][index], embeds[1][index], timestep, return_dict=False)[0]
            x = x + (t_next - t) * velocity
            states.append(x)
        kept.append(torch.stack(states)[keep])
    return torch.cat(kept, dim=1)


@torch.no_grad()
def judge_and_classifier_accuracy(pipeline, steps: int, per_digit: int = 30, seed: int = 1234) -> dict[str, float]:
    """The held-out judge's and the reward classifier's accuracy on `per_digit` images of each digit sampled by the
    pipeline at `steps` steps, CFG-free, from fixed noise; and the images' latents (to compare samplers)."""
    digits = torch.arange(10).repeat_interleave(per_digit)
    output = pipeline(
        [digit_prompt(d) for d in digits.tolist()],
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=CONTEXT_TOKENS,
        output_type="latent",
    ).images
    vae = pipeline.vae
    images = vae.decode(output / vae.config.scaling_factor + vae.config.shift_factor).sample
    gray = to_grayscale((images / 2 + 0.5).clamp(0, 1))
    judge, classifier = load_judge(), load_classifier()
    return {
        "judge": (judge(gray).argmax(1) == digits).float().mean().item(),
        "classifier": (classifier(gray).argmax(1) == digits).float().mean().item(),
        "sharpness": image_sharpness(gray).mean().item(),
        "latents": output,
    }


def image_sharpness(gray: torch.Tensor) -> torch.Tensor:
    """Each grayscale image's (`[B, 1, H, W]` in [0, 1]) mean absolute difference between neighbouring pixels: its
    total variation per pixel, which falls as an image blurs or fades (held-out real digits: 0.093)."""
    across, down = gray.diff(dim=-1).abs().mean(dim=(1, 2, 3)), gray.diff(dim=-2).abs().mean(dim=(1, 2, 3))
    return (across + down) / 2


def build_digits_sd3_turbo(
    output_dir: str = DIGITS_SD3_TURBO_PATH,
    seed: int = 0,
    trajectories: int = 1024,
    steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    log=None,
) -> dict:
    """Distil `digits-sd3`'s 10-step sampler into `DIGITS_SD3_TURBO_STEPS` steps with seed `seed`; write the student
    transformer (float16) and `build_info.json` to `output_dir`."""
    start = time.time()
    log = log or (lambda message: print(f"[{time.time() - start:6.0f} s] {message}", flush=True))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pipeline = load_digits_sd3()
    teacher = pipeline.transformer.eval().requires_grad_(False)
    embeds = _prompt_embeddings(pipeline)

    teacher_times = _flow_times(pipeline, TEACHER_STEPS)
    student_times = _flow_times(pipeline, DIGITS_SD3_TURBO_STEPS)
    # Each student time is one of the teacher's: the teacher's states there are the student's inputs and targets.
    keep = torch.tensor([int(torch.isclose(teacher_times, t, atol=1e-5).nonzero()[0]) for t in student_times])
    size = teacher.config.sample_size
    noise = torch.randn(trajectories, teacher.config.in_channels, size, size, generator=generator)
    digits = torch.randint(0, 10, (trajectories,), generator=generator)
    states = teacher_trajectories(teacher, embeds, noise, digits, teacher_times, keep)
    log(f"{trajectories} teacher trajectories at the student's times {student_times.tolist()}")
    gaps = student_times[1:] - student_times[:-1]
    targets = (states[1:] - states[:-1]) / gaps.view(-1, 1, 1, 1, 1)
    # A step's velocity error moves the latents in proportion to its length: steps are drawn by it (at 2 steps the
    # jump from 1 to 0.001 all but always, the last thousandth almost never).
    lengths = -gaps

    student = SD3Transformer2DModel.from_config(teacher.config)
    student.load_state_dict(teacher.state_dict())
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)
    info = {"seed": seed, "trajectories": trajectories, "steps": steps, "batch_size": batch_size}
    info["learning_rate"] = learning_rate
    for step in range(1, steps + 1):
        index = torch.randint(0, trajectories, (batch_size,), generator=generator)
        j = torch.multinomial(lengths, batch_size, replacement=True, generator=generator)
        timestep = student_times[j] * 1000
        velocity = student(states[j, index], embeds[0][digits[index]], embeds[1][digits[index]], timestep)[0]
        loss = F.mse_loss(velocity, targets[j, index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps:
            log(f"distillation step {step}: loss {loss.item():.5f}")
    student.eval()

    # Stored in float16 (half the size) and measured as loaded, in float32.
    student.to(torch.float16).save_pretrained(os.path.join(output_dir, "transformer"))
    distilled = load_digits_sd3_turbo(output_dir)
    few = DIGITS_SD3_TURBO_STEPS
    reference = judge_and_classifier_accuracy(pipeline, TEACHER_STEPS)
    measurements = {
        f"teacher_{TEACHER_STEPS}_steps": reference,
        f"teacher_{few}_steps": judge_and_classifier_accuracy(pipeline, few),  # undistilled: blurred
        f"turbo_{few}_steps": judge_and_classifier_accuracy(distilled, few),
    }
    for name, result in measurements.items():
        info.update({f"{name}_{key}": value for key, value in result.items() if key != "latents"})
        # How far each sample lands from the teacher's 10-step sample of the same noise (latent RMS).
        distance = (result["latents"] - reference["latents"]).pow(2).mean().sqrt()
        info[f"{name}_latent_rms_to_teacher_{TEACHER_STEPS}_steps"] = distance.item()
    info["judge_gap"] = abs(info[f"turbo_{few}_steps_judge"] - info[f"teacher_{TEACHER_STEPS}_steps_judge"])
    info["build_seconds"] = round(time.time() - start)
    info["torch"] = torch.__version__
    log({key: round(value, 3) if isinstance(value, float) else value for key, value in info.items()})
    write_build_info(output_dir, info)
    if info["judge_gap"] > MAX_JUDGE_GAP:
        raise RuntimeError(f"the distilled model's judge accuracy is {info['judge_gap']:.3f} from the teacher's.")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Distil digits-sd3 into the 4-step digits-sd3-turbo.")
    parser.add_argument("--output_dir", default=DIGITS_SD3_TURBO_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    build_digits_sd3_turbo(args.output_dir, args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
