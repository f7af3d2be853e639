"""OCR reward for text rendering (Flow-GRPO's text-rendering task, https://github.com/yifan123/flow_grpo): how closely
the text an OCR model reads in the image matches the text the prompt asks for between double quotes.

The reward follows Flow-GRPO's `flow_grpo/ocr.py`; only the OCR model differs by default: docTR (PyTorch) instead of
PaddleOCR, which needs PaddlePaddle beside PyTorch. `backend="paddleocr"` runs PaddleOCR as Flow-GRPO does.
"""

import json
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..prompt_formats import normalize_text, quoted_text
from . import register_reward
from .base import RewardModel, resolve_file


# Subfolders of an `ocr` checkpoint, each in docTR's Hub format (`config.json` + `pytorch_model.bin`).
_DOCTR_TASKS = ("detection", "recognition")


def levenshtein(a: str, b: str) -> int:
    """The edit distance between `a` and `b`: the least number of single-character insertions, deletions and
    substitutions that turn `a` into `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_reward(read: str, target: str) -> float:
    """Flow-GRPO's OCR reward of the text `read` in an image, for the text `target` it should show.

    Both are lowercased and stripped of spaces. The reward is 1 when the target is a substring of the read text (extra
    text around it is not penalised), else `1 - min(levenshtein(read, target), len(target)) / len(target)`, in [0, 1]:
    the fraction of the target's characters that need no edit, where reading much unrelated text costs no more than
    reading nothing.
    """
    read, target = normalize_text(read), normalize_text(target)
    if not target:
        raise ValueError("ocr_reward: the target text is empty once spaces are removed.")
    if target in read:
        return 1.0
    return 1.0 - min(levenshtein(read, target), len(target)) / len(target)


def save_doctr_checkpoint(
    path: str, detection: torch.nn.Module, recognition: torch.nn.Module, det_arch: str, reco_arch: str
):
    """Save docTR models as an `ocr` checkpoint folder: `detection/` and `recognition/`, each with `config.json` (the
    model's `cfg` plus its `arch` and `task`) and `pytorch_model.bin` (its state dict), the files docTR's
    `push_to_hf_hub` uploads. Pass models built from their architecture function (e.g.
    `doctr.models.detection.fast_base(pretrained=True)`), not the reparameterized ones inside an `ocr_predictor`."""
    for task, model, arch in zip(_DOCTR_TASKS, (detection, recognition), (det_arch, reco_arch), strict=True):
        folder = os.path.join(path, task)
        os.makedirs(folder, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
        with open(os.path.join(folder, "config.json"), "w") as file:
            json.dump({**model.cfg, "arch": arch, "task": task}, file, indent=2, ensure_ascii=False)


def _import_doctr():
    try:
        from doctr import models
    except ImportError as error:
        raise ImportError('The `ocr` reward needs docTR: pip install "trl-nft[ocr]"') from error
    return models


def _load_doctr_model(checkpoint: str, task: str) -> torch.nn.Module:
    """A docTR detection or recognition model from `checkpoint/<task>/` (as docTR's `from_hub`, but also from a local
    folder, and without downloading a backbone that the checkpoint overwrites)."""
    models = _import_doctr()
    with open(resolve_file(checkpoint, "ocr", f"{task}/config.json")) as file:
        cfg = json.load(file)
    arch, saved_task = cfg.pop("arch"), cfg.pop("task")
    if saved_task != task:
        raise ValueError(f"ocr checkpoint {checkpoint!r}: {task}/config.json is a {saved_task!r} model.")
    family = getattr(models, task)
    if arch not in family.zoo.ARCHS:
        raise ValueError(f"ocr checkpoint {checkpoint!r}: unknown docTR {task} architecture {arch!r}.")
    if task == "detection":
        model = getattr(family, arch)(pretrained=False, pretrained_backbone=False)
    else:
        model = getattr(family, arch)(
            pretrained=False, pretrained_backbone=False, input_shape=cfg["input_shape"], vocab=cfg["vocab"]
        )
    model.cfg = cfg  # the predictor takes the input size, mean and std from here
    model.from_pretrained(resolve_file(checkpoint, "ocr", f"{task}/pytorch_model.bin"))
    if isinstance(model, models.detection.FAST):
        model = models.detection.fast.reparameterize(model)  # as docTR's `detection_predictor` does
    return model


@register_reward("ocr")
class OCRReward(RewardModel):
    """Text rendering: `ocr_reward(read, target)` (see there), in [0, 1], where `target` is the text between the first
    pair of double quotes of the prompt (or the `ocr_text` column when the dataset has one) and `read` is all the text
    the OCR model reads in the image, joined in reading order. Images whose prompt quotes no text get None.

    Args:
        checkpoint: docTR weights: a local folder or Hub repository with `detection/` and `recognition/` subfolders
            in docTR's Hub format (see `save_doctr_checkpoint`). Default: docTR's released weights for `det_arch` and
            `reco_arch`, downloaded by docTR.
        backend: `"doctr"` (default, PyTorch) or `"paddleocr"` (Flow-GRPO's OCR: `PaddleOCR(lang="en")` on CPU, with
            the models PaddleOCR downloads itself; no `checkpoint`).
        det_arch, reco_arch: docTR architectures used without a `checkpoint` (docTR's defaults).
        batch_size: images per OCR call.

    The OCR runs in float32 whatever the trainer's precision.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        backend: str = "doctr",
        det_arch: str = "fast_base",
        reco_arch: str = "crnn_vgg16_bn",
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if backend not in ("doctr", "paddleocr"):
            raise ValueError(f"ocr: backend must be 'doctr' or 'paddleocr', got {backend!r}.")
        if backend == "paddleocr" and checkpoint:
            raise ValueError("ocr: the paddleocr backend uses PaddleOCR's own models and takes no checkpoint.")
        super().__init__(checkpoint=checkpoint, batch_size=batch_size, device=device, dtype=dtype)
        self.backend = backend
        self.det_arch = det_arch
        self.reco_arch = reco_arch

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.backend, self.det_arch, self.reco_arch)

    def load(self) -> Callable[[list[Image.Image]], list[str]]:
        """A reader: images -> the text read in each (words or lines of confidence > 0, joined without separator)."""
        return self._load_paddleocr() if self.backend == "paddleocr" else self._load_doctr()

    def _load_doctr(self) -> Callable[[list[Image.Image]], list[str]]:
        models = _import_doctr()
        if self.checkpoint:
            detection, recognition = (_load_doctr_model(self.checkpoint, task) for task in _DOCTR_TASKS)
            predictor = models.ocr_predictor(detection, recognition, pretrained=False)
        else:
            predictor = models.ocr_predictor(self.det_arch, self.reco_arch, pretrained=True)
        predictor = predictor.to(self.device).eval()

        def read(images: list[Image.Image]) -> list[str]:
            document = predictor([np.asarray(image.convert("RGB")) for image in images])
            return [
                "".join(
                    word.value
                    for block in page.blocks
                    for line in block.lines
                    for word in line.words
                    if word.confidence > 0
                )
                for page in document.pages
            ]

        return read

    def _load_paddleocr(self) -> Callable[[list[Image.Image]], list[str]]:
        try:
            import paddleocr
        except ImportError as error:
            raise ImportError(
                'The `ocr` reward with backend="paddleocr" needs PaddleOCR: pip install "trl-nft[paddleocr]"'
            ) from error
        # On CPU as in Flow-GRPO: PaddlePaddle and PyTorch sharing a GPU in one process is fragile.
        if int(paddleocr.__version__.split(".")[0]) >= 3:
            engine = paddleocr.PaddleOCR(
                lang="en",
                use_doc_orientation_classify=False,
                use_doc_unwarping=False,
                use_textline_orientation=False,
                device="cpu",
            )

            def read_one(array: np.ndarray) -> list[tuple[str, float]]:
                result = engine.predict(array)[0]
                return list(zip(result["rec_texts"], result["rec_scores"], strict=True))
        else:  # PaddleOCR 2.x, the version Flow-GRPO's published results use (paddleocr==2.9.1)
            engine = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)

            def read_one(array: np.ndarray) -> list[tuple[str, float]]:
                lines = engine.ocr(array, cls=False)[0] or []
                return [tuple(line[1]) for line in lines]

        def read(images: list[Image.Image]) -> list[str]:
            # An RGB array, as Flow-GRPO passes it.
            return [
                "".join(text for text, confidence in read_one(np.asarray(image.convert("RGB"))) if confidence > 0)
                for image in images
            ]

        return read

    def score(self, read, images: list[Image.Image], prompts: list[str], **columns) -> list[float | None]:
        given = columns.get("ocr_text") or [None] * len(prompts)
        targets = [
            text if text and normalize_text(text) else quoted_text(prompt)
            for text, prompt in zip(given, prompts, strict=True)
        ]
        scored = [i for i, target in enumerate(targets) if target is not None]
        rewards: list[float | None] = [None] * len(images)
        for i, text in zip(scored, read([images[i] for i in scored]) if scored else [], strict=True):
            rewards[i] = ocr_reward(text, targets[i])
        return rewards

    def __repr__(self) -> str:
        if self.backend == "paddleocr":
            return f"OCRReward(backend='paddleocr', device={self.device})"
        weights = self.checkpoint or f"{self.det_arch} + {self.reco_arch}"
        return f"OCRReward(backend='doctr', weights={weights!r}, device={self.device})"
