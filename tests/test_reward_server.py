"""The reward server and the `remote` reward, over real loopback sockets."""

import base64
import contextlib
import io
import logging
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from trl_nft import DiffusionNFTTrainer, get_reward
from trl_nft.cli import build_parser, main
from trl_nft.rewards import reward_name
from trl_nft.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from trl_nft.rewards.remote import RemoteRewardError
from trl_nft.rewards.server import RequestLimits, create_app, serve


TOKEN = "s3cret-token"
MAX_BATCH_SIZE = 2


def red_plus_offset(images, prompts, offset, **kwargs):
    """Mean red channel in [0, 1] plus the `offset` column."""
    return [float(np.asarray(image)[..., 0].mean()) / 255 + o for image, o in zip(images, offset, strict=True)]


def nan_reward(images, prompts, **kwargs):
    return [float("nan")] * len(images)


def failing_reward(images, prompts, **kwargs):
    raise RuntimeError("CUDA out of memory")


@contextlib.contextmanager
def running(app, port: int = 0):
    """`app` served by uvicorn in a background thread, on loopback `port` (default: a free one); yields its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # to take over the port of a server just killed
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cli_server(port: int, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`trl-nft reward-server OPTIONS` in a subprocess on 127.0.0.1:`port`, with the token TOKEN (from the
    environment) and the variables `env`, once its /health answers. Its output goes to a temporary file (a pipe
    nobody reads would fill up with the access log and block the server), shown if it exits."""
    env = {**os.environ, "TRL_NFT_REWARD_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "trl_nft.cli", "reward-server", "--port", str(port), "--device", "cpu", *options]
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the reward server exited with {process.returncode}:\n{log.read()}")
        assert time.monotonic() < deadline, "the reward server did not answer /health within 120 s"
        with contextlib.suppress(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)


def noise_images(count: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def png_base64(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


batch_sizes_seen: list[int] = []


def recording_jpeg_incompressibility(images, prompts, **kwargs):
    batch_sizes_seen.append(len(images))
    return jpeg_incompressibility(images, prompts)


@pytest.fixture(scope="module")
def url():
    app = create_app(
        {
            "jpeg_incompressibility": recording_jpeg_incompressibility,
            "red_plus_offset": red_plus_offset,
            "nan_reward": nan_reward,
            "failing_reward": failing_reward,
        },
        token=TOKEN,
        max_batch_size=MAX_BATCH_SIZE,
    )
    with running(app) as base_url:
        yield base_url


def remote(url, **options):
    return get_reward("remote", url=url, token=TOKEN, **{"backoff": 0.01, **options})


def test_health_needs_no_token_and_lists_the_rewards(url):
    response = httpx.get(f"{url}/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "rewards": ["jpeg_incompressibility", "red_plus_offset", "nan_reward", "failing_reward"],
    }


def test_remote_scores_equal_in_process_scores_exactly(url):
    images = noise_images(5)
    prompts = [f"prompt {i}" for i in range(5)]
    reward = remote(url, reward="jpeg_incompressibility", batch_size=3)
    assert reward_name(reward) == "remote_jpeg_incompressibility"
    batch_sizes_seen.clear()
    assert reward(images, prompts) == jpeg_incompressibility(images, prompts)
    # Two requests (3 + 2 images), each split by the server into calls of at most MAX_BATCH_SIZE images.
    assert batch_sizes_seen == [2, 1, 2]


def test_columns_reach_the_server_side_reward(url):
    images = [Image.new("RGB", (8, 8), (red, 0, 0)) for red in (0, 51, 255)]
    offsets = [10.0, -1.0, 0.5]
    reward = remote(url, reward="red_plus_offset")
    assert reward(images, ["a", "b", "c"], offset=offsets) == [10.0, 51 / 255 - 1.0, 1.5]


def test_webp_images_are_accepted_and_nearly_lossless_at_quality_95(url):
    images = [Image.new("RGB", (16, 16), (red, 40, 200)) for red in (30, 220)]
    reward = remote(url, reward="red_plus_offset", image_format="webp")
    values = reward(images, ["a", "b"], offset=[0.0, 0.0])
    assert values == pytest.approx([30 / 255, 220 / 255], abs=3 / 255)


def test_wrong_or_missing_token_is_refused_with_401(url):
    payload = {"reward": "nan_reward", "images": [], "prompts": []}
    assert httpx.post(f"{url}/score", json=payload).status_code == 401
    wrong = httpx.post(f"{url}/score", json=payload, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.post(f"{url}/score", content=b"{bad json", headers={"Authorization": "nope"}).status_code == 401
    # A 4xx is not retried: with a 30 s backoff, a retry would show in the time taken.
    reward = get_reward("remote", url=url, reward="red_plus_offset", token="nope", backoff=30.0)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match="Check that the token"):
        reward(noise_images(1), ["a"], offset=[0.0])
    assert time.perf_counter() - start < 10


def test_token_defaults_to_the_environment_variable(url, monkeypatch):
    monkeypatch.setenv("TRL_NFT_REWARD_TOKEN", TOKEN)
    reward = get_reward("remote", url=url, reward="red_plus_offset")
    assert reward([Image.new("RGB", (4, 4), (255, 0, 0))], ["a"], offset=[1.0]) == [2.0]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "Invalid JSON"),
        (b'{"reward": "red_plus_offset", "prompts": ["a"]}', "images: Field required"),
        (b'{"reward": "red_plus_offset", "images": "abc", "prompts": ["a"]}', "images: Input should be a valid"),
        (b'{"reward": "red_plus_offset", "images": ["@@@"], "prompts": ["a"]}', "images[0] is not valid base64"),
        (
            b'{"reward": "red_plus_offset", "images": ["aGVsbG8="], "prompts": ["a"]}',
            "images[0] is not a readable PNG or WebP image",
        ),
        (
            b'{"reward": "red_plus_offset", "images": ["%s"], "prompts": ["a"]}'
            % png_base64(Image.new("RGB", (4, 4)), "JPEG").encode(),
            "images[0] is not a readable PNG or WebP image",
        ),
        (
            b'{"reward": "red_plus_offset", "images": ["%s"], "prompts": []}'
            % png_base64(Image.new("RGB", (4, 4))).encode(),
            "1 images but 0 prompts",
        ),
        (
            b'{"reward": "red_plus_offset", "images": [], "prompts": [], "columns": {"offset": [1.0]}}',
            "column 'offset' has 1 values for 0 images",
        ),
        (
            b'{"reward": "red_plus_offset", "images": [], "prompts": []}',
            "the columns [] do not fit reward 'red_plus_offset': missing a required argument: 'offset'",
        ),
        (b'{"reward": "hpsv9", "images": [], "prompts": []}', "unknown reward 'hpsv9'"),
        (b'{"images": [], "prompts": []}', "'reward' is required when the server serves several rewards"),
        (
            b'{"reward": "nan_reward", "images": [], "prompts": [], "extra": 1}',
            "extra: Extra inputs are not permitted",
        ),
    ],
    ids=[
        "bad-json",
        "missing-images",
        "images-not-a-list",
        "bad-base64",
        "not-an-image",
        "jpeg",
        "length-mismatch",
        "column-length",
        "missing-column",
        "unknown-reward",
        "ambiguous-reward",
        "extra-field",
    ],
)
def test_malformed_payloads_are_400_and_the_server_keeps_serving(url, body, message):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    response = httpx.post(f"{url}/score", content=body, headers=headers)
    assert response.status_code == 400
    assert message in response.json()["detail"]
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    valid = {"reward": "red_plus_offset", "images": [png_base64(image)], "prompts": ["a"], "columns": {"offset": [0]}}
    assert httpx.post(f"{url}/score", json=valid, headers=headers).json() == {"rewards": [1.0]}


