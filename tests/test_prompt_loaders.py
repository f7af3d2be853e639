"""Prompt loaders on local files (the Hub ids go through the same `datasets.load_dataset` call)."""

import json

import pytest
from datasets import Dataset

from trl_nft.prompts.loaders import drawbench_prompts, ocr_prompts, pickapic_prompts


OCR_PROMPTS = ['A neon sign that says "Open Late"', 'a cake with "Happy Birthday" written in icing']


def test_ocr_prompts_from_a_text_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(OCR_PROMPTS[0] + "\n\n  " + OCR_PROMPTS[1] + "  \n")
    dataset = ocr_prompts(str(path))
    assert isinstance(dataset, Dataset)
    assert dataset.to_dict() == {"prompt": OCR_PROMPTS, "ocr_text": ["Open Late", "Happy Birthday"]}


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_ocr_prompts_from_jsonl_and_csv(tmp_path, extension):
    path = tmp_path / f"prompts.{extension}"
    if extension == "jsonl":
        path.write_text(
            "".join(json.dumps({"prompt": prompt, "id": i}) + "\n" for i, prompt in enumerate(OCR_PROMPTS))
        )
    else:
        Dataset.from_dict({"prompt": OCR_PROMPTS, "id": [0, 1]}).to_csv(str(path), index=False)
    assert ocr_prompts(str(path)).to_dict() == {"prompt": OCR_PROMPTS, "ocr_text": ["Open Late", "Happy Birthday"]}


def test_ocr_prompts_without_quoted_text_are_an_error_naming_them(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join([OCR_PROMPTS[0], "a photo of a cat", 'an empty "" sign']))
    with pytest.raises(ValueError, match=r"2 of 3 prompts quote no text.*'a photo of a cat'.*'an empty \"\" sign'"):
        ocr_prompts(str(path))


def test_a_missing_local_file_is_named_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ocr_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match=r"\.txt"):
        (tmp_path / "prompts.xml").write_text("<p/>")
        ocr_prompts(str(tmp_path / "prompts.xml"))


def test_pickapic_prompts_dedupe_captions_in_order(tmp_path):
    path = tmp_path / "pickapic.parquet"
    captions = ["a red fox", "a castle at dusk", "a red fox", "", "  a castle at dusk ", "an astronaut"]
    Dataset.from_dict({"caption": captions, "best_image_uid": [str(i) for i in range(6)]}).to_parquet(str(path))
    assert pickapic_prompts(str(path)).to_dict() == {"prompt": ["a red fox", "a castle at dusk", "an astronaut"]}


def test_pickapic_prompts_from_a_local_dataset_folder_and_split(tmp_path):
    folder = tmp_path / "pickapic"
    folder.mkdir()
    Dataset.from_dict({"caption": ["a", "b", "a"]}).to_json(str(folder / "test.jsonl"))
    Dataset.from_dict({"caption": ["c"]}).to_json(str(folder / "train.jsonl"))
    assert pickapic_prompts(str(folder), split="test")["prompt"] == ["a", "b"]


def test_drawbench_prompts_rename_the_columns(tmp_path):
    path = tmp_path / "drawbench.csv"
    rows = {"Prompts": ["A red colored car.", "Three cats and one dog."], "Category": ["Colors", "Counting"]}
    Dataset.from_dict(rows).to_csv(str(path), index=False)
    assert drawbench_prompts(str(path)).to_dict() == {
        "prompt": ["A red colored car.", "Three cats and one dog."],
        "category": ["Colors", "Counting"],
    }
