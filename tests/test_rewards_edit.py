"""The edit rewards: `edit_judge` against a real OpenAI-compatible HTTP server on 127.0.0.1, and `image_similarity`
on tiny random CLIP and DINOv2 models loaded by its real loader."""

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image
from reward_models import save_tiny_clip, save_tiny_dinov2
from test_rewards_clip import transformers4_clip_pixels
from transformers import AutoImageProcessor, CLIPModel, Dinov2Model

from trl_nft import get_reward
from trl_nft.rewards import needs_condition_images, required_columns
from trl_nft.rewards.vlm import EDIT_JUDGE_TEMPLATE


# What the judge answers to an instruction: the answer's tokens, each with its top alternatives and their
# probabilities (the answered token first); the answer is the tokens joined.
ANSWERS = {
    # The score token first: "3" and " 3" are two spellings of 3, "I" is no score token.
    "make it red": [("4", {"4": 0.6, "3": 0.2, " 3": 0.05, "5": 0.1, "I": 0.05})],
    # The score token third; the first position lists "2" among its alternatives, but its answer is no score.
    "add a hat": [("Score", {"Score": 0.9, "2": 0.1}), (":", {":": 1.0}), (" 2", {" 2": 0.5, " 1": 0.3, " 0": 0.2})],
    "refuse": [("I", {"I": 1.0}), (" cannot", {" cannot": 1.0}), (" judge", {" judge": 1.0})],
}
# The expected scores over 5: (4 * 0.6 + 3 * 0.25 + 5 * 0.1) / 0.95 and (2 * 0.5 + 1 * 0.3) / 1.
EXPECTED_FROM_LOGPROBS = {"make it red": 3.65 / 0.95 / 5, "add a hat": 1.3 / 5}
# The answers read as text: "4" and "Score: 2".
EXPECTED_FROM_TEXT = {"make it red": 4 / 5, "add a hat": 2 / 5}