@pytest.mark.parametrize(
    "name, message",
    [
        ("nan_reward", "reward 'nan_reward' returned nan for images[0]"),
        ("failing_reward", "reward 'failing_reward' raised RuntimeError: CUDA out of memory"),
    ],
)
def test_a_failing_reward_is_a_500_and_a_clear_client_error_not_a_zero(url, name, message):
    response = httpx.post(
        f"{url}/score",
        json={"reward": name, "images": [png_base64(Image.new("RGB", (4, 4)))], "prompts": ["a"]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 500 and message in response.json()["detail"]
    reward = remote(url, reward=name, max_retries=1)
    with pytest.raises(
        RemoteRewardError, match="failed after 2 attempts; last failure: HTTP 500: " + re.escape(message)
    ):
        reward(noise_images(2), ["a", "b"])


def test_the_reward_name_is_optional_when_the_server_serves_one():
    with running(create_app({"jpeg_compressibility": jpeg_compressibility})) as base_url:
        images = noise_images(2, seed=1)
        reward = get_reward("remote", url=base_url)
        assert reward_name(reward) == "remote"
        assert reward(images, ["a", "b"]) == jpeg_compressibility(images, ["a", "b"])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="needs the reward server's url"):
        get_reward("remote")
    with pytest.raises(ValueError, match="image_format must be 'png' or 'webp'"):
        get_reward("remote", url="http://localhost:1", image_format="jpeg")


def test_a_server_that_is_down_makes_the_trainer_fail_clearly(make_config, prompts_dataset):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reward = get_reward("remote", url=url, reward="jpeg_incompressibility", max_retries=2, backoff=0.01, timeout=2)
    # The remote reward's own error says what failed; the trainer's note names the reward.
    with pytest.raises(
        RemoteRewardError, match=rf"{url}/score failed after 3 attempts; last failure: ConnectError"
    ) as failure:
        DiffusionNFTTrainer("tiny-sd3", reward, args=make_config(max_steps=1), train_dataset=prompts_dataset)
    assert "Reward function 'remote_jpeg_incompressibility' failed" in failure.value.__notes__[0]


def test_one_training_step_with_a_remote_reward(url, make_config, prompts_dataset):
    reward = remote(url, reward="jpeg_incompressibility")
    config = make_config(max_steps=1, num_inference_steps=2)
    trainer = DiffusionNFTTrainer("tiny-sd3", reward, args=config, train_dataset=prompts_dataset)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert math.isfinite(log["loss"]) and log["rewards/remote_jpeg_incompressibility/mean"] > 0
    images, prompts, rewards = trainer.last_rollout_samples
    assert len(images) == 4
    expected = torch.tensor(jpeg_incompressibility(images, prompts)).tolist()  # float32, as the trainer stores them
    assert rewards == expected


def test_the_cli_serves_registered_and_imported_rewards(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            from trl_nft import register_reward
            from trl_nft.rewards import RewardModel


            @register_reward("scaled_red")
            class ScaledRed(RewardModel):
                def __init__(self, scale=1.0, **kwargs):
                    super().__init__(**kwargs)
                    self.scale = scale

                def load(self):
                    return "loaded"

                def score(self, models, images, prompts, **columns):
                    return [self.scale * float(np.asarray(image)[..., 0].mean()) / 255 for image in images]
            """
        )
    )
    port = free_port()
    options = ["--import", "my_rewards", "--reward", "scaled_red", "--reward_kwargs", 'scaled_red={"scale": 2.0}']
    options += ["--reward", "jpeg_compressibility", "--max_images", "3"]
    process = start_cli_server(port, *options, env={"PYTHONPATH": str(tmp_path)})
    url = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(f"{url}/health")
        assert health.json() == {"status": "ok", "rewards": ["scaled_red", "jpeg_compressibility"]}
        images = [Image.new("RGB", (8, 8), (red, 0, 0)) for red in (0, 102, 255)]
        assert remote(url, reward="scaled_red")(images, ["a", "b", "c"]) == [0.0, 2.0 * (102 / 255), 2.0]
        noise = noise_images(2)
        assert remote(url, reward="jpeg_compressibility")(noise, ["a", "b"]) == jpeg_compressibility(noise, ["a", "b"])
        with pytest.raises(RemoteRewardError, match="Check that the token"):
            get_reward("remote", url=url, reward="scaled_red", token="wrong")(images, ["a", "b", "c"])
        with pytest.raises(
            RemoteRewardError,
            match=re.escape("HTTP 413: request too large: 4 images, over the server's max_images (3)"),
        ):
            remote(url, reward="scaled_red")(noise_images(4), ["a"] * 4)
    finally:
        stop(process)


# ---------------------------------------------------------------------------------------------- request limits

LIMITS = RequestLimits(max_body_mb=2, max_images=4, max_image_base64_mb=1, max_image_pixels=64 * 64)


@pytest.fixture(scope="module")
def limited_url():
    with running(create_app({"jpeg_compressibility": jpeg_compressibility}, limits=LIMITS)) as base_url:
        yield base_url


def post_score(url, images, **options):
    return httpx.post(f"{url}/score", json={"images": images, "prompts": ["a"] * len(images)}, **options)


def assert_still_serving(url):
    image = noise_images(1, size=8)[0]
    assert post_score(url, [png_base64(image)]).json() == {"rewards": jpeg_compressibility([image], ["a"])}


def test_the_default_limits_fit_batches_of_a_few_hundred_large_images():
    assert RequestLimits() == RequestLimits(
        max_body_mb=1024, max_images=1024, max_image_base64_mb=96, max_image_pixels=4096 * 4096
    )
    defaults = build_parser().parse_args(["reward-server", "--reward", "jpeg_compressibility"])
    assert (defaults.max_body_mb, defaults.max_images) == (1024, 1024)
    assert (defaults.max_image_base64_mb, defaults.max_image_pixels) == (96, 4096 * 4096)


@pytest.mark.parametrize("field", ["max_body_mb", "max_images", "max_image_base64_mb", "max_image_pixels"])
def test_limits_below_one_are_refused(field, capsys):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got 0"):
        RequestLimits(**{field: 0})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reward-server", "--reward", "jpeg_compressibility", f"--{field}", "0"])
    assert "must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_body_mb_is_413(limited_url, chunked):
    body = b" " * (2 * 1024 * 1024 + 1)
    # A chunked body has no Content-Length: the server counts the bytes as they arrive.
    content = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
    response = httpx.post(f"{limited_url}/score", content=content)
    assert response.status_code == 413
    assert "over the server's max_body_mb (2 MiB)" in response.json()["detail"]
    assert_still_serving(limited_url)


def test_too_many_images_is_413_before_any_image_is_decoded(limited_url):
    response = post_score(limited_url, ["not an image"] * 5)  # refused for the count, not for the bad base64
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "request too large: 5 images, over the server's max_images (4): send fewer per request (the remote "
        "reward's batch_size)."
    )
    assert_still_serving(limited_url)


def test_an_image_over_max_image_base64_mb_is_413(limited_url):
    response = post_score(limited_url, ["A" * (1024 * 1024 + 4)])
    assert response.status_code == 413
    assert (
        "images[0] is 1,048,580 characters of base64, over the server's max_image_base64_mb (1 MiB)"
        in (response.json()["detail"])
    )


@pytest.mark.parametrize("format", ["PNG", "WEBP"])
def test_an_image_over_max_image_pixels_is_413_from_its_header(limited_url, format):
    at_the_limit, over_it = Image.new("L", (64, 64)), Image.new("L", (65, 64))
    assert post_score(limited_url, [png_base64(at_the_limit, format)]).status_code == 200
    response = post_score(limited_url, [png_base64(at_the_limit, format), png_base64(over_it, format)])
    assert response.status_code == 413
    assert "images[1] is 65x64 (4,160 pixels), over the server's max_image_pixels (4,096)" in response.json()["detail"]


def test_a_request_over_a_limit_fails_the_remote_reward_at_once_with_the_servers_message(limited_url):
    reward = get_reward("remote", url=limited_url, batch_size=5, backoff=30.0)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=re.escape("rejected the request (HTTP 413: request too large: 5")):
        reward(noise_images(5, size=8), ["a"] * 5)
    assert time.perf_counter() - start < 10  # not retried: a retry would wait 30 s


def test_images_are_decoded_one_batch_at_a_time():
    """Each batch of `max_batch_size` images is decoded just before the reward scores it, so that a request of many
    small files that decode to large images holds one batch of pixels at a time: here the reward has scored the first
    two batches when the last image turns out to be corrupt past its header, and the request is still a 400."""
    batch_sizes = []

    def counting_reward(images, prompts, **kwargs):
        batch_sizes.append(len(images))
        return [0.0] * len(images)

    buffer = io.BytesIO()
    noise_images(1, size=64)[0].save(buffer, format="PNG")
    truncated = base64.b64encode(buffer.getvalue()[: buffer.tell() // 2]).decode()  # its header opens; no pixels
    with running(create_app({"counting": counting_reward}, max_batch_size=2)) as base_url:
        response = post_score(base_url, [png_base64(image) for image in noise_images(4)] + [truncated])
    assert response.status_code == 400
    assert "images[4] is not a readable PNG or WebP image (image file is truncated" in response.json()["detail"]
    assert batch_sizes == [2, 2]


# ------------------------------------------------------------------------------------------------- exposure


@pytest.fixture
def uvicorn_runs(monkeypatch):
    """What `serve` passes to `uvicorn.run`, which is replaced so that nothing listens."""
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    return calls


def test_the_server_listens_on_loopback_by_default(uvicorn_runs):
    assert build_parser().parse_args(["reward-server", "--reward", "jpeg_compressibility"]).host == "127.0.0.1"
    serve({"jpeg_compressibility": jpeg_compressibility})
    assert uvicorn_runs[0]["host"] == "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_token(uvicorn_runs, host):
    serve({"jpeg_compressibility": jpeg_compressibility}, host=host)
    assert uvicorn_runs[0]["host"] == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "gpu-box"])
def test_other_hosts_need_a_token_or_the_explicit_opt_out(uvicorn_runs, host, caplog):
    rewards = {"jpeg_compressibility": jpeg_compressibility}
    with pytest.raises(ValueError, match=f"refusing to serve on {host!r} without a token"):
        serve(rewards, host=host)
    with pytest.raises(ValueError, match="refusing"):
        serve(rewards, host=host, token="")  # an empty token is no token
    assert uvicorn_runs == []
    serve(rewards, host=host, token=TOKEN)
    with caplog.at_level(logging.WARNING, logger="trl_nft.rewards.server"):
        serve(rewards, host=host, allow_unauthenticated=True)
    assert [call["host"] for call in uvicorn_runs] == [host, host]
    assert "without a token (--allow_unauthenticated)" in caplog.text


def test_the_cli_refuses_a_network_host_without_a_token_before_loading_anything(monkeypatch, uvicorn_runs):
    monkeypatch.delenv("TRL_NFT_REWARD_TOKEN", raising=False)
    # The module does not exist: the refusal comes before it would be imported.
    argv = ["reward-server", "--reward", "jpeg_compressibility", "--import", "no_such_module", "--host", "0.0.0.0"]
    with pytest.raises(
        SystemExit,
        match=r"trl-nft reward-server: refusing to serve on '0.0.0.0' without a token.*"
        r"--token or \$TRL_NFT_REWARD_TOKEN.*--allow_unauthenticated",
    ):
        main(argv)
    main(["reward-server", "--reward", "jpeg_compressibility", "--host", "0.0.0.0", "--allow_unauthenticated"])
    monkeypatch.setenv("TRL_NFT_REWARD_TOKEN", TOKEN)
    main(["reward-server", "--reward", "jpeg_compressibility", "--host", "0.0.0.0"])
    assert [call["host"] for call in uvicorn_runs] == ["0.0.0.0", "0.0.0.0"]


def test_tokens_are_compared_in_constant_time(url, monkeypatch):
    """The token is checked with `secrets.compare_digest`, whose time does not depend on where the given token first
    differs (a plain `==` would let a client guess it one character at a time)."""
    import secrets

    compared = []

    def recording_compare_digest(given, expected):
        compared.append((given, expected))
        return given == expected

    monkeypatch.setattr(secrets, "compare_digest", recording_compare_digest)
    payload = {"reward": "nan_reward", "images": [], "prompts": []}
    for given in ("s3cret-tokem", TOKEN):
        httpx.post(f"{url}/score", json=payload, headers={"Authorization": f"Bearer {given}"})
    assert compared == [(b"s3cret-tokem", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer  {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
    ],
)
def test_anything_but_the_exact_bearer_token_is_401(url, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(f"{url}/score", json={"reward": "nan_reward", "images": [], "prompts": []}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    accepted = httpx.post(
        f"{url}/score",
        json={"reward": "nan_reward", "images": [], "prompts": []},
        headers={"Authorization": f"bearer {TOKEN}"},  # the scheme is case-insensitive (RFC 7235)
    )
    assert accepted.json() == {"rewards": []}


# --------------------------------------------------------------------------------------------- server restarts


def retry_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "trl_nft.rewards.remote"]


def test_the_remote_reward_rides_out_a_server_killed_mid_request_and_restarted(tmp_path, caplog):
    """The server is killed (SIGKILL, as a crash or an OOM kill would) while it scores a request, and a server is
    started again on the same port while the remote reward is retrying: the call in flight succeeds once it is back.
    (The restarted server runs in this process, sparing a second start-up of the command line; the client cannot
    tell the difference.)"""
    (tmp_path / "hanging_rewards.py").write_text(
        textwrap.dedent(
            """
            import os
            import pathlib
            import threading

            from trl_nft import register_reward
            from trl_nft.rewards.jpeg import jpeg_compressibility

            calls = 0


            @register_reward("jpeg_then_hang")
            def jpeg_then_hang(images, prompts, **kwargs):
                # jpeg_compressibility at the first call; later calls hang until the server is killed.
                global calls
                calls += 1
                if calls > 1:
                    pathlib.Path(os.environ["HANG_MARKER"]).touch()
                    threading.Event().wait()
                return jpeg_compressibility(images, prompts)
            """
        )
    )
    marker = tmp_path / "scoring"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    images, prompts = noise_images(2), ["a", "b"]
    expected = jpeg_compressibility(images, prompts)
    # Waits of 0.1, 0.2, ... 51.2 s between the 11 attempts: about 100 s for a server to come back.
    reward = remote(url, reward="jpeg_then_hang", max_retries=10, backoff=0.1)
    env = {"PYTHONPATH": str(tmp_path), "HANG_MARKER": str(marker)}
    process = start_cli_server(port, "--import", "hanging_rewards", "--reward", "jpeg_then_hang", env=env)
    outcome = {}

    def score():
        try:
            outcome["rewards"] = reward(images, prompts)
        except Exception as error:
            outcome["error"] = error

    try:
        assert reward(images, prompts) == expected
        caller = threading.Thread(target=score)
        with caplog.at_level(logging.WARNING, logger="trl_nft.rewards.remote"):
            caller.start()
            while not marker.exists():  # the server is scoring the request
                assert caller.is_alive(), outcome
                time.sleep(0.05)
            process.kill()
            process.wait(timeout=10)
            while not any("ConnectError" in message for message in retry_messages(caplog)):  # retrying, refused
                assert caller.is_alive(), outcome
                time.sleep(0.05)
            app = create_app({"jpeg_then_hang": jpeg_compressibility}, token=TOKEN)
            with running(app, port):
                caller.join(timeout=200)
        assert outcome == {"rewards": expected}
        retries = retry_messages(caplog)
        # Cut off mid-request, then refused while down, each retry numbered.
        assert re.search(r"failed \((RemoteProtocolError|ReadError)", retries[0])
        assert "retry 1 of 10" in retries[0] and "ConnectError" in retries[1] and "retry 2 of 10" in retries[1]
    finally:
        process.kill()
        process.wait(timeout=10)


def test_a_server_that_stays_down_fails_clearly_after_logging_each_retry(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reward = remote(url, reward="jpeg_compressibility", max_retries=3)
    with caplog.at_level(logging.WARNING, logger="trl_nft.rewards.remote"):
        with pytest.raises(
            RemoteRewardError,
            match=rf"remote_jpeg_compressibility: {url}/score failed after 4 attempts; last failure: ConnectError.*"
            r"is the reward server running and reachable\?",
        ):
            reward(noise_images(1), ["a"])
    retries = retry_messages(caplog)
    assert len(retries) == 3
    for number, message in enumerate(retries, start=1):
        assert f"{url}/score failed (ConnectError" in message and f"retry {number} of 3 in" in message


# ------------------------------------------------------------------------------------------- condition images

seen_arguments: list[dict] = []


def source_difference(images, prompts, condition_images, **kwargs):
    """The absolute difference in [0, 1] of the mean pixel values of each image and of its source images (the mean
    over them; -1 for a sample without one); records what it was given."""
    seen_arguments.append({"condition_images": condition_images, **kwargs})
    rewards = []
    for image, sources in zip(images, condition_images, strict=True):
        if sources is None:
            rewards.append(-1.0)
            continue
        sources = sources if isinstance(sources, list) else [sources]
        level = np.asarray(image, dtype=np.float64).mean()
        rewards.append(float(np.mean([abs(level - np.asarray(source).mean()) / 255 for source in sources])))
    return rewards


def recording_reward(images, prompts, **kwargs):
    seen_arguments.append(kwargs)
    return [0.0] * len(images)


CONDITION_LIMITS = RequestLimits(max_images=8, max_image_base64_mb=1, max_image_pixels=64 * 64)


@pytest.fixture(scope="module")
def condition_url():
    app = create_app(
        {"source_difference": source_difference, "recording": recording_reward},
        token=TOKEN,
        max_batch_size=MAX_BATCH_SIZE,
        limits=CONDITION_LIMITS,
    )
    with running(app) as base_url:
        yield base_url


def post_condition_request(url, payload: dict) -> httpx.Response:
    return httpx.post(f"{url}/score", json=payload, headers={"Authorization": f"Bearer {TOKEN}"})


def test_condition_images_reach_the_server_side_reward_as_the_trainer_gives_them(condition_url):
    images = noise_images(3, seed=1, size=16)
    sources = [noise_images(1, seed=2, size=16)[0], noise_images(2, seed=3, size=24), noise_images(1, seed=4)[0]]
    prompts = ["a", "b", "c"]
    seen_arguments.clear()
    reward = remote(condition_url, reward="source_difference", batch_size=3)
    # Lossless PNG both ways: the served reward's values are the in-process ones, to the last bit.
    assert reward(images, prompts, condition_images=sources) == source_difference(images, prompts, sources)
    # The server's batches of MAX_BATCH_SIZE: one image, then a list of two (a multi-image row), then the next batch.
    first, second = seen_arguments[:2]
    assert [type(entry) for entry in first["condition_images"]] == [Image.Image, list]
    assert [image.mode for image in first["condition_images"][1]] == ["RGB", "RGB"]
    np.testing.assert_array_equal(np.asarray(second["condition_images"][0]), np.asarray(sources[2]))


def test_a_sample_without_a_condition_image_is_sent_as_null(condition_url):
    images = noise_images(2, size=8)
    reward = remote(condition_url, reward="source_difference")
    assert reward(images, ["a", "b"], condition_images=[None, images[1]]) == [-1.0, 0.0]


def test_condition_images_count_toward_max_images(condition_url):
    reward = remote(condition_url, reward="source_difference", backoff=30.0)
    images = noise_images(2, size=8)
    start = time.perf_counter()
    with pytest.raises(
        RemoteRewardError,
        match=re.escape(
            "HTTP 413: request too large: 9 images (2 + 7 condition images), over the server's max_images (8)"
        ),
    ):
        reward(images, ["a", "b"], condition_images=[images[0], noise_images(6, size=8)])
    assert time.perf_counter() - start < 10  # not retried
    assert reward(images, ["a", "b"], condition_images=[images[0], images[1]]) == [0.0, 0.0]


@pytest.mark.parametrize(
    "condition_images, status, message",
    [
        (
            lambda small, large: [small, large],
            413,
            "condition_images[1] is 65x64 (4,160 pixels), over the server's max_image_pixels (4,096)",
        ),
        (
            lambda small, large: [small, [small, large]],
            413,
            "condition_images[1][1] is 65x64 (4,160 pixels), over the server's max_image_pixels (4,096)",
        ),
        (
            lambda small, large: [small, "A" * (1024 * 1024 + 4)],
            413,
            "condition_images[1] is 1,048,580 characters of base64, over the server's max_image_base64_mb (1 MiB)",
        ),
        (lambda small, large: [small, ["@@@"]], 400, "condition_images[1][0] is not valid base64"),
        (
            lambda small, large: [small, png_base64(Image.new("RGB", (4, 4)), "JPEG")],
            400,
            "condition_images[1] is not a readable PNG or WebP image",
        ),
        (lambda small, large: [small, []], 400, "condition_images[1] is an empty list"),
        (lambda small, large: [small], 400, "2 images but 1 condition_images"),
        (lambda small, large: [small, 3], 400, "malformed request: condition_images.1"),
        (lambda small, large: [small, [small, None]], 400, "malformed request: condition_images.1"),
        (lambda small, large: small, 400, "malformed request: condition_images"),
    ],
    ids=[
        "pixels",
        "pixels-in-a-list",
        "base64-size",
        "bad-base64",
        "jpeg",
        "empty-list",
        "length",
        "not-an-image",
        "null-in-a-list",
        "not-a-list",
    ],
)
def test_bad_condition_images_are_4xx_and_the_server_keeps_serving(condition_url, condition_images, status, message):
    small, large = png_base64(Image.new("RGB", (64, 64))), png_base64(Image.new("RGB", (65, 64)))
    payload = {
        "reward": "source_difference",
        "images": [small, small],
        "prompts": ["a", "b"],
        "condition_images": condition_images(small, large),
    }
    response = post_condition_request(condition_url, payload)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert post_condition_request(condition_url, {**payload, "condition_images": [small, small]}).json() == {
        "rewards": [0.0, 0.0]
    }


@pytest.mark.parametrize("column", ["condition_images", "images", "videos", "prompts", "self", "models"])
def test_a_column_named_as_a_rewards_own_argument_is_400(condition_url, column):
    # `self` and `models` are the parameters of a model-backed reward's `score`: passed on, they would be a 500.
    image = png_base64(Image.new("RGB", (4, 4)))
    payload = {"reward": "recording", "images": [image], "prompts": ["a"], "columns": {column: [image]}}
    response = post_condition_request(condition_url, payload)
    assert response.status_code == 400
    assert f"column {column!r} clashes with the reward's own argument" in response.json()["detail"]


def test_a_reward_that_needs_condition_images_refuses_a_request_without_them(condition_url):
    payload = {"reward": "source_difference", "images": [png_base64(Image.new("RGB", (4, 4)))], "prompts": ["a"]}
    response = post_condition_request(condition_url, payload)
    assert response.status_code == 400
    assert "missing a required argument: 'condition_images'" in response.json()["detail"]


def test_the_image_column_is_sent_when_it_holds_paths_and_left_out_when_it_holds_images(condition_url):
    """The dataset's `image` column reaches rewards as an ordinary column: paths are JSON and travel as a column, PIL
    images travel as `condition_images` only. Any other column that is not JSON is still an error."""
    images = noise_images(2, size=8)
    reward = remote(condition_url, reward="recording")
    seen_arguments.clear()
    reward(images, ["a", "b"], image=["edits/0.png", ["edits/1.png", "edits/2.png"]], condition_images=images)
    reward(images, ["a", "b"], image=[images[0], [images[1]]], step=[1, 2], condition_images=images)
    with_paths, with_images = seen_arguments
    assert with_paths["image"] == ["edits/0.png", ["edits/1.png", "edits/2.png"]]
    assert "image" not in with_images and with_images["step"] == [1, 2]
    assert [np.asarray(image).tolist() for image in with_images["condition_images"]] == [
        np.asarray(image).tolist() for image in images
    ]
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        reward(images, ["a", "b"], mask=images, condition_images=images)


def test_condition_images_can_be_left_unsent(condition_url):
    images = noise_images(1, size=8)
    seen_arguments.clear()
    remote(condition_url, reward="recording", send_condition_images=False)(images, ["a"], condition_images=images)
    assert seen_arguments == [{}]
    with pytest.raises(TypeError, match="condition_images must be PIL images"):
        remote(condition_url, reward="recording")(images, ["a"], condition_images=["edits/0.png"])


def test_the_served_image_similarity_equals_the_in_process_one(tmp_path):
    from reward_models import save_tiny_dinov2

    checkpoint = save_tiny_dinov2(tmp_path / "dinov2")
    images = noise_images(3, seed=5)
    sources = [noise_images(1, seed=6)[0], noise_images(2, seed=7), images[2].copy()]  # the last one unchanged
    in_process = get_reward("image_similarity", checkpoint=checkpoint)
    with running(create_app({"image_similarity": get_reward("image_similarity", checkpoint=checkpoint)})) as base_url:
        served = get_reward("remote", url=base_url)(images, ["a", "b", "c"], condition_images=sources)
    assert served == in_process(images, ["a", "b", "c"], condition_images=sources)
    assert served[2] == pytest.approx(1.0, abs=1e-6)
