"""GenEval: the rules on synthetic detections, the prompt sets, and the reward on tiny random models."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from reward_models import save_tiny_clip
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

from trl_nft import DiffusionNFTTrainer, get_reward
from trl_nft.prompt_formats import GENEVAL_CLASSES, GENEVAL_COLORS, GENEVAL_TASKS, parse_metadata
from trl_nft.prompts.geneval import geneval_prompts, load_geneval_metadata
from trl_nft.rewards.geneval import (
    Detection,
    color_crop,
    color_queries,
    detection_threshold,
    geneval_correct,
    geneval_partial_score,
    geneval_summary,
    instance_detections,
    keep_detections,
    relative_position,
)


def det(label, score, box=(0, 0, 10, 10), color=None):
    return Detection(label, score, box, color=color)


POSITION = {
    "tag": "position",
    "include": [{"class": "bench", "count": 1}, {"class": "cow", "count": 1, "position": ["left of", 0]}],
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [{"class": "cow", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}],
}
TWO_COWS = {
    "tag": "counting",
    "include": [{"class": "cow", "count": 2}],
    "exclude": [{"class": "cow", "count": 3}],
}


# ---------------------------------------------------------------------- rules


def test_keep_detections_thresholds_sorts_and_caps_per_class():
    detections = [det("cow", 0.5), det("cow", 0.95), det("cow", 0.3), det("bench", 0.2), det("cow", 0.91)]
    kept = keep_detections(detections, threshold=0.3)
    assert list(kept) == ["cow"]  # the bench is below 0.3, and a score of exactly 0.3 does not pass
    assert [d.score for d in kept["cow"]] == [0.95, 0.91, 0.5]
    assert [d.score for d in keep_detections(detections, threshold=0.9)["cow"]] == [0.95, 0.91]
    many = [det("cow", 0.31 + i / 100) for i in range(20)]
    assert [d.score for d in keep_detections(many, 0.3)["cow"]] == [0.31 + i / 100 for i in range(19, 3, -1)]


def test_counting_uses_the_0_9_threshold_and_its_exclude_clause():
    assert detection_threshold("counting") == 0.9
    assert {detection_threshold(tag) for tag in GENEVAL_TASKS if tag != "counting"} == {0.3}
    detections = [det("cow", 0.95), det("cow", 0.6)]
    # At 0.9 one cow is kept: strict fails, partial credit 1 - |2 - 1| / 2.
    counted = keep_detections(detections, detection_threshold("counting"))
    assert geneval_correct(counted, TWO_COWS) is False
    assert geneval_partial_score(counted, TWO_COWS) == 0.5
    # The same image judged at 0.3 would count two.
    assert geneval_correct(keep_detections(detections, 0.3), TWO_COWS) is True
    # Three confident cows: the two asked are there but "fewer than three" is violated; partial 1 - 1/2.
    three = keep_detections([det("cow", 0.95), det("cow", 0.94), det("cow", 0.93)], 0.9)
    assert geneval_correct(three, TWO_COWS) is False
    assert geneval_partial_score(three, TWO_COWS) == 0.5


@pytest.mark.parametrize(
    ("box_a", "box_b", "expected"),
    [
        ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),
        ((30, 0, 40, 10), (0, 0, 10, 10), {"right of"}),
        ((0, 0, 10, 10), (0, 30, 10, 40), {"above"}),
        ((0, 30, 10, 40), (0, 0, 10, 10), {"below"}),
        # Offset 1.5 px < margin 0.1 * (10 + 10) px: no relation.
        ((0, 0, 10, 10), (1.5, 0, 11.5, 10), set()),
        # Offset (-10, -9), margin 2 on each axis: (-8, -7) / |(-10, -9)| = (-0.595, -0.520): both.
        ((0, 0, 10, 10), (10, 9, 20, 19), {"left of", "above"}),
        # Offset (-10, -4): (-8, -2) / 10.77 = (-0.743, -0.186): only left of.
        ((0, 0, 10, 10), (10, 4, 20, 14), {"left of"}),
    ],
)
def test_relative_position_uses_centres_and_the_margin(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_relative_position_margin_is_a_share_of_the_box_sizes():
    # Offset 1.5 px: no relation with the 2 px margin, "left of" without a margin.
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10), margin=0.0) == {"left of"}
    # Boxes 20 px wide, offset 5: 5 - 0.1 * 40 = 1 px beyond the margin, direction (-1/5, 0): not > 0.5.
    assert relative_position((0, 0, 20, 10), (5, 0, 25, 10)) == set()


def test_position_prompt_strict_and_partial_credit():
    left = {"bench": [det("bench", 0.9, (30, 0, 40, 10))], "cow": [det("cow", 0.9, (0, 0, 10, 10))]}
    assert geneval_correct(left, POSITION) is True
    assert geneval_partial_score(left, POSITION) == 1.0
    # Inside the margin: the relation fails; credits bench 1, cow 1, then 0 and 1 for the position check.
    close = {"bench": [det("bench", 0.9, (1.5, 0, 11.5, 10))], "cow": [det("cow", 0.9, (0, 0, 10, 10))]}
    assert geneval_correct(close, POSITION) is False
    assert geneval_partial_score(close, POSITION) == 0.75
    assert geneval_correct(close, POSITION, margin=0.0) is True
    # No bench: bench credit 1 - 1/1 = 0, cow 1, the position has no target: 0.
    alone = {"cow": [det("cow", 0.9)]}
    assert geneval_correct(alone, POSITION) is False
    assert geneval_partial_score(alone, POSITION) == pytest.approx(1 / 3)


def test_color_attribution_reads_the_most_confident_objects():
    right = {"cow": [det("cow", 0.9, color="red")], "bench": [det("bench", 0.8, color="blue")]}
    assert geneval_correct(right, COLOR_ATTR) is True
    assert geneval_partial_score(right, COLOR_ATTR) == 1.0
    # Colours swapped between the objects: credits cow 1, 0 and bench 1, 0.
    swapped = {"cow": [det("cow", 0.9, color="blue")], "bench": [det("bench", 0.8, color="red")]}
    assert geneval_correct(swapped, COLOR_ATTR) is False
    assert geneval_partial_score(swapped, COLOR_ATTR) == 0.5
    # Two cows, the more confident one blue: GenEval reads only it (fails); partial credit: cow 1 - 1/1 = 0 plus a
    # 0 for the colour it cannot check, bench 1 and 1.
    two_cows = {
        "cow": [det("cow", 0.9, color="blue"), det("cow", 0.5, color="red")],
        "bench": [det("bench", 0.8, color="blue")],
    }
    assert geneval_correct(two_cows, COLOR_ATTR) is False
    assert geneval_partial_score(two_cows, COLOR_ATTR) == 0.5
    assert color_queries(two_cows, COLOR_ATTR) == [two_cows["cow"][0], two_cows["bench"][0]]


def test_color_clause_without_named_colours_is_an_error():
    with pytest.raises(ValueError, match="colour"):
        geneval_correct({"cow": [det("cow", 0.9)], "bench": [det("bench", 0.9)]}, COLOR_ATTR)


def test_exclusions_count_in_strict_correctness_only():
    metadata = {
        "tag": "single_object",
        "include": [{"class": "cow", "count": 1}],
        "exclude": [{"class": "bench", "count": 1}],
    }
    objects = {"cow": [det("cow", 0.9)], "bench": [det("bench", 0.5)]}
    assert geneval_correct(objects, metadata) is False
    assert geneval_partial_score(objects, metadata) == 1.0


def test_partial_credit_on_object_counts():
    single = {"tag": "single_object", "include": [{"class": "cow", "count": 1}]}
    two = {"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "bench", "count": 1}]}
    cows = {"cow": [det("cow", 0.9), det("cow", 0.8), det("cow", 0.7)]}
    # GenEval asks for at least one cow; the partial credit penalises extra ones: 1 - |1 - 3| / 1.
    assert geneval_correct(cows, single) is True
    assert geneval_partial_score(cows, single) == -1.0
    assert geneval_partial_score({}, single) == 0.0
    one_of_two = {"cow": [det("cow", 0.9)]}
    assert geneval_correct(one_of_two, two) is False
    assert geneval_partial_score(one_of_two, two) == 0.5
    three_cows = {
        "tag": "counting",
        "include": [{"class": "cow", "count": 3}],
        "exclude": [{"class": "cow", "count": 4}],
    }
    assert geneval_partial_score({"cow": [det("cow", 0.95)] * 2}, three_cows) == pytest.approx(2 / 3)


def test_geneval_summary_averages_tasks_not_images():
    scores = [1, 0, 1, 1, 0, 0, True, None]
    tags = ["single_object"] * 4 + ["counting"] * 2 + ["position", "position"]
    summary = geneval_summary(scores, tags)
    assert summary == {
        "single_object": 0.75,
        "counting": 0.0,
        "position": 1.0,
        "overall": pytest.approx((0.75 + 0.0 + 1.0) / 3),
    }
    assert list(summary) == ["single_object", "counting", "position", "overall"]
    with pytest.raises(ValueError):
        geneval_summary([1.0], ["counting", "colors"])


@pytest.mark.parametrize(
    "metadata",
    [
        {"tag": "single_object", "include": [{"class": "mouse", "count": 1}]},  # COCO's name, not GenEval's
        {"tag": "count", "include": [{"class": "cow", "count": 2}]},
        {"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "teal"}]},
        {"tag": "position", "include": [{"class": "cow", "count": 1, "position": ["left of", 0]}]},
        {"tag": "counting", "include": [{"class": "cow", "count": 0}]},
        {"tag": "single_object", "include": []},
    ],
)
def test_parse_metadata_rejects_malformed_records(metadata):
    with pytest.raises(ValueError, match="GenEval metadata"):
        parse_metadata(json.dumps(metadata))


def test_instance_detections_follow_mmdetection_post_processing():
    labels = ["cow", "bench", None]  # class 2 is not a GenEval class
    class_logits = torch.tensor(
        [
            [4.0, 0.0, 0.0, 0.0],  # cow
            [0.0, 3.0, 0.0, 0.0],  # bench, with a mask only in the padding
            [0.0, 0.0, 5.0, 0.0],  # unknown class: skipped
        ]
    )
    # Model input 4 x 6 of which the right 2 columns are padding; the image is 8 x 8.
    mask_logits = torch.full((3, 4, 6), -200.0)
    mask_logits[:, :, 4:] = 200.0
    mask_logits[0, :2, :2] = 200.0
    detections = instance_detections(
        class_logits, mask_logits, labels, image_size=(8, 8), input_size=(4, 6), valid_size=(4, 4), min_score=0.3
    )
    assert [d.label for d in detections] == ["cow", "bench"]
    cow, bench = detections
    # Bilinear x2 upsampling of a 2 x 2 block keeps the logit positive on output pixels 0..3 of each axis.
    assert cow.box == (0.0, 0.0, 4.0, 4.0)
    assert cow.mask.shape == (8, 8) and cow.mask.sum() == 16 and cow.mask[:4, :4].all()
    # Score: class probability times the mean sigmoid over the mask (~1 for logits >= 25).
    assert cow.score == pytest.approx(math.exp(4) / (math.exp(4) + 3), rel=1e-6)
    assert bench.score == 0.0 and not bench.mask.any()
    # Candidates whose class probability cannot pass `min_score` are skipped.
    # (the cow's 0.948 here; the unknown class would pass but is not a GenEval class).
    assert instance_detections(class_logits, mask_logits, labels, (8, 8), (4, 6), (4, 4), min_score=0.95) == []


def test_color_crop_greys_out_the_background_and_crops_to_the_box():
    image = Image.new("RGB", (8, 6), (255, 0, 0))
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:4] = True
    crop = color_crop(image, Detection("cow", 0.9, (2.0, 1.0, 5.0, 4.0), mask))
    pixels = np.asarray(crop)
    assert pixels.shape == (3, 3, 3)
    assert (pixels[:2, :2] == (255, 0, 0)).all()
    assert (pixels[2, :] == (153, 153, 153)).all() and (pixels[:, 2] == (153, 153, 153)).all()


# ---------------------------------------------------------------------- prompt sets


def _check_record(prompt: str, tag: str, metadata: str) -> dict:
    record = parse_metadata(metadata)
    assert record["tag"] == tag and record["prompt"] == prompt
    for clause in record["include"]:
        assert clause["class"] in prompt or clause["class"] + "s" in prompt
        if "color" in clause:
            assert f"{clause['color']} {clause['class']}" in prompt and clause["class"] != "person"
        if "position" in clause:
            relation, target = clause["position"]
            assert f" {relation} " in prompt and target == 0
    return record


def test_generated_prompts_are_valid_for_every_task():
    dataset = geneval_prompts(num_prompts=120, seed=1)
    assert dataset.column_names == ["prompt", "tag", "metadata"]
    assert dataset["tag"] == [GENEVAL_TASKS[i % 6] for i in range(120)]
    for prompt, tag, metadata in zip(dataset["prompt"], dataset["tag"], dataset["metadata"], strict=True):
        record = _check_record(prompt, tag, metadata)
        expected_clauses = {"single_object": 1, "two_object": 2, "counting": 1, "colors": 1, "position": 2}
        assert len(record["include"]) == expected_clauses.get(tag, 2)
        if tag == "counting":
            (clause,) = record["include"]
            assert 2 <= clause["count"] <= 4
            assert record["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
            assert prompt.startswith(f"a photo of {['two', 'three', 'four'][clause['count'] - 2]} ")
        if tag in ("two_object", "position", "color_attr"):
            assert record["include"][0]["class"] != record["include"][1]["class"]
        if tag == "color_attr":
            assert record["include"][0]["color"] != record["include"][1]["color"]


def test_generated_prompts_are_reproducible_under_a_seed():
    assert geneval_prompts(num_prompts=30, seed=3).to_dict() == geneval_prompts(num_prompts=30, seed=3).to_dict()
    assert geneval_prompts(num_prompts=30, seed=3)["prompt"] != geneval_prompts(num_prompts=30, seed=4)["prompt"]
    counting = geneval_prompts(num_prompts=10, tasks=["counting"])
    assert set(counting["tag"]) == {"counting"}
    with pytest.raises(ValueError, match="tasks"):
        geneval_prompts(tasks=["spatial"])


def test_suite_with_seed_43_is_the_official_evaluation_suite():
    # Sizes and each task's first prompt of GenEval's prompts/evaluation_metadata.jsonl.
    suite = geneval_prompts(seed=43)
    assert len(suite) == 553
    assert Counter(suite["tag"]) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    assert suite["prompt"][:3] == ["a photo of a bench", "a photo of a cow", "a photo of a bicycle"]
    first = {}
    for prompt, tag in zip(suite["prompt"], suite["tag"], strict=True):
        first.setdefault(tag, prompt)
    assert first == {
        "single_object": "a photo of a bench",
        "two_object": "a photo of a bench and a sports ball",
        "counting": "a photo of two clocks",
        "colors": "a photo of a blue fire hydrant",
        "position": "a photo of a dog right of a teddy bear",
        "color_attr": "a photo of a purple wine glass and a black apple",
    }
    assert len(set(suite["metadata"])) == 553
    assert sorted(suite["prompt"][:80]) == sorted(
        f"a photo of a{'n' * (c[0] in 'aeiou')} {c}" for c in GENEVAL_CLASSES
    )


OFFICIAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], '
    '"prompt": "a photo of two clocks"}',
    '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": '
    '["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}',
    '{"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"}, {"class": "apple", '
    '"count": 1, "color": "black"}], "prompt": "a photo of a purple wine glass and a black apple"}',
]


def test_load_geneval_metadata_reads_the_official_format(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(OFFICIAL_LINES) + "\n\n")
    dataset = load_geneval_metadata(str(path))
    assert dataset.column_names == ["prompt", "tag", "metadata"]
    assert dataset["tag"] == ["single_object", "counting", "position", "color_attr"]
    assert [json.loads(m) for m in dataset["metadata"]] == [json.loads(line) for line in OFFICIAL_LINES]
    assert dataset["prompt"][2] == "a photo of a dog right of a teddy bear"
    # The generator writes the same records as the official file.
    suite = geneval_prompts(seed=43)
    assert set(dataset["metadata"]) <= {json.dumps(json.loads(m)) for m in suite["metadata"]}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        OFFICIAL_LINES[0]
        + "\n"
        + '{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "teal"}], "prompt": "x"}\n'
    )
    with pytest.raises(ValueError, match="line 2"):
        load_geneval_metadata(str(bad))
    with pytest.raises(FileNotFoundError):
        load_geneval_metadata(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------- reward on tiny models


# Detector names as COCO spells them (GenEval renames "mouse", "remote", "keyboard"), to exercise the mapping.
COCO_NAMES = [
    {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(c, c)
    for c in GENEVAL_CLASSES
]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny Mask2Former (2 queries) whose every query finds a whole-image "cow" with score ~1, and a tiny CLIP."""
    root = tmp_path_factory.mktemp("geneval")
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        num_queries=2,
        encoder_layers=1,
        decoder_layers=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        num_attention_heads=2,
        id2label=dict(enumerate(COCO_NAMES)),
        label2id={name: i for i, name in enumerate(COCO_NAMES)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        # Class logits: "cow" by 20 nats for every query.
        detector.class_predictor.weight.zero_()
        detector.class_predictor.bias.zero_()
        detector.class_predictor.bias[COCO_NAMES.index("cow")] = 20.0
        # Mask logits = query embedding . pixel embedding = 50 everywhere (constant pixel embedding e_0).
        projection = detector.model.pixel_level_module.decoder.mask_projection
        projection.weight.zero_()
        projection.bias.zero_()
        projection.bias[0] = 1.0
        embedder = detector.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[-1].layers[0]
        embedder.weight.zero_()
        embedder.bias.zero_()
        embedder.bias[0] = 50.0
    detector.save_pretrained(root / "detector")
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(root / "detector")
    return str(root / "detector"), save_tiny_clip(root / "clip")


def _metadata(tag, *include, exclude=None):
    record = {"tag": tag, "include": list(include), **({"exclude": exclude} if exclude else {})}
    return json.dumps(record)


def test_reward_on_tiny_models_strict_and_partial(tiny_checkpoints):
    detector, clip = tiny_checkpoints
    rows = [
        _metadata("single_object", {"class": "cow", "count": 1}),
        _metadata("single_object", {"class": "bench", "count": 1}),
        _metadata("counting", {"class": "cow", "count": 2}, exclude=[{"class": "cow", "count": 3}]),
        _metadata("counting", {"class": "cow", "count": 3}, exclude=[{"class": "cow", "count": 4}]),
        None,
    ] + [_metadata("colors", {"class": "cow", "count": 1, "color": color}) for color in GENEVAL_COLORS]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(len(rows) - 10)]
    images += [images[0]] * 10  # the colour prompts score one image
    prompts = ["a photo"] * len(rows)
    partial = get_reward("geneval", checkpoint=detector, clip_checkpoint=clip, batch_size=8)
    strict = get_reward("geneval", checkpoint=detector, clip_checkpoint=clip, strict=True)
    partial_scores = partial(images, prompts, metadata=rows)
    strict_scores = strict(images, prompts, metadata=rows)
    # The detector sees two cows (score ~1 > 0.9) in every image.
    assert strict_scores[:5] == [1.0, 0.0, 1.0, 0.0, None]
    assert partial_scores[:5] == [0.0, 0.0, 1.0, pytest.approx(2 / 3), None]  # one cow asked, two found: 1 - 1/1
    # CLIP names one colour for the most confident cow: exactly one colour prompt holds.
    assert sorted(strict_scores[5:]) == [0.0] * 9 + [1.0]
    assert partial_scores[5:] == [0.0] * 10  # two cows for one asked: count credit 0, colour not checked