class EditJudgeServer:
    """`POST /v1/chat/completions` answering as `ANSWERS` says for the instruction found in the question. It refuses
    (400) a request without at least two images (the sources, then the edited image) and records each request's
    images as pixel arrays, its question and its options. With `logprobs=True` it returns the answer's
    log-probabilities when the request asks for them (`logprobs`, `top_logprobs`); without, it never does (as a server
    that does not support them)."""

    def __init__(self, logprobs: bool = True):
        self.requests: list[dict] = []
        lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                (message,) = body["messages"]
                *image_parts, text_part = message["content"]
                if len(image_parts) < 2 or any(part["type"] != "image_url" for part in image_parts):
                    return self.answer(400, {"error": {"message": "expected the source and the edited images"}})
                images = []
                for part in image_parts:
                    header, data = part["image_url"]["url"].split(",", 1)
                    image = Image.open(io.BytesIO(base64.b64decode(data)))
                    images.append((header, image.format, np.asarray(image.convert("RGB"))))
                options = {key: value for key, value in body.items() if key not in ("messages",)}
                with lock:
                    judge.requests.append({"images": images, "text": text_part["text"], "options": options})
                instruction = next(key for key in ANSWERS if key in text_part["text"])
                tokens = ANSWERS[instruction]
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(token for token, _ in tokens)},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                if logprobs and body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [
                            {
                                "token": token,
                                "logprob": math.log(top[token]),
                                "bytes": list(token.encode()),
                                "top_logprobs": [
                                    {"token": other, "logprob": math.log(p), "bytes": list(other.encode())}
                                    for other, p in list(top.items())[: body["top_logprobs"]]
                                ],
                            }
                            for token, top in tokens
                        ]
                    }
                self.answer(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [choice],
                    },
                )

            def answer(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "EditJudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def noise(seed: int, size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------- edit_judge


def judge(server: EditJudgeServer, **options):
    pytest.importorskip("openai")
    return get_reward("edit_judge", base_url=server.base_url, max_retries=0, **options)


def test_edit_judge_scores_the_expected_score_from_the_score_tokens_log_probabilities():
    with EditJudgeServer() as server:
        rewards = judge(server)(
            [noise(0), noise(1)], ["make it red", "add a hat"], condition_images=[noise(2), noise(3)]
        )
    assert rewards == pytest.approx([EXPECTED_FROM_LOGPROBS["make it red"], EXPECTED_FROM_LOGPROBS["add a hat"]])
    for request in server.requests:
        # Edit-R1's request: greedy, a short answer, and the log-probabilities of the top alternatives.
        assert request["options"] == {
            "model": "Qwen/Qwen2.5-VL-32B-Instruct",
            "temperature": 0.0,
            "max_tokens": 8,
            "logprobs": True,
            "top_logprobs": 20,
        }


def test_edit_judge_reads_the_answer_when_the_server_returns_no_log_probabilities():
    with EditJudgeServer(logprobs=False) as server:
        rewards = judge(server)(
            [noise(0), noise(1)], ["make it red", "add a hat"], condition_images=[noise(2), noise(3)]
        )
    assert rewards == pytest.approx([EXPECTED_FROM_TEXT["make it red"], EXPECTED_FROM_TEXT["add a hat"]])


def test_edit_judge_without_logprobs_does_not_ask_for_them():
    with EditJudgeServer() as server:
        rewards = judge(server, logprobs=False, max_tokens=3)([noise(0)], ["make it red"], condition_images=[noise(2)])
    assert rewards == pytest.approx([EXPECTED_FROM_TEXT["make it red"]])
    (request,) = server.requests
    assert "logprobs" not in request["options"] and "top_logprobs" not in request["options"]
    assert request["options"]["max_tokens"] == 3


def test_edit_judge_counts_only_the_score_tokens_among_the_top_logprobs_it_asked_for():
    with EditJudgeServer() as server:
        # The top 2 alternatives of "make it red" are "4" (0.6) and "3" (0.2): (4 * 0.6 + 3 * 0.2) / 0.8.
        rewards = judge(server, top_logprobs=2)([noise(0)], ["make it red"], condition_images=[noise(2)])
    assert rewards == pytest.approx([3.0 / 0.8 / 5])


def test_edit_judge_sends_the_sources_then_the_edited_image_with_the_instruction():
    sources, edited = [noise(10, (40, 30)), [noise(11), noise(12, (8, 8))]], [noise(20, (32, 32)), noise(21)]
    with EditJudgeServer() as server:
        judge(server, max_concurrency=1)(edited, ["make it red", "add a hat"], condition_images=sources)
    first, second = server.requests
    assert first["text"] == EDIT_JUDGE_TEMPLATE.replace("{instruction}", "make it red")
    # The sources in order, then the edited image, each a lossless PNG at its own size.
    expected = [[sources[0], edited[0]], [*sources[1], edited[1]]]
    for request, images in zip([first, second], expected, strict=True):
        assert [header for header, _, _ in request["images"]] == ["data:image/png;base64"] * len(images)
        assert [format for _, format, _ in request["images"]] == ["PNG"] * len(images)
        for (_, _, pixels), image in zip(request["images"], images, strict=True):
            np.testing.assert_array_equal(pixels, np.asarray(image))


def test_edit_judge_template_and_image_size_can_be_replaced():
    template = 'Was "{instruction}" done? {"format": "one digit"} {prompt}'
    with EditJudgeServer() as server:
        judge(server, prompt_template=template, image_size=16)(
            [noise(0)], ["make it red"], condition_images=[noise(1)]
        )
    (request,) = server.requests
    assert request["text"] == 'Was "make it red" done? {"format": "one digit"} {prompt}'
    assert [pixels.shape for _, _, pixels in request["images"]] == [(16, 16, 3), (16, 16, 3)]


def test_edit_judge_on_another_scale():
    with EditJudgeServer() as server:
        # Out of 9: the same token probabilities, a larger divisor.
        rewards = judge(server, scale_max=9)([noise(0)], ["make it red"], condition_images=[noise(1)])
    assert rewards == pytest.approx([3.65 / 0.95 / 9])
    for scale_max in (0, 10, 2.5, True):
        with pytest.raises(ValueError, match="scale_max must be an integer from 1 to 9"):
            get_reward("edit_judge", scale_max=scale_max)


@pytest.mark.parametrize("logprobs", [True, False])
def test_edit_judge_an_answer_without_a_score_is_an_error_quoting_it(logprobs):
    with EditJudgeServer(logprobs=logprobs) as server:
        with pytest.raises(
            ValueError, match=r"edit_judge: cannot read a score from the judge's answer 'I cannot judge'"
        ):
            judge(server)([noise(0)], ["refuse"], condition_images=[noise(1)])


def test_edit_judge_needs_every_samples_source_image():
    with EditJudgeServer() as server:
        reward = judge(server)
        with pytest.raises(ValueError, match="edit_judge compares each sample with its source image"):
            reward([noise(0), noise(1)], ["make it red"] * 2, condition_images=[noise(2), None])
        with pytest.raises(TypeError, match="condition_images"):
            reward([noise(0)], ["make it red"])
    assert server.requests == []


# ------------------------------------------------------------------------------------------- image_similarity


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_image_similarity_with_dinov2_is_the_cosine_of_the_class_tokens(tiny_dinov2):
    edited = [noise(0, (48, 32)), noise(1), noise(2, (32, 32))]
    sources = [noise(10), noise(11, (20, 40)), noise(12)]
    model, processor = Dinov2Model.from_pretrained(tiny_dinov2).eval(), AutoImageProcessor.from_pretrained(tiny_dinov2)
    with torch.no_grad():
        embeds = [model(**processor(images=images, return_tensors="pt")).pooler_output for images in (edited, sources)]
    rewards = get_reward("image_similarity", checkpoint=tiny_dinov2)(edited, ["x"] * 3, condition_images=sources)
    torch.testing.assert_close(torch.tensor(rewards), cosine(*embeds), rtol=0, atol=1e-6)
    assert len(set(rewards)) == 3


def test_image_similarity_with_clip_is_the_cosine_of_the_clip_image_embeddings(tiny_clip):
    edited, sources = [noise(0, (48, 32)), noise(1)], [noise(10), noise(11, (20, 40))]
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        embeds = [
            model.get_image_features(pixel_values=torch.stack([transformers4_clip_pixels(image) for image in images]))
            for images in (edited, sources)
        ]
    embeds = [getattr(embed, "pooler_output", embed) for embed in embeds]
    rewards = get_reward("image_similarity", checkpoint=tiny_clip)(edited, ["x"] * 2, condition_images=sources)
    torch.testing.assert_close(torch.tensor(rewards), cosine(*embeds), rtol=0, atol=1e-6)


def test_image_similarity_shares_the_clip_weights_with_clip_score(tiny_clip):
    similarity, clip_score = (
        get_reward("image_similarity", checkpoint=tiny_clip),
        get_reward("clip_score", checkpoint=tiny_clip),
    )
    similarity([noise(0)], ["x"], condition_images=[noise(1)])
    clip_score([noise(0)], ["x"])
    assert similarity._models.args[0] is clip_score._models[0]


@pytest.mark.parametrize("backbone", ["dinov2", "clip"])
def test_image_similarity_is_one_for_an_unchanged_image_and_averages_several_sources(tiny_dinov2, tiny_clip, backbone):
    reward = get_reward("image_similarity", checkpoint={"dinov2": tiny_dinov2, "clip": tiny_clip}[backbone])
    edited, first, second = noise(0), noise(1), noise(2)
    unchanged, one, other, both = reward(
        [edited] * 4, ["x"] * 4, condition_images=[edited.copy(), first, second, [first, second]]
    )
    assert unchanged == pytest.approx(1.0, abs=1e-6)
    assert both == pytest.approx((one + other) / 2, abs=1e-6)
    # Batching does not change the scores.
    batched = get_reward("image_similarity", checkpoint=reward.checkpoint, batch_size=1)(
        [edited] * 4, ["x"] * 4, condition_images=[edited.copy(), first, second, [first, second]]
    )
    assert batched == pytest.approx([unchanged, one, other, both], abs=1e-6)


def test_image_similarity_needs_every_samples_source_image(tiny_dinov2):
    reward = get_reward("image_similarity", checkpoint=tiny_dinov2)
    with pytest.raises(ValueError, match="image_similarity compares each sample with its source image"):
        reward([noise(0), noise(1)], ["x", "y"], condition_images=[noise(2), []])


def test_condition_images_is_not_a_required_dataset_column(tiny_dinov2):
    """The trainer passes `condition_images` itself in image-conditioned runs; a dataset is never asked for it."""
    for reward in (get_reward("edit_judge"), get_reward("image_similarity", checkpoint=tiny_dinov2)):
        assert required_columns(reward) == () and needs_condition_images(reward)

    def my_edit_reward(images, prompts, condition_images, strength, **kwargs):
        return [0.0] * len(images)

    assert required_columns(my_edit_reward) == ("strength",)


# ------------------------------------------------------------------------------------------------ in training


def test_one_training_step_with_both_edit_rewards_on_the_rows_source_images(make_config, tiny_dinov2):
    """Through the public API on tiny-flux2-klein with reference images: the judge receives each row's source image
    (losslessly) before the sample, and both rewards are logged."""
    from datasets import Dataset

    from trl_nft import DiffusionNFTTrainer

    sources = [noise(30, (64, 64)), noise(31, (64, 64))]
    dataset = Dataset.from_dict({"prompt": ["make it red", "add a hat"], "image": sources})
    config = make_config(max_steps=1, per_device_train_batch_size=2, num_generations=2, num_inference_steps=2)
    with EditJudgeServer() as server:
        rewards = [judge(server), get_reward("image_similarity", checkpoint=tiny_dinov2)]
        trainer = DiffusionNFTTrainer("tiny-flux2-klein", rewards, args=config, train_dataset=dataset)
        trainer.train()
    assert len(server.requests) >= 2  # the rollout's two samples (and the trainer's start-up check)
    for request in server.requests:
        (_, _, source), (_, _, edited) = request["images"]
        expected = sources[0] if "make it red" in request["text"] else sources[1]
        np.testing.assert_array_equal(source, np.asarray(expected))
        assert edited.shape == (64, 64, 3)
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["rewards/edit_judge/mean"] in [pytest.approx(value) for value in EXPECTED_FROM_LOGPROBS.values()]
    assert -1 <= log["rewards/image_similarity/mean"] <= 1 and math.isfinite(log["loss"])
