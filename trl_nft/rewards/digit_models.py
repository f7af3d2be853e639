"""The models behind the digit rewards (`trl_nft.rewards.digits`): the reward classifier and the held-out judge,
trained by the `digits-sd3` builder (`python -m trl_nft.embedded.digits_sd3`) and shipped in `digit_weights/`.

Both read 16 x 16 grayscale images. This module imports nothing from the rest of the package, so the DDPO comparison
(`benchmarks/digits/ddpo/`) loads it as a standalone module in TRL 0.23's environment.
"""

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


DIGIT_WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "digit_weights")
CLASSIFIER_FILE = "reward_classifier.safetensors"
JUDGE_FILE = "judge.safetensors"
DIGITS_RESOLUTION = 16  # the side of the images both models read


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` (or `[B, 1, H, W]`) in [0, 1] -> `[B, 1, 16, 16]`, the input of the classifier and the judge."""
    gray = images.mean(dim=1, keepdim=True)
    if gray.shape[-1] != DIGITS_RESOLUTION:
        gray = F.interpolate(gray, size=DIGITS_RESOLUTION, mode="bilinear", antialias=True, align_corners=False)
    return gray


class DigitClassifier(nn.Module):
    """The reward classifier: a small CNN on 16 x 16 grayscale images in [0, 1]; returns logits over the 10 digits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def judge_features(gray: torch.Tensor) -> torch.Tensor:
    """The judge's input: the 16 x 16 image averaged down to 8 x 8, on the 0-16 scale of the original data."""
    return F.avg_pool2d(gray, 2).flatten(1) * 16


class DigitJudge(nn.Module):
    """The held-out judge: a multinomial logistic regression (fitted by scikit-learn) on `judge_features`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return judge_features(gray) @ self.weight.T + self.bias


def load_classifier(path: str = DIGIT_WEIGHTS_PATH) -> DigitClassifier:
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(os.path.join(path, CLASSIFIER_FILE)))
    return classifier.eval()


def load_judge(path: str = DIGIT_WEIGHTS_PATH) -> DigitJudge:
    return DigitJudge(**load_file(os.path.join(path, JUDGE_FILE))).eval()
