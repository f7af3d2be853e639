"""The `vlm_judge` reward against a real OpenAI-compatible HTTP server on 127.0.0.1 that grades the image it receives."""

import base64
import io
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from trl_nft import DiffusionNFTTrainer, get_reward
from trl_nft.rewards.vlm import UNIFIED_REWARD_TEMPLATE


pytest.importorskip("openai")


class JudgeServer:
    """`POST /v1/chat/completions`: decodes the PNG data URL of the user message and answers
    "... Final Score: s" with s = 1 + 4 * (mean pixel value / 255), rounded to 2 decimals; a prompt containing "REFUSE"
    gets an answer without a score. Records every request and the most requests it had in flight at once."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = delay
        lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                with lock:
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    (message,) = body["messages"]
                    image_part, text_part = message["content"]
                    header, data = image_part["image_url"]["url"].split(",", 1)
                    image = Image.open(io.BytesIO(base64.b64decode(data)))
                    grade = round(1 + 4 * float(np.asarray(image.convert("RGB"), dtype=np.float64).mean()) / 255, 2)
                    with lock:
                        judge.requests.append(
                            {
                                "path": self.path,
                                "model": body["model"],
                                "temperature": body.get("temperature"),
                                "authorization": self.headers.get("Authorization"),
                                "header": header,
                                "format": image.format,
                                "size": image.size,
                                "pixels": np.asarray(image.convert("RGB")),
                                "text": text_part["text"],
                                "grade": grade,
                            }
                        )
                    time.sleep(judge.delay)
                    if "REFUSE" in text_part["text"]:
                        answer = "I cannot grade this image."
                    else:
                        answer = f"The image is fine.\nFinal Score: {grade:.2f}"
                    payload = json.dumps(
                        {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": answer},
                                    "finish_reason": "stop",
                                }
                            ],
                        }
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    with lock:
                        judge.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def gray(level: int, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


def test_scores_are_the_judges_grades_of_the_images_sent_over_the_scale():
    with JudgeServer() as server:
        reward = get_reward("vlm_judge", base_url=server.base_url, model="judge-7b", api_key="secret")
        # Mean levels 0, 51, 102, 255 -> grades 1, 1.8, 2.6, 5 -> over 5.
        assert reward([gray(0), gray(51), gray(102), gray(255)], ["a", "b", "c", "d"]) == pytest.approx(
            [0.2, 0.36, 0.52, 1.0]
        )
    by_prompt = {request["text"]: request for request in server.requests}
    assert set(by_prompt) == {UNIFIED_REWARD_TEMPLATE.replace("{prompt}", prompt) for prompt in "abcd"}
    request = by_prompt[UNIFIED_REWARD_TEMPLATE.replace("{prompt}", "a")]
    assert request["text"].endswith("Text Caption: [a]")
    assert (request["path"], request["model"], request["temperature"]) == ("/v1/chat/completions", "judge-7b", 0)
    # Sent at Flow-GRPO's 512 x 512 (a uniform grey stays uniform, so the grades are those of the 32 px images).
    assert (request["header"], request["format"], request["size"]) == ("data:image/png;base64", "PNG", (512, 512))
    assert request["authorization"] == "Bearer secret"


def test_images_are_resized_to_512_as_flow_grpo_does():
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (700, 600, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
    ]
    with JudgeServer() as server:
        get_reward("vlm_judge", base_url=server.base_url, max_concurrency=1)(images, ["a", "b", "c"])
        get_reward("vlm_judge", base_url=server.base_url, image_size=None)(images[:1], ["own size"])
    by_text = {request["text"]: request for request in server.requests}
    for image, prompt in zip(images, "abc", strict=True):
        request = by_text[UNIFIED_REWARD_TEMPLATE.replace("{prompt}", prompt)]
        assert request["size"] == (512, 512)
        # Flow-GRPO's `Image.fromarray(image).resize((512, 512))`: Pillow's default filter (bicubic for RGB), sent
        # losslessly.
        np.testing.assert_array_equal(request["pixels"], np.asarray(image.resize((512, 512))))
    assert server.requests[-1]["size"] == (300, 200)
    np.testing.assert_array_equal(server.requests[-1]["pixels"], np.asarray(images[0]))


def test_image_size_must_be_positive():
    with pytest.raises(ValueError, match="image_size must be >= 1 or None"):
        get_reward("vlm_judge", image_size=0)


def test_custom_template_pattern_scale_and_image_size(monkeypatch):
    monkeypatch.setenv("VLM_JUDGE_API_KEY", "from-env")
    with JudgeServer() as server:
        reward = get_reward(
            "vlm_judge",
            base_url=server.base_url,
            prompt_template='Rate "{prompt}" from 1 to 5 {"json": "braces stay"}',
            score_pattern=r"Score:\s*([0-9.]+)",
            scale_max=10.0,
            image_size=16,
        )
        assert reward([gray(255, size=64)], ["a red cube"]) == pytest.approx([0.5])
    (request,) = server.requests
    assert request["text"] == 'Rate "a red cube" from 1 to 5 {"json": "braces stay"}'
    assert request["size"] == (16, 16)
    assert request["authorization"] == "Bearer from-env"


def test_requests_run_concurrently_and_results_keep_their_order():
    levels = [255, 0, 204, 51, 153, 102, 10, 240]
    with JudgeServer(delay=0.3) as server:
        reward = get_reward("vlm_judge", base_url=server.base_url, max_concurrency=4)
        rewards = reward([gray(level) for level in levels], [f"p{i}" for i in range(len(levels))])
    assert rewards == pytest.approx([round(1 + 4 * level / 255, 2) / 5 for level in levels])
    assert 1 < server.max_in_flight <= 4


def test_an_answer_without_a_score_is_an_error_quoting_it():
    with JudgeServer() as server:
        reward = get_reward("vlm_judge", base_url=server.base_url)
        with pytest.raises(ValueError, match=r"vlm_judge.*'I cannot grade this image\.'"):
            reward([gray(0), gray(0)], ["fine", "REFUSE"])


def test_a_parse_function_replaces_the_pattern():
    with JudgeServer() as server:
        # The answer is "The image is fine.\nFinal Score: 1.00": the parser makes it 2 (the pattern would read 1).
        reward = get_reward("vlm_judge", base_url=server.base_url, parse_score=lambda answer: float(answer[-4:]) + 1)
        assert reward([gray(0)], ["x"]) == pytest.approx([2 / 5])


def test_a_server_that_is_down_is_a_clear_error_after_the_retries():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reward = get_reward("vlm_judge", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=5)
    with pytest.raises(RuntimeError, match=rf"vlm_judge.*127\.0\.0\.1:{port}.*retried up to 1 times"):
        reward([gray(0)], ["x"])


def test_one_training_step_with_the_judge(make_config, prompts_dataset):
    with JudgeServer() as server:
        config = make_config(max_steps=1, per_device_train_batch_size=4, num_generations=4, num_inference_steps=2)
        reward = get_reward("vlm_judge", base_url=server.base_url, model="judge")
        trainer = DiffusionNFTTrainer("tiny-sd3", reward, args=config, train_dataset=prompts_dataset)
        trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    # The probe's 2 images, then one rollout of 4 images of one prompt, each 64 x 64 image sent as a 512 x 512 PNG.
    assert len(server.requests) == 6
    rollout_grades = [request["grade"] for request in server.requests[2:]]
    assert log["rewards/vlm_judge/mean"] == pytest.approx(np.mean(rollout_grades) / 5)
    assert math.isfinite(log["loss"])
    assert {request["size"] for request in server.requests} == {(512, 512)}
