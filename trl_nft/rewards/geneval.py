"""GenEval (Ghosh et al., 2023): object-focused compositional rewards from an instance segmenter and CLIP.

A GenEval prompt comes with metadata (`tag`, `include` clauses, optional `exclude` clauses) that say which COCO objects
the image must show, how many, in which colour and where relative to each other. An instance segmenter (Mask2Former,
COCO) finds the objects; CLIP ViT-L/14 zero-shot names the colour of each object that a clause asks about; pure rules
then check the clauses. The rules below follow `evaluation/evaluate_images.py` of djghosh13/geneval (strict 0/1
correctness, the published metric) and the GenEval reward server of Flow-GRPO (partial credit, the training reward of
Flow-GRPO and DiffusionNFT), and are kept apart from the models so that they can be tested on synthetic detections.

Metadata column: `metadata`, one JSON string per row holding GenEval's record, exactly a line of the official
`evaluation_metadata.jsonl`, e.g. `{"tag": "position", "include": [{"class": "bench", "count": 1}, {"class": "cow",
"count": 1, "position": ["left of", 0]}], "prompt": "a photo of a cow left of a bench"}`. `position` is `[relation,
index of the include clause it is relative to]`. A row whose `metadata` is None gets None (not applicable).
`trl_nft.prompts.geneval` builds such datasets.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..prompt_formats import GENEVAL_CLASSES, GENEVAL_COLORS, parse_metadata
from . import RewardModel, register_reward, resolve_checkpoint
from .clip import openai_clip_pixels


# COCO label names (as detectors' `id2label` spell them) that GenEval renames.
_COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
# CLIP prompts of GenEval's colour classifier; "{c}" is the colour, "{obj}" the class.
_COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
_BACKGROUND = "#999"  # GenEval paints the pixels outside an object's mask grey before naming its colour

THRESHOLD = 0.3  # detection score a kept object must exceed
COUNTING_THRESHOLD = 0.9  # the same for `counting` prompts, so that counts are not inflated by doubtful detections
MAX_OBJECTS = 16  # most confident detections kept per class
POSITION_MARGIN = 0.1  # share of the two boxes' summed size that a centre offset must exceed to count


@dataclass(eq=False)  # compared by identity (a mask is an array)
class Detection:
    """One detected object: its GenEval class `label`, confidence `score`, `box` `(x1, y1, x2, y2)` in pixels (x2 and y2
    exclusive), optional boolean `mask` `[H, W]`, and the `color` CLIP named (set only for objects a clause asks
    about)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


# ---------------------------------------------------------------------- rules (pure)


def detection_threshold(tag: str) -> float:
    """The score a detection must exceed: 0.9 for `counting` prompts, 0.3 otherwise (GenEval's defaults)."""
    return COUNTING_THRESHOLD if tag == "counting" else THRESHOLD


