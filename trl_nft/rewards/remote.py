"""The `remote` reward: scores images with a reward served over HTTP by `trl-nft reward-server`
(`trl_nft.rewards.server`), so that a heavy reward model can run on another GPU, machine or environment."""

import base64
import io
import json
import logging
import os
import time
from typing import Any

from PIL import Image

from ..conditions import CONDITION_COLUMN
from . import register_reward
from .base import RewardModel


logger = logging.getLogger(__name__)

TOKEN_ENV_VAR = "TRL_NFT_REWARD_TOKEN"


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, or refused or failed a request."""


@register_reward("remote")
class RemoteReward(RewardModel):
    """A reward computed by a reward server (`trl-nft reward-server`), one HTTP request per `batch_size` images.

    Images travel as base64 PNG (lossless: the server scores exactly the pixels the trainer made) or WebP, and so do
    the samples' condition images (`condition_images`, in image-conditioned runs); prompts and the other dataset
    columns travel as JSON. The dataset's `image` column is left out when it holds images rather than paths: its images
    travel as `condition_images`. Connection errors, timeouts and 5xx responses are retried `max_retries` times,
    waiting `backoff * 2**k` seconds before the k-th retry; a 4xx response (a bad token, an unknown reward, a
    malformed request) fails at once with the server's message. When the retries run out, the call raises
    `RemoteRewardError` naming the URL and the last failure: a reward is never silently replaced by zeros.

    Its logged name is `remote_<reward>` (e.g. `rewards/remote_hpsv2/mean`), or `remote` when `reward` is not given.

    Args:
        url: the server's base URL, e.g. `"http://gpu-box:8000"` (required).
        reward: the name of the reward on the server; optional when the server serves a single reward.
        token: the server's token, sent as `Authorization: Bearer <token>`; defaults to `$TRL_NFT_REWARD_TOKEN`.
        timeout: seconds to wait for each request (the first one may include loading the model on the server).
        max_retries: how many times a request that failed for a transient reason is tried again.
        backoff: the wait before the first retry, in seconds; it doubles at each retry.
        image_format: `"png"` (lossless, the default) or `"webp"` (lossy, quality 95: about 4 times smaller on
            photographs, for slow links and rewards that do not depend on exact pixel values).
        batch_size: the most images sent in one request (each with its condition images).
        send_condition_images: send the condition images the reward is given; turn it off to save bandwidth when the
            served reward does not use them.
    """

    image_formats = {"png": {"format": "PNG"}, "webp": {"format": "WEBP", "quality": 95}}

    def __init__(
        self,
        url: str | None = None,
        reward: str | None = None,
        token: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        image_format: str = "png",
        batch_size: int = 32,
        send_condition_images: bool = True,
    ):
        if not url:
            raise ValueError('The remote reward needs the reward server\'s url, e.g. url="http://localhost:8000".')
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}.")
        if image_format not in self.image_formats:
            raise ValueError(f"remote reward: image_format must be 'png' or 'webp', got {image_format!r}.")
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("remote reward: max_retries and backoff must be >= 0, and timeout > 0.")
        self.name = f"remote_{reward}" if reward else "remote"  # read by `reward_name` for logging
        super().__init__(batch_size=batch_size)
        self.url = url.rstrip("/")
        self.reward = reward
        self.token = token if token is not None else os.environ.get(TOKEN_ENV_VAR) or None
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.image_format = image_format
        self.send_condition_images = send_condition_images

    def cache_key(self) -> tuple:
        return (type(self).__qualname__, self.url, self.token, self.timeout)

    def load(self):
        """An `httpx.Client` for the server (the "model" of this reward), with the token in its headers."""
        try:
            import httpx
        except ImportError as error:
            raise ImportError(
                'The remote reward needs httpx; install it with pip install "trl-nft[server]".'
            ) from error
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(timeout=self.timeout, headers=headers)

    def score(
        self, models: Any, images: list[Image.Image], prompts: list[str], condition_images=None, **columns
    ) -> list[float | None]:
        columns = {key: list(values) for key, values in columns.items()}
        if CONDITION_COLUMN in columns and not _is_json(columns[CONDITION_COLUMN]):
            del columns[CONDITION_COLUMN]  # PIL images (or bytes): they travel as `condition_images`
        payload = {"images": [self._encode(image) for image in images], "prompts": list(prompts), "columns": columns}
        if condition_images is not None and self.send_condition_images:
            payload["condition_images"] = [self._encode_sources(sources) for sources in condition_images]
        if self.reward is not None:
            payload["reward"] = self.reward
        try:
            body = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{self.name}: the dataset columns must be JSON-serialisable to reach the server: {error}"
            ) from error
        response = self._post(models, body)
        try:
            rewards = response.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            rewards = None
        if not isinstance(rewards, list) or len(rewards) != len(images):
            raise RemoteRewardError(
                f"{self.name}: {self.url}/score answered {response.text[:200]!r}; expected 'rewards' with one value per "
                f"image ({len(images)}). Is {self.url} a trl-nft reward server?"
            )
        return rewards

    def _encode(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, **self.image_formats[self.image_format])
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _encode_sources(self, sources) -> str | list[str] | None:
        """One sample's condition images as the protocol carries them: one image, a list of them, or null."""
        if sources is None:
            return None
        entries = sources if isinstance(sources, list | tuple) else [sources]
        if not all(isinstance(image, Image.Image) for image in entries):
            kinds = ", ".join(sorted({type(image).__name__ for image in entries}))
            raise TypeError(
                f"{self.name}: condition_images must be PIL images (a list of them per sample), got {kinds}."
            )
        encoded = [self._encode(image) for image in entries]
        return encoded if isinstance(sources, list | tuple) else encoded[0]

    def _post(self, client, body: str):
        """The server's successful response to `body`, after retrying transient failures."""
        import httpx

        url, attempts, failure = f"{self.url}/score", self.max_retries + 1, ""
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.warning(
                    "%s: %s failed (%s); retry %d of %d in %.1f s.",
                    self.name,
                    url,
                    failure,
                    attempt,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
            try:
                response = client.post(url, content=body, headers={"Content-Type": "application/json"})
            except httpx.TransportError as error:  # connection refused or reset, timeouts
                failure = f"{type(error).__name__}: {error} (is the reward server running and reachable?)"
                continue
            if response.is_success:
                return response
            failure = f"HTTP {response.status_code}: {_detail(response)}"
            if response.status_code == 401:
                raise RemoteRewardError(
                    f"{self.name}: {url} refused the token ({failure}). Check that the token (the `token` option or "
                    f"${TOKEN_ENV_VAR}) matches the server's --token."
                )
            if response.status_code < 500:
                raise RemoteRewardError(f"{self.name}: {url} rejected the request ({failure}).")
        raise RemoteRewardError(f"{self.name}: {url} failed after {attempts} attempts; last failure: {failure}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, reward={self.reward!r}, image_format={self.image_format!r})"


def _is_json(values) -> bool:
    try:
        json.dumps(values, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _detail(response) -> str:
    """The error message of a reward server's response (its `detail`), or the start of the body."""
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase
