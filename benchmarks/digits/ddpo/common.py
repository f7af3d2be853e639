"""What both runners of the DDPO comparison share: the digits models and the evaluation protocol.

It runs in both virtual environments (the main one, and TRL 0.23.1's in `.venv` here), so it imports nothing from the
`trl_nft` package, whose `__init__` needs the main environment's versions: `trl_nft/prompts/digits.py` (the prompts) and
`trl_nft/rewards/digit_models.py` (the reward classifier and the judge) are loaded as standalone modules from their
files.

Evaluation: the ten digit prompts, each 10 times (100 images), one image per prompt from fixed initial latents,
10 steps of deterministic DDIM (eta 0, SD1.x's scheduler config), the pipeline's own `__call__`; at CFG 1 (CFG-free)
and at DDPO's training CFG 5. Reported: the reward classifier's top-1 accuracy and the held-out judge's.
"""

import importlib.util
import os
import sys
import time

import torch


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DIGITS_SD_PATH = os.path.join(ROOT, "trl_nft", "embedded", "digits_sd")
EVAL_GUIDANCE_SCALES = (1.0, 5.0)
EVAL_STEPS = 10
EVAL_PER_DIGIT = 10


def load_standalone(*path: str):
    """The module at `trl_nft/<path>` loaded from its file, without the `trl_nft` package (it must import none of it)."""
    name = "standalone_" + "_".join(path).removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "trl_nft", *path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Evaluator:
    """Accuracies of a `StableDiffusionPipeline`'s samples under the reward classifier and the judge (see above)."""

    def __init__(self, seed: int = 0):
        self.digit_models = load_standalone("rewards", "digit_models.py")
        self.classifier = self.digit_models.load_classifier()
        self.judge = self.digit_models.load_judge()
        self.labels = torch.arange(10).repeat(EVAL_PER_DIGIT)
        prompts = load_standalone("prompts", "digits.py")
        self.prompts = [prompts.digit_prompt(int(d)) for d in self.labels]
        self.latents = torch.randn(len(self.labels), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_pretrained(DIGITS_SD_PATH, subfolder="scheduler")

    @torch.no_grad()
    def __call__(self, pipeline) -> dict[str, float]:
        scheduler = pipeline.scheduler
        unet_was_training = pipeline.unet.training
        pipeline.scheduler = self.scheduler
        pipeline.unet.eval()
        result = {}
        try:
            for guidance_scale in EVAL_GUIDANCE_SCALES:
                images = pipeline(
                    self.prompts,
                    height=16,
                    width=16,
                    num_inference_steps=EVAL_STEPS,
                    guidance_scale=guidance_scale,
                    eta=0.0,
                    latents=self.latents.clone(),
                    output_type="pt",
                ).images
                gray = self.digit_models.to_grayscale(images.float().cpu())
                suffix = "" if guidance_scale == 1.0 else f"_cfg{guidance_scale:g}"
                top1 = (self.classifier(gray).argmax(1) == self.labels).float().mean().item()
                judge = (self.judge(gray).argmax(1) == self.labels).float().mean().item()
                result[f"classifier_accuracy{suffix}"] = round(top1, 4)
                result[f"judge_accuracy{suffix}"] = round(judge, 4)
        finally:
            pipeline.scheduler = scheduler
            pipeline.unet.train(unet_was_training)
        return result


class Clock:
    """Training wall-clock with evaluations excluded: `train_seconds` counts only the time inside `training()`."""

    def __init__(self):
        self.train_seconds = 0.0

    def start(self):
        self._start = time.perf_counter()

    def stop(self):
        self.train_seconds += time.perf_counter() - self._start
