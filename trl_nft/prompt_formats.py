"""What prompt columns hold, shared by the prompt sets that write them (`trl_nft.prompts`) and the rewards that read
them (`trl_nft.rewards`): GenEval's metadata records (the `metadata` column of the `geneval` reward) and the text an OCR
prompt asks for between double quotes (the `ocr` reward). A leaf module, so that neither package imports the other."""

import json
import re


GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's `object_names.txt`: the 80 COCO classes in COCO order, with "mouse", "remote" and "keyboard" renamed.
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_POSITIONS = ("left of", "right of", "above", "below")
_QUOTED = re.compile(r'"([^"]*)"')


def parse_metadata(value: str | dict | None) -> dict | None:
    """A row's GenEval record from its `metadata` value (a JSON string or a dict; None stays None), checked: known
    tag, classes, colours and relations, counts >= 1, position targets that point to an earlier include clause."""
    if value is None:
        return None
    record = json.loads(value) if isinstance(value, str) else value
    if not isinstance(record, dict) or record.get("tag") not in GENEVAL_TASKS or not record.get("include"):
        raise ValueError(
            f"GenEval metadata needs a 'tag' (one of {GENEVAL_TASKS}) and a non-empty 'include' list, got {value!r}."
        )
    for index, clause in enumerate(record["include"] + record.get("exclude", [])):
        if clause.get("class") not in GENEVAL_CLASSES:
            raise ValueError(f"GenEval metadata: unknown class {clause.get('class')!r} (not a GenEval COCO class).")
        if not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise ValueError(f"GenEval metadata: 'count' must be an integer >= 1, got {clause.get('count')!r}.")
        if "color" in clause and clause["color"] not in GENEVAL_COLORS:
            raise ValueError(f"GenEval metadata: unknown colour {clause['color']!r}; one of {GENEVAL_COLORS}.")
        if "position" in clause:
            relation, target = clause["position"]
            if relation not in GENEVAL_POSITIONS or not 0 <= target < index:
                raise ValueError(
                    f"GenEval metadata: 'position' must be [relation in {GENEVAL_POSITIONS}, index of an earlier "
                    f"include clause], got {clause['position']!r}."
                )
    return record


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes in `prompt` (`'a sign saying "Open"'` -> `'Open'`), or None
    when the prompt has no such pair or only spaces between the quotes: there is then no text to read."""
    match = _QUOTED.search(prompt)
    if match is None or not normalize_text(match.group(1)):
        return None
    return match.group(1)


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalisation of OCR text: lowercase, spaces removed (other whitespace kept)."""
    return text.replace(" ", "").lower()
