"""The reward server and the `remote` reward, over real loopback sockets."""

import base64
import contextlib
import io
import math
import os
import re
import socket
import subprocess
import sys
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
from trl_nft.rewards import reward_name
from trl_nft.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from trl_nft.rewards.remote import RemoteRewardError
from trl_nft.rewards.server import create_app


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
def running(app):
    """`app` served by uvicorn in a background thread, on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
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
    with pytest.raises(RemoteRewardError, match=rf"{url}/score failed after 3 attempts; last failure: ConnectError"):
        DiffusionNFTTrainer("tiny-sd3", reward, args=make_config(max_steps=1), train_dataset=prompts_dataset)


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
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRL_NFT_REWARD_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trl_nft.cli", "reward-server", "--import", "my_rewards"]
    command += ["--reward", "scaled_red", "--reward_kwargs", 'scaled_red={"scale": 2.0}']
    command += ["--reward", "jpeg_compressibility", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the reward server did not answer /health within 120 s"
            with contextlib.suppress(httpx.TransportError):
                health = httpx.get(f"{url}/health", timeout=1)
                break
            time.sleep(0.2)
        assert health.json() == {"status": "ok", "rewards": ["scaled_red", "jpeg_compressibility"]}
        images = [Image.new("RGB", (8, 8), (red, 0, 0)) for red in (0, 102, 255)]
        assert remote(url, reward="scaled_red")(images, ["a", "b", "c"]) == [0.0, 2.0 * (102 / 255), 2.0]
        noise = noise_images(2)
        assert remote(url, reward="jpeg_compressibility")(noise, ["a", "b"]) == jpeg_compressibility(noise, ["a", "b"])
        with pytest.raises(RemoteRewardError, match="Check that the token"):
            get_reward("remote", url=url, reward="scaled_red", token="wrong")(images, ["a", "b", "c"])
    finally:
        process.terminate()
        process.wait(timeout=10)
