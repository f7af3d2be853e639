"""The `digits` prompt set of the `digits-sd3` benchmark: "a handwritten digit seven", with a `digit` column.

It imports nothing from the rest of the package, so the DDPO comparison (`benchmarks/digits/ddpo/`) loads it as a
standalone module in TRL 0.23's environment.
"""

from datasets import Dataset


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPT_TEMPLATE = "a handwritten digit {}"


def digit_prompt(digit: int) -> str:
    return PROMPT_TEMPLATE.format(DIGIT_NAMES[digit])


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt asks for (the first digit name among its words), or None."""
    for word in prompt.lower().replace(",", " ").split():
        if word in DIGIT_NAMES:
            return DIGIT_NAMES.index(word)
    return None


def digit_prompts(repeats: int = 1) -> Dataset:
    """The ten digit prompts, each `repeats` times, with their `digit` column (the `digits` prompt set)."""
    digits = [digit for _ in range(repeats) for digit in range(10)]
    return Dataset.from_dict({"prompt": [digit_prompt(d) for d in digits], "digit": digits})
