"""Rewards of the `digits-sd3` benchmark (see `trl_nft.embedded.digits_sd3`): the prompted digit, read by a classifier.

- `digit_accuracy`: the probability of the prompted digit under the reward classifier (a small CNN); the training
  reward;
- `digit_classifier_top1`: 1.0 where the reward classifier's most likely digit is the prompted one, else 0.0 (its mean
  is the reward classifier's accuracy, the benchmark's headline number);
- `digit_judge`: 1.0 where a *different*, held-out model (a logistic regression on the 8 x 8 image) reads the prompted
  digit, else 0.0; for `eval_reward_funcs`, never trained on, so that a rise it confirms is not the classifier being
  gamed.

The prompted digit is the `digit` column when the dataset has one (the `digits` prompt set does), else the digit named
in the prompt ("a handwritten digit seven"); prompts that name none score `None`.
"""

import torch

from ..prompts.digits import prompt_digit
from . import register_reward, to_tensor
from .base import RewardModel, resolve_checkpoint
from .digit_models import DIGIT_WEIGHTS_PATH, load_classifier, load_judge, to_grayscale


def _digits(prompts: list[str], digit: list | None) -> list[int | None]:
    return (
        [int(d) if d is not None else None for d in digit] if digit is not None else list(map(prompt_digit, prompts))
    )


def _top_guess_is(probabilities: torch.Tensor, digit: int) -> float:
    return float(probabilities.argmax().item() == digit)


class _DigitReward(RewardModel):
    default_checkpoint = DIGIT_WEIGHTS_PATH

    def score(self, models, images, prompts, digit=None, **columns) -> list[float | None]:
        targets = _digits(prompts, digit)
        gray = to_grayscale(to_tensor(images)).to(self.device, self.dtype)
        probabilities = models(gray).float().softmax(dim=-1).cpu()
        return [None if t is None else self.value(probabilities[i], t) for i, t in enumerate(targets)]


@register_reward("digit_accuracy")
class DigitAccuracy(_DigitReward):
    """The reward classifier's probability of the prompted digit."""

    def load(self):
        path = resolve_checkpoint(self.checkpoint, "digit_accuracy")
        return load_classifier(path).to(self.device, self.dtype)

    @staticmethod
    def value(probabilities: torch.Tensor, digit: int) -> float:
        return probabilities[digit].item()


@register_reward("digit_classifier_top1")
class DigitClassifierTop1(DigitAccuracy):
    """1.0 where the reward classifier's most likely digit is the prompted one, else 0.0."""

    value = staticmethod(_top_guess_is)


@register_reward("digit_judge")
class DigitJudgeAccuracy(_DigitReward):
    """1.0 where the held-out judge reads the prompted digit, else 0.0 (its mean is the judge's accuracy)."""

    def load(self):
        path = resolve_checkpoint(self.checkpoint, "digit_judge")
        return load_judge(path).to(self.device, self.dtype)

    value = staticmethod(_top_guess_is)
