"""The `ocr` reward: Flow-GRPO's text-rendering score, and the docTR path on tiny models built offline."""

import math

import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_nft import DiffusionNFTTrainer, get_reward
from trl_nft.prompt_formats import quoted_text
from trl_nft.rewards.ocr import levenshtein, ocr_reward, save_doctr_checkpoint


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("abc", "acb", 2),  # no transpositions: two substitutions
    ],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ('A neon sign that says "Open Late" above a door', "Open Late"),
        ('a "first" and a "second"', "first"),
        ("a photo of a cat", None),
        ('a single " quote', None),
        ('an empty "" sign', None),
        ('a blank "   " sign', None),
    ],
)
def test_quoted_text(prompt, text):
    assert quoted_text(prompt) == text


@pytest.mark.parametrize(
    ("read", "target", "reward"),
    [
        ("OPEN LATE", "Open Late", 1.0),  # case and spaces do not count
        ("welcome open late friends", "open late", 1.0),  # extra text around the target is free
        ("openlat", "open late", 1 - 1 / 8),  # one deletion away from "openlate"
        ("hallo", "hello", 1 - 1 / 5),  # one substitution
        ("", "abc", 0.0),  # nothing read: 3 edits for 3 characters
        ("a long unrelated sentence", "ab", 0.0),  # the distance is capped at the target's length
        ("ab", "abcd", 0.5),  # two insertions for four characters
    ],
)
def test_ocr_reward_values(read, target, reward):
    assert ocr_reward(read, target) == pytest.approx(reward)


def test_ocr_reward_rejects_an_empty_target():
    with pytest.raises(ValueError, match="empty"):
        ocr_reward("abc", "  ")


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="backend"):
        get_reward("ocr", backend="tesseract")
    with pytest.raises(ValueError, match="no checkpoint"):
        get_reward("ocr", backend="paddleocr", checkpoint="some/model")


def test_paddleocr_backend_names_its_extra_when_missing():
    try:
        import paddleocr  # noqa: F401

        pytest.skip("paddleocr is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"trl-nft\[paddleocr\]"):
        get_reward("ocr", backend="paddleocr")([Image.new("RGB", (32, 32))], ['"a"'])


@pytest.fixture(scope="module")
def reads_h(tmp_path_factory) -> str:
    """An `ocr` checkpoint of the smallest docTR models, made to read "h" in any image: the detector's last layer
    outputs a large constant (the whole page is one text box) and the recogniser's outputs "h" at every step (CTC
    collapses the repeats)."""
    models = pytest.importorskip("doctr.models")
    detection = models.detection.db_mobilenet_v3_large(pretrained=False, pretrained_backbone=False)
    detection.cfg["input_shape"] = (3, 64, 64)
    vocab = "abcdefghijklmnopqrstuvwxyz"
    recognition = models.recognition.crnn_mobilenet_v3_small(
        pretrained=False, pretrained_backbone=False, vocab=vocab, input_shape=(3, 32, 64)
    )
    with torch.no_grad():
        detection.prob_head[-1].weight.zero_()
        detection.prob_head[-1].bias.fill_(10.0)
        recognition.linear.weight.zero_()
        recognition.linear.bias.zero_()
        recognition.linear.bias[vocab.index("h")] = 10.0
    path = str(tmp_path_factory.mktemp("ocr"))
    save_doctr_checkpoint(path, detection, recognition, "db_mobilenet_v3_large", "crnn_mobilenet_v3_small")
    return path


def test_doctr_reward_from_a_local_checkpoint(reads_h):
    reward = get_reward("ocr", checkpoint=reads_h, batch_size=4)
    images = [Image.new("RGB", (64, 64), (40 * i, 90, 200)) for i in range(6)]
    prompts = [
        'a sign saying "H"',  # "h" is read: 1
        'a poster with "hi"',  # one insertion for two characters: 1/2
        'a "xyz" logo',  # three substitutions/insertions for three: 0
        "a photo of a cat",  # nothing to read: not applicable
        'a banner "h h h"',  # "hhh": two insertions for three: 1/3
        'graffiti "ah"',  # one insertion for two: 1/2
    ]
    assert reward(images, prompts) == pytest.approx([1.0, 0.5, 0.0, None, 1 / 3, 0.5])


def test_an_ocr_text_column_overrides_the_quoted_text(reads_h):
    reward = get_reward("ocr", checkpoint=reads_h)
    images = [Image.new("RGB", (64, 64))] * 3
    prompts = ['a sign "xyz"', 'a sign "xyz"', "no quotes"]
    # An empty value falls back to the prompt's quoted text.
    assert reward(images, prompts, ocr_text=["h", "", "hi"]) == pytest.approx([1.0, 0.0, 0.5])


def test_a_missing_local_checkpoint_is_named(tmp_path):
    pytest.importorskip("doctr")
    missing = str(tmp_path / "no_such_ocr")
    with pytest.raises(FileNotFoundError, match="no_such_ocr"):
        get_reward("ocr", checkpoint=missing)([Image.new("RGB", (64, 64))], ['"a"'])


def test_one_training_step_with_the_ocr_reward(reads_h, make_config):
    # Every target is "h" plus one other letter: one insertion from the "h" read, so every reward is 1/2.
    dataset = Dataset.from_dict({"prompt": [f'a shop sign that says "h{letter}"' for letter in "abcdefgijklmnopq"]})
    config = make_config(max_steps=1, per_device_train_batch_size=4, num_generations=4, num_inference_steps=2)
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", get_reward("ocr", checkpoint=reads_h), args=config, train_dataset=dataset
    )
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["rewards/ocr/mean"] == pytest.approx(0.5)
    assert math.isfinite(log["loss"])
