"""GenEval prompt sets: generated with GenEval's templates, or loaded from the official `evaluation_metadata.jsonl`.

Both give a `datasets.Dataset` with the columns the `geneval` reward reads:

- `prompt`: the text, e.g. "a photo of a cow left of a bench";
- `tag`: the task, one of `GENEVAL_TASKS` (handy to group results, e.g. with `geneval_summary`);
- `metadata`: the GenEval record as a JSON string, exactly a line of the official metadata file, e.g.
  `{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
  "prompt": "a photo of two clocks"}`.
"""

import json
from collections.abc import Callable, Sequence

import numpy as np
from datasets import Dataset

from ..prompt_formats import GENEVAL_CLASSES, GENEVAL_COLORS, GENEVAL_POSITIONS, GENEVAL_TASKS, parse_metadata


_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_MAX_COUNT = 4  # counting prompts ask for 2 to 4 objects
_SUITE_SIZE = 100  # prompts per task (except single_object: every class once) in GenEval's evaluation suite
_PERSON = GENEVAL_CLASSES.index("person")  # no "[colour] person" prompts


def _with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


# One record per call, drawing from `rng` in the order of GenEval's `create_prompts.py` so that a seed gives the same
# prompts as there (seed 43 is the official evaluation suite).


def _single_object_record(index: int) -> dict:
    name = GENEVAL_CLASSES[index]
    return {
        "tag": "single_object",
        "include": [{"class": name, "count": 1}],
        "prompt": f"a photo of {_with_article(name)}",
    }


def _single_object(rng: np.random.Generator) -> dict:
    return _single_object_record(int(rng.choice(len(GENEVAL_CLASSES))))


def _two_object(rng: np.random.Generator) -> dict:
    a, b = (GENEVAL_CLASSES[i] for i in rng.choice(len(GENEVAL_CLASSES), size=2, replace=False))
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"a photo of {_with_article(a)} and {_with_article(b)}",
    }


def _counting(rng: np.random.Generator) -> dict:
    name = GENEVAL_CLASSES[rng.choice(len(GENEVAL_CLASSES))]
    count = int(rng.integers(2, _MAX_COUNT, endpoint=True))
    return {
        "tag": "counting",
        "include": [{"class": name, "count": count}],
        "exclude": [{"class": name, "count": count + 1}],
        "prompt": f"a photo of {_NUMBERS[count]} {_plural(name)}",
    }


def _not_person(index: int) -> str:
    # `index` was drawn in 1..79: shifted past "person", it names any other class.
    return GENEVAL_CLASSES[(index + _PERSON) % len(GENEVAL_CLASSES)]


def _colors(rng: np.random.Generator) -> dict:
    name = _not_person(rng.choice(len(GENEVAL_CLASSES) - 1) + 1)
    color = GENEVAL_COLORS[rng.choice(len(GENEVAL_COLORS))]
    return {
        "tag": "colors",
        "include": [{"class": name, "count": 1, "color": color}],
        "prompt": f"a photo of {_with_article(color)} {name}",
    }


def _position(rng: np.random.Generator) -> dict:
    a, b = (GENEVAL_CLASSES[i] for i in rng.choice(len(GENEVAL_CLASSES), size=2, replace=False))
    relation = GENEVAL_POSITIONS[rng.choice(len(GENEVAL_POSITIONS))]
    return {
        "tag": "position",
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {_with_article(a)} {relation} {_with_article(b)}",
    }


def _color_attr(rng: np.random.Generator) -> dict:
    a, b = (_not_person(i) for i in rng.choice(len(GENEVAL_CLASSES) - 1, size=2, replace=False) + 1)
    color_a, color_b = (GENEVAL_COLORS[i] for i in rng.choice(len(GENEVAL_COLORS), size=2, replace=False))
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}],
        "prompt": f"a photo of {_with_article(color_a)} {a} and {_with_article(color_b)} {b}",
    }


_GENERATORS: dict[str, Callable[[np.random.Generator], dict]] = {
    "single_object": _single_object,
    "two_object": _two_object,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attr": _color_attr,
}


def _to_dataset(records: list[dict]) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [record["prompt"] for record in records],
            "tag": [record["tag"] for record in records],
            "metadata": [json.dumps(record) for record in records],
        }
    )


def geneval_prompts(num_prompts: int | None = None, seed: int = 0, tasks: Sequence[str] = GENEVAL_TASKS) -> Dataset:
    """GenEval prompts with their metadata (columns `prompt`, `tag`, `metadata`), from GenEval's templates over the 80
    COCO classes, 10 colours, counts 2-4 and 4 relations (`create_prompts.py` of djghosh13/geneval).

    - `num_prompts=None`: GenEval's evaluation suite recipe, task by task in the order of `tasks`: every class once
      for `single_object`, 100 draws for each other task, duplicates dropped. With `seed=43` and all tasks this is
      the official suite (553 prompts).
    - `num_prompts=N`: N independent draws (e.g. for training), the tasks taken in turn; duplicates are kept, and
      prompts of the evaluation suite can come up (all 80 single-object prompts are in it).
    """
    unknown = [task for task in tasks if task not in GENEVAL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"geneval_prompts: tasks must be a non-empty subset of {GENEVAL_TASKS}, got {list(tasks)}.")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"geneval_prompts: num_prompts must be >= 1 or None, got {num_prompts}.")
    rng = np.random.default_rng(seed)
    if num_prompts is not None:
        return _to_dataset([_GENERATORS[tasks[i % len(tasks)]](rng) for i in range(num_prompts)])
    records = []
    for task in tasks:
        if task == "single_object":
            order = rng.choice(len(GENEVAL_CLASSES), size=len(GENEVAL_CLASSES), replace=False)
            records += [_single_object_record(int(i)) for i in order]
        else:
            records += [_GENERATORS[task](rng) for _ in range(_SUITE_SIZE)]
    unique = {json.dumps(record, sort_keys=True): record for record in records}  # first occurrence's place kept
    return _to_dataset(list(unique.values()))


def load_geneval_metadata(path: str) -> Dataset:
    """The official GenEval prompts from a local `evaluation_metadata.jsonl` (one JSON record per line, as
    `prompts/evaluation_metadata.jsonl` of djghosh13/geneval), as a dataset with columns `prompt`, `tag`, `metadata`
    (each record kept whole, in file order)."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                record = json.loads(line)
                try:
                    parse_metadata(record)
                except ValueError as error:
                    raise ValueError(f"{path}, line {number}: {error}") from None
                if not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}, line {number}: the record has no 'prompt'.")
                records.append(record)
    if not records:
        raise ValueError(f"{path} holds no GenEval record.")
    return _to_dataset(records)