def test_colour_crops_are_preprocessed_as_genevals_open_clip_transform(tiny_checkpoints):
    """GenEval names colours with open_clip's `ViT-L-14` `openai` weights and their evaluation transform: bicubic PIL
    resize of the shorter side, torchvision's center crop (offsets rounded to nearest), RGB, `ToTensor`, `Normalize`
    with OpenAI's mean and std (not transformers' CLIP processor)."""
    from torchvision import transforms

    detector, clip = tiny_checkpoints
    reward = get_reward("geneval", checkpoint=detector, clip_checkpoint=clip)
    rng = np.random.default_rng(1)
    # Whole-image detections: the crops are the images. Long sides resized to 71 and 45 leave odd margins to crop.
    images = [
        Image.fromarray(rng.integers(0, 256, (45, 100, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 45, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (40, 64), dtype=np.uint8), mode="L"),
    ]
    metadata = [_metadata("colors", {"class": "cow", "count": 1, "color": "red"})] * len(images)
    reward(images[:1], ["a photo"], metadata=metadata[:1])  # loads the models
    received = []
    reward._models["clip"].vision_model.register_forward_pre_hook(
        lambda _, args, kwargs: received.append(kwargs["pixel_values"].clone()), with_kwargs=True
    )
    reward(images, ["a photo"] * len(images), metadata=metadata)
    size = reward._models["clip"].config.vision_config.image_size
    transform = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    expected = torch.stack([transform(image.convert("RGB")) for image in images])
    torch.testing.assert_close(torch.cat(received), expected, rtol=0, atol=1e-6)


def test_reward_needs_metadata_and_existing_checkpoints(tiny_checkpoints, tmp_path):
    detector, clip = tiny_checkpoints
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="metadata"):
        get_reward("geneval", checkpoint=detector, clip_checkpoint=clip)([image], ["a photo of a cow"])
    missing = str(tmp_path / "no-detector")
    reward = get_reward("geneval", checkpoint=missing, clip_checkpoint=clip)
    with pytest.raises(FileNotFoundError, match="no-detector"):
        reward([image], ["a photo of a cow"], metadata=[_metadata("single_object", {"class": "cow", "count": 1})])


def test_one_training_step_with_the_geneval_reward(tiny_checkpoints, make_config):
    detector, clip = tiny_checkpoints
    reward = get_reward("geneval", checkpoint=detector, clip_checkpoint=clip)
    config = make_config(max_steps=1, per_device_train_batch_size=4, num_generations=4, num_inference_steps=2)
    suite = geneval_prompts(seed=43).select(range(0, 553, 50))  # the official suite, a dozen prompts of every task
    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        reward,
        args=config,
        train_dataset=geneval_prompts(num_prompts=12),
        eval_dataset=suite,
        eval_reward_funcs=get_reward("geneval", checkpoint=detector, clip_checkpoint=clip, strict=True),
    )
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert -14.0 <= log["rewards/geneval/mean"] <= 1.0 and math.isfinite(log["loss"])
    metrics = trainer.evaluate()
    tasks = sorted(set(suite["tag"]))
    per_task = {tag: metrics[f"eval_rewards/geneval_strict/{tag}"] for tag in tasks}
    assert all(0.0 <= value <= 1.0 for value in per_task.values())
    assert metrics["eval_rewards/geneval_strict/overall"] == pytest.approx(sum(per_task.values()) / len(tasks))