def keep_detections(
    detections: Sequence[Detection], threshold: float, max_objects: int = MAX_OBJECTS
) -> dict[str, list[Detection]]:
    """GenEval's kept objects per class: score strictly above `threshold`, most confident first, at most `max_objects`.

    GenEval's optional per-class NMS (`max_overlap`) defaults to 1.0, i.e. off, and is not applied."""
    objects: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score > threshold:
            found = objects.setdefault(detection.label, [])
            if len(found) < max_objects:
                found.append(detection)
    return objects


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_MARGIN) -> set[str]:
    """Where box A lies relative to box B, GenEval's rule (image y grows downwards).

    With centre offset `d = c_A - c_B` and box sizes `s = (w, h)`, the offset beyond the margin is
    `r = sign(d) * max(|d| - margin * (s_A + s_B), 0)` per axis; if `|r| < 1e-3` on both axes there is no relation,
    else with `(dx, dy) = r / ||d||`: "left of" if dx < -0.5, "right of" if dx > 0.5, "above" if dy < -0.5, "below"
    if dy > 0.5 (several can hold).
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in relations.items() if holds}


def _color_count(found: list[Detection], color: str) -> int:
    if any(detection.color is None for detection in found):
        raise ValueError("GenEval: a colour clause needs the colour of its objects (Detection.color) set.")
    return sum(detection.color == color for detection in found)


def _position_holds(found: list[Detection], targets: list[Detection], relation: str, margin: float) -> bool:
    return all(relation in relative_position(obj.box, target.box, margin) for obj in found for target in targets)


def geneval_correct(objects: dict[str, list[Detection]], metadata: dict, margin: float = POSITION_MARGIN) -> bool:
    """GenEval's strict correctness of one image (`evaluate` in GenEval's `evaluate_images.py`), the published metric.

    `objects` are the kept detections per class (`keep_detections`). Every include clause must hold (AND) and no
    exclude clause may (OR). An include clause `{class, count, color?, position?}` takes the `count` most confident
    objects of its class and holds when there are `count` of them, all of them have `color` if one is asked, and each
    is in relation `position[0]` to each object of include clause `position[1]` (which must itself have held). An
    exclude clause `{class, count}` is violated when at least `count` objects of its class were kept.
    """
    correct = True
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        found = objects.get(clause["class"], [])[: clause["count"]]
        matched = len(found) == clause["count"]
        if matched and "color" in clause:
            matched = _color_count(found, clause["color"]) == clause["count"]
        if matched and "position" in clause:
            relation, target = clause["position"]
            targets = matched_groups[target]
            matched = targets is not None and _position_holds(found, targets, relation, margin)
        correct &= matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        correct &= len(objects.get(clause["class"], [])) < clause["count"]
    return correct


def geneval_partial_score(
    objects: dict[str, list[Detection]], metadata: dict, margin: float = POSITION_MARGIN
) -> float:
    """Partial credit of one image: the mean of per-check credits, as the GenEval reward server of Flow-GRPO computes
    its `score` (the training reward of Flow-GRPO and DiffusionNFT on GenEval). Exclude clauses are not read.

    For each include clause with `c = count` and `n` kept objects of its class:

    - count credit `1 - |c - n| / c` (1 for the exact count; negative when n > 2c, e.g. -1 for 3 objects asked 1);
    - if `n != c` and the clause asks a colour or a position: one more credit 0;
    - else, if it asks a colour: `1 - |c - m| / c` with `m` the objects of that colour; the clause fails if `m != c`;
    - then, if it asks a position and has not failed: 0 if the target clause failed; else 1 if every object is in the
      relation to every target object, and if not, a 0 *and* a 1 (Flow-GRPO appends 1 after the check whatever its
      outcome), i.e. credits `[0, 1]`.

    The score is the mean of all credits, e.g. a position prompt with both objects found once: 1.0 if the relation
    holds, 0.75 (credits 1, 1, 0, 1) if not.
    """
    credits: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        count, found = clause["count"], objects.get(clause["class"], [])
        credits.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in clause or "position" in clause:
                credits.append(0.0)
        else:
            if "color" in clause:
                colored = _color_count(found, clause["color"])
                credits.append(1 - abs(count - colored) / count)
                matched = colored == count
            if "position" in clause and matched:
                relation, target = clause["position"]
                targets = matched_groups[target]
                if targets is None:
                    matched = False
                    credits.append(0.0)
                else:
                    if not _position_holds(found, targets, relation, margin):
                        matched = False
                        credits.append(0.0)
                    credits.append(1.0)
        matched_groups.append(found if matched else None)
    return sum(credits) / len(credits)


def color_queries(objects: dict[str, list[Detection]], metadata: dict) -> list[Detection]:
    """The objects whose colour the clauses read: the `count` most confident objects of each include clause that asks
    a colour, when at least `count` were kept (both rules look at no others)."""
    queries: list[Detection] = []
    for clause in metadata["include"]:
        found = objects.get(clause["class"], [])
        if "color" in clause and len(found) >= clause["count"]:
            queries += [detection for detection in found[: clause["count"]] if detection not in queries]
    return queries


def geneval_summary(strict_scores: Sequence[float | bool | None], tags: Sequence[str]) -> dict[str, float]:
    """GenEval's report from per-image strict scores (0/1) and the images' tags: the accuracy of each task (in the
    order tasks first appear) and `"overall"`, the mean over tasks of the task accuracies (GenEval's reported score,
    not the mean over images). Images scored None are left out."""
    if len(strict_scores) != len(tags):
        raise ValueError(f"geneval_summary: {len(strict_scores)} scores for {len(tags)} tags.")
    per_task: dict[str, list[float]] = {}
    for score, tag in zip(strict_scores, tags, strict=True):
        if score is not None:
            per_task.setdefault(tag, []).append(float(score))
    if not per_task:
        raise ValueError("geneval_summary: no scored image.")
    summary = {tag: sum(scores) / len(scores) for tag, scores in per_task.items()}
    summary["overall"] = sum(summary.values()) / len(summary)
    return summary


# ---------------------------------------------------------------------- detection post-processing


def instance_detections(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    labels: Sequence[str | None],
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    valid_size: tuple[int, int],
    min_score: float = 0.0,
) -> list[Detection]:
    """Instance detections of one image from Mask2Former's outputs, as mmdetection's Mask2Former post-processing
    (the detector GenEval runs) makes them.

    Class probabilities `softmax(class_logits)` without the no-object class; the `num_queries` best (query, class)
    pairs are candidates. Each candidate's mask logits are resized (bilinear) to the model input `input_size`, cropped
    to the unpadded `valid_size` and resized to the image `image_size` (height, width); the mask is `logits > 0`, its
    box spans the mask's pixels, and the score is `class probability * mean(sigmoid(logits) over the mask)`.
    Candidates whose class probability is at most `min_score` cannot score above it and are skipped; so are classes
    whose entry in `labels` (class index -> GenEval class) is None.
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    num_queries, num_classes = probs.shape
    scores, indices = probs.flatten().topk(num_queries)
    keep = scores > min_score
    scores, queries, classes = scores[keep], indices[keep] // num_classes, indices[keep] % num_classes
    known = torch.tensor([labels[c] is not None for c in classes.tolist()], dtype=torch.bool, device=scores.device)
    scores, queries, classes = scores[known], queries[known], classes[known]
    if len(scores) == 0:
        return []
    masks = F.interpolate(mask_logits[queries].float()[None], size=input_size, mode="bilinear", align_corners=False)
    masks = masks[..., : valid_size[0], : valid_size[1]]
    masks = F.interpolate(masks, size=image_size, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    detections = []
    for score, label, mask in zip(
        (scores * mask_scores).tolist(), classes.tolist(), binary.cpu().numpy(), strict=True
    ):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if len(rows) else (0, 0, 0, 0)
        detections.append(Detection(labels[label], score, tuple(float(v) for v in box), mask))
    return detections


def _geneval_label(name: str) -> str | None:
    """The GenEval class a detector label names (COCO's "mouse" is GenEval's "computer mouse"...), or None."""
    name = _COCO_TO_GENEVAL.get(name, name)
    return name if name in GENEVAL_CLASSES else None


def color_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """What CLIP sees to name an object's colour (GenEval's `ImageCrops`): the image with the pixels outside the mask
    painted grey, cropped to the box."""
    if detection.mask is not None:
        image = Image.composite(image, Image.new("RGB", image.size, _BACKGROUND), Image.fromarray(detection.mask))
    return image.crop(detection.box)


# ---------------------------------------------------------------------- reward


@register_reward("geneval")
class GenEval(RewardModel):
    """GenEval reward: partial credit over the prompt's clauses (Flow-GRPO's training reward, in [-14, 1], 1 when every
    clause holds; see `geneval_partial_score`), or GenEval's strict 0/1 correctness with `strict=True` (see
    `geneval_correct`).

    Needs a `metadata` column (a GenEval record per row as a JSON string, see the module docstring); rows whose
    metadata is None get None. Detector: Mask2Former instance segmentation on COCO (`checkpoint`, transformers
    `Mask2FormerForUniversalSegmentation`); colours: CLIP zero-shot over GenEval's 10 colours (`clip_checkpoint`).
    """

    default_checkpoint = "facebook/mask2former-swin-small-coco-instance"
    default_clip_checkpoint = "openai/clip-vit-large-patch14"
    required_columns = ("metadata",)

    def __init__(
        self, checkpoint: str | None = None, clip_checkpoint: str | None = None, strict: bool = False, **kwargs
    ):
        super().__init__(checkpoint, **kwargs)
        self.clip_checkpoint = clip_checkpoint or self.default_clip_checkpoint
        self.strict = strict
        if strict:  # logged apart from the training reward: eval_rewards/geneval_strict/...
            self.name = self.__name__ = "geneval_strict"

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.clip_checkpoint)

    def load(self) -> dict:
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            CLIPModel,
            Mask2FormerForUniversalSegmentation,
        )

        checkpoint = resolve_checkpoint(self.checkpoint, "GenEval detector")
        clip_checkpoint = resolve_checkpoint(self.clip_checkpoint, "GenEval colour CLIP")
        detector = Mask2FormerForUniversalSegmentation.from_pretrained(checkpoint, dtype=self.dtype)
        labels = [_geneval_label(detector.config.id2label[i]) for i in range(detector.config.num_labels)]
        missing = sorted(set(GENEVAL_CLASSES) - set(labels))
        if missing:
            raise ValueError(f"GenEval detector {self.checkpoint!r} does not detect the GenEval classes {missing}.")
        return {
            "detector": detector.to(self.device).eval(),
            "detector_processor": AutoImageProcessor.from_pretrained(checkpoint),
            "labels": labels,
            "clip": CLIPModel.from_pretrained(clip_checkpoint, dtype=self.dtype).to(self.device).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(clip_checkpoint),
            "color_classifiers": {},  # class -> [num_colours, dim] text embeddings, built on first use
        }

    def score(self, models: dict, images: list[Image.Image], prompts: list[str], **columns) -> list[float | None]:
        if "metadata" not in columns:
            raise ValueError(
                "The geneval reward needs a `metadata` column (GenEval records as JSON strings); build the dataset "
                "with trl_nft.prompts.geneval.geneval_prompts or load_geneval_metadata."
            )
        records = [parse_metadata(value) for value in columns["metadata"]]
        images = [image.convert("RGB") for image in images]
        scored = [i for i, record in enumerate(records) if record is not None]
        objects = self._detect(models, [images[i] for i in scored], [records[i] for i in scored])
        queries = [
            (images[i], detection)
            for i, found in zip(scored, objects, strict=True)
            for detection in color_queries(found, records[i])
        ]
        self._name_colors(models, queries)
        rewards: list[float | None] = [None] * len(images)
        for i, found in zip(scored, objects, strict=True):
            rewards[i] = (
                float(geneval_correct(found, records[i])) if self.strict else geneval_partial_score(found, records[i])
            )
        return rewards

    def summary(self, scores: list[float | None], metadata: list, **columns) -> dict[str, float]:
        """Evaluation report (logged by `DiffusionNFTTrainer.evaluate`): the mean score of each task and `overall`,
        their mean; with `strict=True` these are GenEval's per-task accuracies and its overall score."""
        tags = [record["tag"] if record is not None else None for record in map(parse_metadata, metadata)]
        return geneval_summary(scores, tags)

    def _detect(
        self, models: dict, images: list[Image.Image], records: list[dict]
    ) -> list[dict[str, list[Detection]]]:
        if not images:
            return []
        inputs = models["detector_processor"](images=images, return_tensors="pt").to(self.device)
        outputs = models["detector"](
            pixel_values=inputs["pixel_values"].to(self.dtype), pixel_mask=inputs["pixel_mask"]
        )
        input_size = tuple(inputs["pixel_values"].shape[-2:])
        objects = []
        for i, (image, record) in enumerate(zip(images, records, strict=True)):
            pixel_mask = inputs["pixel_mask"][i].bool()
            valid_size = (int(pixel_mask.any(1).sum()), int(pixel_mask.any(0).sum()))
            threshold = detection_threshold(record["tag"])
            detections = instance_detections(
                outputs.class_queries_logits[i],
                outputs.masks_queries_logits[i],
                models["labels"],
                image_size=(image.height, image.width),
                input_size=input_size,
                valid_size=valid_size,
                min_score=threshold,
            )
            objects.append(keep_detections(detections, threshold))
        return objects

    def _name_colors(self, models: dict, queries: list[tuple[Image.Image, Detection]]) -> None:
        """Set `color` on each queried detection: the colour whose CLIP text embedding (mean of GenEval's templates,
        normalised) is closest to the embedding of the object's masked crop. The crops are preprocessed as GenEval's
        open_clip transform for the `openai` weights does (`openai_clip_pixels`)."""
        if not queries:
            return
        size = models["clip"].config.vision_config.image_size
        pixel_values = torch.stack(
            [openai_clip_pixels(color_crop(image, detection), size) for image, detection in queries]
        )
        features = (
            models["clip"].get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
        )
        features = F.normalize(features.float(), dim=-1)
        for (_, detection), feature in zip(queries, features, strict=True):
            classifier = self._color_classifier(models, detection.label)
            detection.color = GENEVAL_COLORS[int((classifier @ feature).argmax())]

    def _color_classifier(self, models: dict, label: str) -> torch.Tensor:
        if label not in models["color_classifiers"]:
            texts = [template.format(c=color, obj=label) for color in GENEVAL_COLORS for template in _COLOR_TEMPLATES]
            tokens = models["tokenizer"](texts, padding=True, return_tensors="pt").to(self.device)
            embeddings = models["clip"].get_text_features(**tokens).pooler_output.float()
            embeddings = F.normalize(embeddings, dim=-1).view(len(GENEVAL_COLORS), len(_COLOR_TEMPLATES), -1)
            models["color_classifiers"][label] = F.normalize(embeddings.mean(1), dim=-1)
        return models["color_classifiers"][label]
