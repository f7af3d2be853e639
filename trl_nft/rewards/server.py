"""An HTTP server that scores images with reward functions, for rewards that run on another GPU or in another
environment. The `remote` reward (`trl_nft.rewards.remote`) is its client; `trl-nft reward-server` starts it.

The protocol is JSON only (never pickle, so a request cannot run code on the server):

- `GET /health` -> `{"status": "ok", "rewards": [names]}`, without authentication (it reveals only the names);
- `POST /score` with `{"reward": name, "images": [base64 PNG or WebP], "prompts": [str], "columns": {name: [values]},
  "condition_images": [base64 | [base64] | null]}` -> `{"rewards": [float | null]}`. `reward` may be left out when the
  server serves a single reward; `columns` holds the other dataset columns, one value per image; `condition_images`
  (optional) holds each image's source image (a list of them for a multi-image row), encoded as the images are, and
  reaches the reward as the keyword `condition_images` (RGB PIL images).

With a token, `/score` needs the header `Authorization: Bearer <token>` (401 otherwise). A request over one of the
`RequestLimits` (condition images count as images) gets a 413 naming the limit, before the server holds it in memory
or decodes its images; a malformed request gets a 400 saying what is wrong; a reward that raises or returns a
non-finite value gets a 500 naming the reward. Calls to one reward are serialised (models are not thread-safe) and
split into batches of `max_batch_size` images, each decoded (with its condition images) just before the reward scores
it.
"""

import base64
import binascii
import contextlib
import dataclasses
import inspect
import io
import ipaddress
import logging
import math
import numbers
import secrets
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image

from .base import RESERVED_KEYWORDS, RewardModel, load_once


logger = logging.getLogger(__name__)

IMAGE_FORMATS = ["PNG", "WEBP"]  # what the protocol carries; other decoders are never reached
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one `/score` request may hold; a request over any limit is refused with 413 and a message naming it.

    The defaults fit the remote reward's requests (32 images by default, `batch_size` up to a few hundred) of
    1024x1024 to 2048x2048 images, and no more: see "Limits" in docs/rewards.md for the sizes they were set from.

    Args:
        max_body_mb: the most MiB in a request body, refused from its `Content-Length` before it is read, and while
            it streams in when it has none.
        max_images: the most images in a request, condition images included, refused before any of them is decoded.
        max_image_base64_mb: the most MiB of base64 text for one image.
        max_image_pixels: the most pixels (width x height) in one image, read from its header before its pixels are
            decoded: a small compressed file that decodes to a huge image (a decompression bomb) is refused.
    """

    max_body_mb: int = 1024
    max_images: int = 1024
    max_image_base64_mb: int = 96
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits: {field.name} must be an integer >= 1, got {value!r}.")


class RequestTooLarge(ValueError):
    """A request over one of the server's `RequestLimits` (answered with 413)."""


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


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface): it may be reachable from other machines
        return False


def check_exposure(host: str, token: str | None, allow_unauthenticated: bool = False) -> None:
    """A `ValueError` if the server would listen beyond this machine without a token and without the explicit
    opt-out: anyone who could reach the port could run the reward models (and use their GPU)."""
    if token or allow_unauthenticated or is_loopback(host):
        return
    raise ValueError(
        f"refusing to serve on {host!r} without a token: anyone who can reach it could use the rewards and their GPU. "
        "Set a token (--token or $TRL_NFT_REWARD_TOKEN; token= in Python), or, on a network you trust, pass "
        "--allow_unauthenticated (allow_unauthenticated=True)."
    )


