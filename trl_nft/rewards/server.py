"""An HTTP server that scores images with reward functions, for rewards that run on another GPU or in another
environment. The `remote` reward (`trl_nft.rewards.remote`) is its client; `trl-nft reward-server` starts it.

The protocol is JSON only (never pickle, so a request cannot run code on the server):

- `GET /health` -> `{"status": "ok", "rewards": [names]}`, without authentication (it reveals only the names);
- `POST /score` with `{"reward": name, "images": [base64 PNG or WebP], "prompts": [str], "columns": {name: [values]}}`
  -> `{"rewards": [float | null]}`. `reward` may be left out when the server serves a single reward; `columns` holds
  the other dataset columns, one value per image.

With a token, `/score` needs the header `Authorization: Bearer <token>` (401 otherwise). A malformed request gets a
400 saying what is wrong; a reward that raises or returns a non-finite value gets a 500 naming the reward. Calls to
one reward are serialised (models are not thread-safe) and split into batches of `max_batch_size` images.
"""

import base64
import binascii
import io
import logging
import math
import numbers
import secrets
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image

from .base import RewardModel, load_once


logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
IMAGE_FORMATS = ["PNG", "WEBP"]  # what the protocol carries; other decoders are never reached


def _import_server_libraries():
    try:
        import fastapi
        import pydantic
        import uvicorn
    except ImportError as error:
        raise ImportError(
            f'The reward server needs fastapi and uvicorn ({error}); install them with pip install "trl-nft[server]".'
        ) from error
    return fastapi, pydantic, uvicorn


