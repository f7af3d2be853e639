"""The `digits-edit` prompt set: instructions to redraw a handwritten source digit as another digit.

Each row is an instruction (`prompt`, e.g. "write the digit after this one"), the source digit as a 16 x 16 RGB PIL
image (`image`: the condition an edit model takes) and the digit the instruction asks for (`digit`, read by the
`digit_accuracy` / `digit_judge` rewards). The sources are scikit-learn's handwritten digits, split as `digits-sd3`'s
builder splits them: the training split is the one every digits model (VAE, reward classifier, judge, `digits-edit`)
was trained on, the test split was held out from all of them. The rendered images ship in `digit_images.safetensors`
(written by `python -m trl_nft.embedded.digits_edit`), so this set needs neither scikit-learn nor the rest of the
package.
"""

import os

import torch
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file, save_file


DIGIT_IMAGES_PATH = os.path.join(os.path.dirname(__file__), "digit_images.safetensors")
#: Each instruction and the step from the source digit to the digit it asks for (mod 10): those `digits-edit` was
#: pretrained on (a first build on two, "after" and "before", had not started to read the source after 1100 steps).
INSTRUCTIONS = {"write the digit after this one": 1}
NUM_TEST_PROMPTS = 200  # the test split's default size: one image each, so the judge's accuracy has a 0.03 std error


def edit_target(instruction: str, digit: int) -> int:
    """The digit `instruction` asks for when the source shows `digit`."""
    return (digit + INSTRUCTIONS[instruction]) % 10


def save_source_digits(digits: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str = DIGIT_IMAGES_PATH) -> None:
    """Write each split's `uint8` images `[N, 16, 16]` and labels `[N]` (`digits[split]`) for `load_source_digits`."""
    tensors = {}
    for split, (images, labels) in digits.items():
        tensors[f"{split}_images"], tensors[f"{split}_labels"] = images.contiguous(), labels.contiguous()
    save_file(tensors, path)


def load_source_digits(split: str, path: str = DIGIT_IMAGES_PATH) -> tuple[torch.Tensor, torch.Tensor]:
    """The `split` ("train" or "test") source digits: `uint8` images `[N, 16, 16]` and their labels `[N]`."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: the digits-edit prompt set has a 'train' and a 'test' split.")
    tensors = load_file(path)
    return tensors[f"{split}_images"], tensors[f"{split}_labels"]


def digits_edit_prompts(split: str = "train", seed: int = 0, num_prompts: int | None = None) -> Dataset:
    """Rows `prompt` (an instruction), `image` (the source digit, RGB PIL) and `digit` (the digit asked for).

    train: every training source with every instruction, in an order shuffled by `seed` (the first `num_prompts` rows
    when given). test: the first `num_prompts` (default 200) held-out sources, the instructions taken in turn; fixed,
    whatever the seed, so that evaluations of different runs compare."""
    images, labels = load_source_digits(split)
    instructions = list(INSTRUCTIONS)
    if split == "train":
        pairs = [(i, instruction) for i in range(len(labels)) for instruction in instructions]
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        pairs = [pairs[i] for i in order][:num_prompts]
    else:
        count = min(num_prompts or NUM_TEST_PROMPTS, len(labels))
        pairs = [(i, instructions[i % len(instructions)]) for i in range(count)]
    return Dataset.from_dict(
        {
            "prompt": [instruction for _, instruction in pairs],
            "image": [Image.fromarray(images[i].numpy()).convert("RGB") for i, _ in pairs],
            "digit": [edit_target(instruction, int(labels[i])) for i, instruction in pairs],
        }
    )
