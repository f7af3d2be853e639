"""A vision-language model as judge, served behind any OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, OpenAI...).

The defaults reproduce Flow-GRPO's UnifiedReward scorer (`unifiedreward_score_sglang` in
https://github.com/yifan123/flow_grpo/blob/main/flow_grpo/rewards.py): each image, resized to 512 x 512 (Pillow's
bicubic filter) and sent as a PNG, is graded by `CodeGoat24/UnifiedReward-7b-v1.5` against its caption from 1 to 5
after "Final Score:", at temperature 0, and the grade is divided by 5.
"""

import base64
import io
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from . import register_reward
from .base import RewardModel


# Flow-GRPO's UnifiedReward question, word for word (the leading "<image>" included).
UNIFIED_REWARD_TEMPLATE = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the "
    "provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in "
    "the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from 1 "
    "to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
UNIFIED_REWARD_SCORE_PATTERN = r"Final Score:\s*([1-5](?:\.\d+)?)"
API_KEY_ENV = "VLM_JUDGE_API_KEY"


def image_data_url(image: Image.Image) -> str:
    """`image` as a PNG data URL (`data:image/png;base64,...`), the way images are put in OpenAI chat messages.
    Flow-GRPO sends PNGs too, under the header `data:image;base64` (no subtype), which servers decode alike."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@register_reward("vlm_judge")
class VLMJudge(RewardModel):
    """The score a VLM judge gives each image, divided by `scale_max`.

    Each image is sent in its own request: one user message holding the image (a PNG data URL) and the question
    `prompt_template` with `{prompt}` replaced by the image's prompt. The score is read from the answer with
    `parse_score`, or else as the first group of the regex `score_pattern`; an answer it cannot be read from is an
    error quoting the answer (never a silent 0, as in Flow-GRPO). Up to `max_concurrency` requests run at once
    (Flow-GRPO sends a whole batch at once).

    Args:
        model: the model name the server serves.
        base_url: the endpoint's base URL, up to `/v1` (default: a local `vllm serve`).
        api_key: default: the `VLM_JUDGE_API_KEY` environment variable, else `"EMPTY"` (local servers ignore it).
        prompt_template: the question; `{prompt}` is replaced by the prompt (other braces are left as they are).
        score_pattern: a regex whose first group is the score.
        parse_score: a function answer -> score, used instead of `score_pattern`.
        scale_max: the top of the judge's scale; rewards are `score / scale_max`.
        max_concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries of a request that fails to connect, times out or gets a 408/409/429/5xx answer (the
            OpenAI client's rules, with exponential backoff).
        temperature: sampling temperature of the judge.
        image_size: images are resized to `image_size x image_size` (bicubic, after conversion to RGB) before sending,
            as Flow-GRPO's `Image.fromarray(image).resize((512, 512))` does with Pillow's default filter for RGB
            images; None sends them at their own size.
        batch_size: images per call of `score`.

    Install with `pip install "trl-nft[vlm]"` (the `openai` client).
    """

    def __init__(
        self,
        model: str = "CodeGoat24/UnifiedReward-7b-v1.5",
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        prompt_template: str = UNIFIED_REWARD_TEMPLATE,
        score_pattern: str = UNIFIED_REWARD_SCORE_PATTERN,
        parse_score: Callable[[str], float] | None = None,
        scale_max: float = 5.0,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 2,
        temperature: float = 0.0,
        image_size: int | None = 512,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if scale_max <= 0:
            raise ValueError(f"vlm_judge: scale_max must be > 0, got {scale_max}.")
        if max_concurrency < 1:
            raise ValueError(f"vlm_judge: max_concurrency must be >= 1, got {max_concurrency}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"vlm_judge: image_size must be >= 1 or None (no resize), got {image_size}.")
        super().__init__(checkpoint=model, batch_size=batch_size, device=device, dtype=dtype)
        self.model = model
        self.base_url = base_url
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or "EMPTY"
        self.prompt_template = prompt_template
        self.score_pattern = re.compile(score_pattern)
        self.parse_score = parse_score
        self.scale_max = scale_max
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.image_size = image_size

    def cache_key(self) -> tuple:
        return (type(self).__qualname__, self.base_url, self.api_key, self.timeout, self.max_retries)

    def load(self):
        """The OpenAI client of the endpoint (thread-safe, shared by the requests)."""
        try:
            from openai import OpenAI
        except ImportError as error:
            raise ImportError('The `vlm_judge` reward needs the openai client: pip install "trl-nft[vlm]"') from error
        return OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries)

    def ask(self, client, image: Image.Image, prompt: str) -> str:
        """The judge's answer about one image."""
        import openai

        if self.image_size is not None:
            # RGB first: Pillow resizes palette images with the nearest pixel whatever the filter asked.
            image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": self.prompt_template.replace("{prompt}", prompt)},
        ]
        try:
            response = client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], temperature=self.temperature
            )
        except openai.APIError as error:
            raise RuntimeError(
                f"vlm_judge: the request to {self.base_url} (model {self.model!r}) failed, retried up to "
                f"{self.max_retries} times: {error}"
            ) from error
        return response.choices[0].message.content or ""

    def read_score(self, answer: str) -> float:
        """The score in `answer` (not yet divided by `scale_max`)."""
        if self.parse_score is not None:
            score = self.parse_score(answer)
        else:
            match = self.score_pattern.search(answer)
            score = float(match.group(1)) if match else None
        if score is None or not math.isfinite(score):
            reader = "parse_score" if self.parse_score else f"score_pattern {self.score_pattern.pattern!r}"
            raise ValueError(f"vlm_judge: cannot read a score from the judge's answer {answer!r} (with {reader}).")
        return float(score)

    def score(self, client, images: list[Image.Image], prompts: list[str], **columns) -> list[float]:
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(images))) as pool:
            answers = list(pool.map(lambda image, prompt: self.ask(client, image, prompt), images, prompts))
        return [self.read_score(answer) / self.scale_max for answer in answers]

    def __repr__(self) -> str:
        return f"VLMJudge(model={self.model!r}, base_url={self.base_url!r})"