class _Scorer:
    """What `/score` does once the body is read: validate, open, decode and run the reward."""

    def __init__(self, rewards: dict[str, Callable], max_batch_size: int, limits: RequestLimits):
        self.rewards = rewards
        self.max_batch_size = max_batch_size
        self.limits = limits
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
    def check_lengths(images: list, prompts: list, columns: dict[str, list], condition_images: list | None) -> None:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image.")
        if condition_images is not None and len(condition_images) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(condition_images)} condition_images: give one entry per image (an "
                "image, a list of images, or null)."
            )
        for key, values in columns.items():
            if key in RESERVED_KEYWORDS:
                raise ValueError(f"column {key!r} clashes with the reward's own argument; rename it.")
            if len(values) != len(images):
                raise ValueError(f"column {key!r} has {len(values)} values for {len(images)} images.")

    def check_columns(self, name: str, columns: dict[str, list], condition_images: list | None) -> None:
        """A `ValueError` if the reward cannot take these columns (one it requires is missing, or it takes no such
        argument): the client's mistake, found before the images are decoded, rather than a `TypeError` in the call."""
        try:
            signature = inspect.signature(self.rewards[name])
        except (TypeError, ValueError):  # a callable without a signature (a builtin): the call will tell
            return
        arguments = dict(columns) if condition_images is None else {**columns, "condition_images": condition_images}
        try:
            signature.bind([], [], **arguments)
        except TypeError as error:
            raise ValueError(f"the columns {sorted(arguments)} do not fit reward {name!r}: {error}.") from error

    def open(self, images: list[str], condition_images: list | None = None) -> tuple[list, list | None]:
        """The images and the condition images (each entry one image, a list of them, or None), opened but not
        decoded (PIL reads the header only), after checking every limit: a `RequestTooLarge` for a request over one,
        a `ValueError` for an image that is not base64 PNG or WebP."""
        limits = self.limits
        sources = sum(len(entry) if isinstance(entry, list) else entry is not None for entry in condition_images or [])
        if len(images) + sources > limits.max_images:
            count = f"{len(images) + sources} images" + (
                f" ({len(images)} + {sources} condition images)" if sources else ""
            )
            raise RequestTooLarge(
                f"{count}, over the server's max_images ({limits.max_images}): send fewer per request (the remote "
                "reward's batch_size)."
            )
        opened = [self.open_one(data, f"images[{i}]") for i, data in enumerate(images)]
        if condition_images is None:
            return opened, None
        return opened, [self.open_sources(entry, f"condition_images[{i}]") for i, entry in enumerate(condition_images)]

    def open_sources(self, entry: str | list[str] | None, label: str):
        if entry is None:
            return None
        if isinstance(entry, str):
            return self.open_one(entry, label)
        if not entry:
            raise ValueError(f"{label} is an empty list: give an image, a list of images, or null.")
        return [self.open_one(data, f"{label}[{j}]") for j, data in enumerate(entry)]

    def open_one(self, data: str, label: str) -> Image.Image:
        limits = self.limits
        if len(data) > limits.max_image_base64_mb * MIB:
            raise RequestTooLarge(
                f"{label} is {len(data):,} characters of base64, over the server's max_image_base64_mb "
                f"({limits.max_image_base64_mb} MiB)."
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{label} is not valid base64 ({error}).") from error
        too_many_pixels = f"over the server's max_image_pixels ({limits.max_image_pixels:,})"
        try:
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as error:  # PIL's own check, over twice Image.MAX_IMAGE_PIXELS
            raise RequestTooLarge(f"{label} is {too_many_pixels}: {error}") from error
        except Exception as error:
            # Any failure to parse these untrusted bytes (PIL raises OSError, SyntaxError, struct.error, ...) is
            # the client's bad image, not a server error.
            raise ValueError(f"{label} is not a readable PNG or WebP image ({error}).") from error
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise RequestTooLarge(f"{label} is {width}x{height} ({width * height:,} pixels), {too_many_pixels}.")
        return image

    @staticmethod
    def decode(image: Image.Image, label: str) -> Image.Image:
        """The pixels of an opened image, as RGB; a `ValueError` for data that turns out to be corrupt or truncated
        past the header."""
        try:
            with image:
                return image.convert("RGB")
        except Exception as error:  # untrusted bytes, as in `open_one`
            raise ValueError(f"{label} is not a readable PNG or WebP image ({error}).") from error

    def decode_sources(self, entry, label: str):
        if entry is None:
            return None
        if isinstance(entry, Image.Image):
            return self.decode(entry, label)
        return [self.decode(image, f"{label}[{j}]") for j, image in enumerate(entry)]

    def run(
        self,
        name: str,
        images: list[Image.Image],
        prompts: list[str],
        columns: dict[str, list],
        condition_images: list | None = None,
    ) -> list:
        """The reward's values, in batches of `max_batch_size`; a `RuntimeError` naming the reward if it raises or
        returns something other than one finite float (or None) per image."""
        reward, values = self.rewards[name], []
        # Decoding under the reward's lock keeps at most one batch of decoded pixels per reward in memory, however
        # many requests arrive at once.
        with self.locks[name]:
            for start in range(0, len(images), self.max_batch_size):
                batch = slice(start, start + self.max_batch_size)
                decoded = [self.decode(image, f"images[{i}]") for i, image in enumerate(images[batch], start)]
                arguments = {k: v[batch] for k, v in columns.items()}
                if condition_images is not None:
                    arguments["condition_images"] = [
                        self.decode_sources(entry, f"condition_images[{i}]")
                        for i, entry in enumerate(condition_images[batch], start)
                    ]
                try:
                    output = reward(decoded, prompts[batch], **arguments)
                except Exception as error:
                    logger.exception("Reward %r raised an error.", name)
                    raise RuntimeError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
                values += self._check_output(name, output, len(decoded), start)
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


def create_app(
    rewards: dict[str, Callable],
    token: str | None = None,
    max_batch_size: int = 32,
    limits: RequestLimits = RequestLimits(),
):
    """The FastAPI application serving `rewards` (name -> reward function) on `/health` and `/score`.

    Args:
        rewards: the reward functions to serve, by the name clients ask for.
        token: if set (not empty), `/score` requires the header `Authorization: Bearer <token>` (compared in constant time).
        max_batch_size: the most images passed to a reward in one call; larger requests are split.
        limits: the most a request may hold (`RequestLimits`); a request over a limit gets a 413.
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
        condition_images: list[str | list[str] | None] | None = None

    scorer = _Scorer(dict(rewards), max_batch_size, limits)
    max_body_bytes = limits.max_body_mb * MIB

    @contextlib.asynccontextmanager
    async def pil_pixel_limit(app):
        # PIL refuses images over twice its own limit (about 179 M pixels) when it opens them: while the server serves,
        # it opens what the server accepts, so that the server's limit is the one that applies; then PIL's again.
        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None and limits.max_image_pixels > previous:
            Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous

    app = fastapi.FastAPI(title="trl-nft reward server", lifespan=pil_pixel_limit)

    def check_token(authorization: str | None) -> None:
        if not token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise fastapi.HTTPException(
                401, "missing or wrong token: send 'Authorization: Bearer <token>'.", {"WWW-Authenticate": "Bearer"}
            )

    def body_too_large(size: str) -> Exception:
        return fastapi.HTTPException(
            413,
            f"the request body is {size}, over the server's max_body_mb ({limits.max_body_mb} MiB): send fewer "
            "images per request (the remote reward's batch_size).",
        )

    async def read_body(request: fastapi.Request) -> bytearray:
        """The body, or a 413 as soon as it is known to be too large: from `Content-Length` before anything is read,
        else by counting while it streams in (a chunked body has no `Content-Length`), so that no more than
        `max_body_mb` (and one chunk) of it is ever held. The HTTP server has already checked that a
        `Content-Length` is a number, and it never passes on more bytes than that number."""
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > max_body_bytes:
            raise body_too_large(f"{int(declared):,} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise body_too_large(f"more than {max_body_bytes:,} bytes")
        return body

    def score(body: bytearray) -> dict:
        try:
            request = ScoreRequest.model_validate_json(body)
            name = scorer.reward_for(request.reward)
            scorer.check_lengths(request.images, request.prompts, request.columns, request.condition_images)
            images, condition_images = scorer.open(request.images, request.condition_images)
            scorer.check_columns(name, request.columns, condition_images)
            return {"rewards": scorer.run(name, images, request.prompts, request.columns, condition_images)}
        except pydantic.ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, problem['loc'])) or 'body'}: {problem['msg']}" for problem in error.errors()
            )
            raise fastapi.HTTPException(400, f"malformed request: {problems}") from error
        except RequestTooLarge as error:
            raise fastapi.HTTPException(413, f"request too large: {error}") from error
        except ValueError as error:  # what `reward_for`, the checks, `open` and `decode` refuse
            raise fastapi.HTTPException(400, f"malformed request: {error}") from error
        except RuntimeError as error:  # the reward failed (`run`)
            raise fastapi.HTTPException(500, str(error)) from error

    @app.get("/health")
    def health() -> dict:
        """Liveness and the names of the rewards served; needs no token."""
        return {"status": "ok", "rewards": list(scorer.rewards)}

    # The body is read and parsed by hand (not by FastAPI) so that the token is checked before anything is read,
    # the size limit applies while it is read, and a malformed body is a 400 with a readable message rather than
    # FastAPI's 422.
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
        return await run_in_threadpool(score, await read_body(request))

    return app


def serve(
    rewards: dict[str, Callable],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    allow_unauthenticated: bool = False,
    max_batch_size: int = 32,
    limits: RequestLimits = RequestLimits(),
    log_level: str = "info",
) -> None:
    """Serve `rewards` over HTTP until interrupted (see `create_app`).

    Model-backed rewards load their weights before the server starts listening, so a successful `/health` means the
    server is ready. It binds to the loopback interface by default; on any other interface it needs a `token`, or
    `allow_unauthenticated=True` (a `ValueError` otherwise, raised before anything loads).
    """
    check_exposure(host, token, allow_unauthenticated)
    _, _, uvicorn = _import_server_libraries()
    app = create_app(rewards, token=token, max_batch_size=max_batch_size, limits=limits)
    for name, reward in rewards.items():
        if isinstance(reward, RewardModel):
            logger.info("Loading reward %r (%r).", name, reward)
            load_once(reward.cache_key(), reward.load)  # the first request then finds the weights loaded
    if not token and not is_loopback(host):
        logger.warning(
            "The reward server listens on %s without a token (--allow_unauthenticated): anyone who can reach it can "
            "use it. Keep it on a trusted network.",
            host,
        )
    logger.info("Serving rewards %s on http://%s:%d (%s).", ", ".join(rewards), host, port, limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