class _Scorer:
    """What `/score` does once the request is authenticated: validate, decode, and run the reward."""

    def __init__(self, rewards: dict[str, Callable], max_batch_size: int):
        self.rewards = rewards
        self.max_batch_size = max_batch_size
        self.locks = {name: threading.Lock() for name in rewards}

    def reward_for(self, name: str | None) -> str:
        """The name of the reward a request asks for, or a `ValueError` saying why there is none."""
        if name is None:
            if len(self.rewards) == 1:
                return next(iter(self.rewards))
            raise ValueError(f"'reward' is required when the server serves several rewards: one of {self._names()}.")
        if name not in self.rewards:
            raise ValueError(f"unknown reward {name!r}: this server serves {self._names()}.")
        return name

    def _names(self) -> str:
        return ", ".join(map(repr, self.rewards))

    @staticmethod
    def check_lengths(images: list, prompts: list, columns: dict[str, list]) -> None:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image.")
        for key, values in columns.items():
            if key in ("images", "prompts"):
                raise ValueError(f"column {key!r} clashes with the reward's own argument; rename it.")
            if len(values) != len(images):
                raise ValueError(f"column {key!r} has {len(values)} values for {len(images)} images.")

    @staticmethod
    def decode(images: list[str]) -> list[Image.Image]:
        decoded = []
        for i, data in enumerate(images):
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"images[{i}] is not valid base64 ({error}).") from error
            try:
                with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
                    decoded.append(image.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise ValueError(f"images[{i}] is not a readable PNG or WebP image ({error}).") from error
        return decoded

    def run(self, name: str, images: list[Image.Image], prompts: list[str], columns: dict[str, list]) -> list:
        """The reward's values, in batches of `max_batch_size`; a `RuntimeError` naming the reward if it raises or
        returns something other than one finite float (or None) per image."""
        reward, values = self.rewards[name], []
        with self.locks[name]:
            for start in range(0, len(images), self.max_batch_size):
                batch = slice(start, start + self.max_batch_size)
                try:
                    output = reward(
                        images=images[batch], prompts=prompts[batch], **{k: v[batch] for k, v in columns.items()}
                    )
                except Exception as error:
                    logger.exception("Reward %r raised an error.", name)
                    raise RuntimeError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
                values += self._check_output(name, output, len(images[batch]), start)
        return values

    @staticmethod
    def _check_output(name: str, output: Any, size: int, start: int) -> list[float | None]:
        if hasattr(output, "tolist"):  # a tensor or an array
            output = output.tolist()
        if not isinstance(output, list | tuple) or len(output) != size:
            got = f"{len(output)} values" if isinstance(output, list | tuple) else f"a {type(output).__name__}"
            raise RuntimeError(f"reward {name!r} returned {got} for {size} images; it must return one per image.")
        for i, value in enumerate(output):
            if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise RuntimeError(
                    f"reward {name!r} returned {value!r} for images[{start + i}]; rewards must be finite."
                )
        return [None if value is None else float(value) for value in output]


def create_app(rewards: dict[str, Callable], token: str | None = None, max_batch_size: int = 32):
    """The FastAPI application serving `rewards` (name -> reward function) on `/health` and `/score`.

    Args:
        rewards: the reward functions to serve, by the name clients ask for.
        token: if set (not empty), `/score` requires the header `Authorization: Bearer <token>` (compared in constant time).
        max_batch_size: the most images passed to a reward in one call; larger requests are split.
    """
    fastapi, pydantic, _ = _import_server_libraries()
    from starlette.concurrency import run_in_threadpool

    if not rewards:
        raise ValueError("create_app needs at least one reward to serve.")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")

    class ScoreRequest(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        reward: str | None = None
        images: list[str]
        prompts: list[str]
        columns: dict[str, list[Any]] = {}

    scorer = _Scorer(dict(rewards), max_batch_size)
    app = fastapi.FastAPI(title="trl-nft reward server")

    def check_token(authorization: str | None) -> None:
        if not token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise fastapi.HTTPException(
                401, "missing or wrong token: send 'Authorization: Bearer <token>'.", {"WWW-Authenticate": "Bearer"}
            )

    def score(body: bytes) -> dict:
        try:
            request = ScoreRequest.model_validate_json(body)
            name = scorer.reward_for(request.reward)
            scorer.check_lengths(request.images, request.prompts, request.columns)
            images = scorer.decode(request.images)
        except pydantic.ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, problem['loc'])) or 'body'}: {problem['msg']}" for problem in error.errors()
            )
            raise fastapi.HTTPException(400, f"malformed request: {problems}") from error
        except ValueError as error:
            raise fastapi.HTTPException(400, f"malformed request: {error}") from error
        try:
            return {"rewards": scorer.run(name, images, request.prompts, request.columns)}
        except RuntimeError as error:
            raise fastapi.HTTPException(500, str(error)) from error

    @app.get("/health")
    def health() -> dict:
        """Liveness and the names of the rewards served; needs no token."""
        return {"status": "ok", "rewards": list(scorer.rewards)}

    # The body is parsed by hand (not by FastAPI) so that the token is checked before anything is parsed, and a
    # malformed body is a 400 with a readable message rather than FastAPI's 422.
    @app.post(
        "/score",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}},
            }
        },
    )
    async def score_endpoint(request: fastapi.Request) -> dict:
        """The rewards of a batch of images, one float (or null where the reward does not apply) per image."""
        check_token(request.headers.get("authorization"))
        return await run_in_threadpool(score, await request.body())

    return app


def serve(
    rewards: dict[str, Callable],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_batch_size: int = 32,
    log_level: str = "info",
) -> None:
    """Serve `rewards` over HTTP until interrupted (see `create_app`).

    Model-backed rewards load their weights before the server starts listening, so a successful `/health` means the
    server is ready. It binds to the loopback interface by default; on any other interface, set a `token`.
    """
    _, _, uvicorn = _import_server_libraries()
    app = create_app(rewards, token=token, max_batch_size=max_batch_size)
    for name, reward in rewards.items():
        if isinstance(reward, RewardModel):
            logger.info("Loading reward %r (%r).", name, reward)
            load_once(reward.cache_key(), reward.load)  # the first request then finds the weights loaded
    if host not in LOOPBACK_HOSTS and token is None:
        logger.warning(
            "The reward server listens on %s without a token: anyone who can reach it can use it. Set a token "
            "(--token or TRL_NFT_REWARD_TOKEN) and keep it on a trusted network.",
            host,
        )
    logger.info("Serving rewards %s on http://%s:%d.", ", ".join(rewards), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
