"""A vision-language model as judge, served behind any OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, OpenAI...).

`vlm_judge`'s defaults reproduce Flow-GRPO's UnifiedReward scorer (`unifiedreward_score_sglang` in
https://github.com/yifan123/flow_grpo/blob/main/flow_grpo/rewards.py): each image, resized to 512 x 512 (Pillow's
bicubic filter) and sent as a PNG, is graded by `CodeGoat24/UnifiedReward-7b-v1.5` against its caption from 1 to 5
after "Final Score:", at temperature 0, and the grade is divided by 5.

`edit_judge` grades an edit as Edit-R1 does (`reward_server/reward_server.py` in
https://github.com/PKU-YuanGroup/Edit-R1): the source image(s), then the edited image, then the question with the
instruction, in one message to `Qwen/Qwen2.5-VL-32B-Instruct`; the reward is the expected 0-5 score under the
judge's probabilities of the score tokens "0".."5" (renormalised over them), divided by 5.
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
from .base import RewardModel, source_images


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
# The edit judge's question (Edit-R1's own is not published): the images come first, the sources then the result.
EDIT_JUDGE_TEMPLATE = (
    "The images above are the source image of an edit (or its source images) and, last, the edited image. The edit "
    "was asked for with this instruction:\n{instruction}\nJudge the edited image: does it do what the instruction "
    "asks, does it keep unchanged what the instruction does not ask to change, and is it natural and free of "
    "artifacts? Give an integer score from 0 (the instruction is not followed, or the image is ruined) to 5 (followed "
    "exactly, everything else preserved, no artifacts). Answer with the score only, a single digit."
)
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
            raise ValueError(f"{self.name}: scale_max must be > 0, got {scale_max}.")
        if max_concurrency < 1:
            raise ValueError(f"{self.name}: max_concurrency must be >= 1, got {max_concurrency}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"{self.name}: image_size must be >= 1 or None (no resize), got {image_size}.")
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

    def checkpoints(self) -> list[str]:
        return []  # `model` is served by the endpoint: nothing is read here

    def load(self):
        """The OpenAI client of the endpoint (thread-safe, shared by the requests)."""
        try:
            from openai import OpenAI
        except ImportError as error:
            raise ImportError(
                f'The `{self.name}` reward needs the openai client: pip install "trl-nft[vlm]"'
            ) from error
        return OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries)

    def chat(self, client, images: list[Image.Image], text: str, **options):
        """The judge's response (an OpenAI `ChatCompletion`) to one user message holding `images`, then `text`;
        `options` go to the request as they are (e.g. `logprobs=True`)."""
        import openai

        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(self.prepare(image))}} for image in images
        ]
        content.append({"type": "text", "text": text})
        try:
            return client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": content}],
                temperature=self.temperature,
                **options,
            )
        except openai.APIError as error:
            raise RuntimeError(
                f"{self.name}: the request to {self.base_url} (model {self.model!r}) failed, retried up to "
                f"{self.max_retries} times: {error}"
            ) from error

    def prepare(self, image: Image.Image) -> Image.Image:
        """`image` as it is sent: resized to `image_size` square when that is set."""
        if self.image_size is None:
            return image
        # RGB first: Pillow resizes palette images with the nearest pixel whatever the filter asked.
        return image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)

    def ask(self, client, image: Image.Image, prompt: str) -> str:
        """The judge's answer about one image."""
        response = self.chat(client, [image], self.prompt_template.replace("{prompt}", prompt))
        return response.choices[0].message.content or ""

    def concurrently(self, function: Callable, *iterables) -> list:
        """`function` mapped over `iterables` with up to `max_concurrency` calls (requests) in flight, in order."""
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(iterables[0]))) as pool:
            return list(pool.map(function, *iterables))

    def read_score(self, answer: str) -> float:
        """The score in `answer` (not yet divided by `scale_max`)."""
        if self.parse_score is not None:
            score = self.parse_score(answer)
        else:
            match = self.score_pattern.search(answer)
            score = float(match.group(1)) if match else None
        if score is None or not math.isfinite(score):
            reader = "parse_score" if self.parse_score else f"score_pattern {self.score_pattern.pattern!r}"
            raise ValueError(f"{self.name}: cannot read a score from the judge's answer {answer!r} (with {reader}).")
        return float(score)

    def score(self, client, images: list[Image.Image], prompts: list[str], **columns) -> list[float]:
        answers = self.concurrently(lambda image, prompt: self.ask(client, image, prompt), images, prompts)
        return [self.read_score(answer) / self.scale_max for answer in answers]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"


@register_reward("edit_judge")
class EditJudge(VLMJudge):
    """The score a VLM judge gives an edit, divided by `scale_max`, as Edit-R1 scores it (module docstring).

    Each edited image is sent in its own request: one user message holding the sample's source image(s)
    (`condition_images`, in order), the edited image, and the question `prompt_template` with `{instruction}` replaced
    by the sample's prompt. The judge is asked for an integer score from 0 to `scale_max`. With `logprobs` (the
    default) the request asks for the top `top_logprobs` log-probabilities of each answer token, and the score is
    the expected one at the first answer token that is a score token ("0".."scale_max", surrounding spaces ignored):
    `sum_k k p_k / sum_k p_k` over the score tokens among that token's top log-probabilities, `p_k` summed over the
    spellings of `k` (Edit-R1 takes the softmax of the logits of "0".."5" at the first answer token). When the
    server returns no log-probabilities, or the answer has no score token, the score is read from the answer text as
    `vlm_judge` reads it (`parse_score`, else the first group of `score_pattern`: the first digit from 0 to
    `scale_max` standing alone), and an answer without one is an error quoting it.

    Args:
        model: the model name the server serves (default: Edit-R1's judge, `Qwen/Qwen2.5-VL-32B-Instruct`).
        prompt_template: the question; `{instruction}` is replaced by the prompt (other braces are left as they are).
        scale_max: the top of the scale, an integer from 1 to 9 (the score tokens are single digits).
        logprobs: ask for log-probabilities (turn it off for an endpoint that refuses them).
        top_logprobs: how many of each token's most likely alternatives the server returns (vLLM and OpenAI allow up
            to 20); the score tokens outside them count as probability 0.
        max_tokens: the most tokens the judge may answer with.
        image_size: None (the default) sends the images at their own size, as Edit-R1; an int resizes each source and
            edited image to that square size.
        The other arguments are `vlm_judge`'s (`base_url`, `api_key`, `score_pattern`, `parse_score`,
        `max_concurrency`, `timeout`, `max_retries`, `temperature`, `batch_size`).

    Needs `condition_images`: the trainer passes them in image-conditioned runs. Install with
    `pip install "trl-nft[vlm]"`.
    """

    def __init__(
        self,
        model: str = "Qwen/Qwen2.5-VL-32B-Instruct",
        prompt_template: str = EDIT_JUDGE_TEMPLATE,
        scale_max: int = 5,
        score_pattern: str | None = None,
        logprobs: bool = True,
        top_logprobs: int = 20,
        max_tokens: int = 8,
        image_size: int | None = None,
        **kwargs,
    ):
        if isinstance(scale_max, bool) or not isinstance(scale_max, int) or not 1 <= scale_max <= 9:
            raise ValueError(f"{self.name}: scale_max must be an integer from 1 to 9 (one digit), got {scale_max!r}.")
        if top_logprobs < 1 or max_tokens < 1:
            raise ValueError(f"{self.name}: top_logprobs and max_tokens must be >= 1.")
        pattern = score_pattern or rf"(?<![\d.])([0-{scale_max}])(?![\d.])"
        super().__init__(
            model=model,
            prompt_template=prompt_template,
            score_pattern=pattern,
            scale_max=scale_max,
            image_size=image_size,
            **kwargs,
        )
        self.score_tokens = {str(score): score for score in range(scale_max + 1)}
        self.request_options = {"max_tokens": max_tokens}
        if logprobs:
            self.request_options.update(logprobs=True, top_logprobs=top_logprobs)

    def judge(self, client, image: Image.Image, instruction: str, sources: list[Image.Image]) -> float:
        """The score (not yet divided by `scale_max`) of one edited image, given its source images."""
        text = self.prompt_template.replace("{instruction}", instruction)
        choice = self.chat(client, [*sources, image], text, **self.request_options).choices[0]
        expected = self.expected_score(choice.logprobs)
        return expected if expected is not None else self.read_score(choice.message.content or "")

    def expected_score(self, logprobs) -> float | None:
        """The expected score at the first answer token that is a score token, from its top log-probabilities; None
        without log-probabilities or without a score token."""
        for position in getattr(logprobs, "content", None) or []:
            if position.token.strip() not in self.score_tokens:
                continue
            candidates = {candidate.token: candidate.logprob for candidate in position.top_logprobs or []}
            candidates.setdefault(position.token, position.logprob)  # the answered token counts, listed or not
            probabilities = dict.fromkeys(self.score_tokens.values(), 0.0)
            for token, logprob in candidates.items():
                if token.strip() in self.score_tokens:
                    probabilities[self.score_tokens[token.strip()]] += math.exp(logprob)
            return sum(score * p for score, p in probabilities.items()) / sum(probabilities.values())
        return None

    def score(self, client, images: list[Image.Image], prompts: list[str], condition_images, **columns) -> list[float]:
        sources = source_images(condition_images, self.name)
        scores = self.concurrently(
            lambda image, prompt, row: self.judge(client, image, prompt, row), images, prompts, sources
        )
        return [score / self.scale_max for score in scores]
