"""Condition images in prompt datasets (`trl_nft.conditions`): how rows hold them, how files relative to a JSONL are
found, and the errors a user gets before the model loads for a row that cannot be opened, a text-only model given
images, a reserved column name, or an edit reward on a dataset without source images."""

import io
import json

import pytest
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from families import run_trl_nft
from PIL import Image

import trl_nft.nft_trainer
from trl_nft import DiffusionNFTTrainer
from trl_nft.conditions import open_condition_images, reward_columns, row_condition_images
from trl_nft.prompts import load_prompt_source


def red(size=8) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 10, 10))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_row_holds_one_image_or_a_list_as_pil_datasets_image_or_path(tmp_path):
    path = tmp_path / "source.png"
    red().save(path)
    gray = Image.new("L", (8, 8), 100)
    for value in (red(), str(path), {"bytes": png_bytes(red()), "path": None}, {"bytes": None, "path": str(path)}):
        (opened,) = open_condition_images(value)
        assert opened.mode == "RGB" and opened.getpixel((0, 0)) == (200, 10, 10)
    opened = open_condition_images([gray, str(path)])
    assert [image.mode for image in opened] == ["RGB", "RGB"] and opened[0].getpixel((0, 0)) == (100, 100, 100)
    # A `datasets.Image` column (decoded to PIL) and a list of them.
    features = Features({"prompt": Value("string"), "image": ImageFeature()})
    dataset = Dataset.from_dict({"prompt": ["a"], "image": [red()]}, features=features)
    assert open_condition_images(dataset[0]["image"])[0].getpixel((0, 0)) == (200, 10, 10)
    features = Features({"prompt": Value("string"), "image": Sequence(ImageFeature())})
    dataset = Dataset.from_dict({"prompt": ["a"], "image": [[red(), gray]]}, features=features)
    assert len(open_condition_images(dataset[0]["image"])) == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing.png", "no image file 'missing.png'"),
        ([], "the image list is empty"),
        (3, "must be a PIL image, a datasets.Image value or a path, got int"),
    ],
)
def test_what_cannot_be_opened_says_why(value, message):
    with pytest.raises((ValueError, TypeError, OSError), match=message):
        open_condition_images(value)


def test_rewards_get_the_rows_images_as_condition_images_and_the_column_as_is(tmp_path):
    path = tmp_path / "a.png"
    red().save(path)
    rows = [{"prompt": "p", "image": str(path), "digit": 1}, {"prompt": "q", "image": [red(), red(4)], "digit": 2}]
    columns = reward_columns(rows)
    assert columns["image"] == [str(path), rows[1]["image"]] and columns["digit"] == [1, 2]
    first, second = columns["condition_images"]
    assert isinstance(first, Image.Image) and first.mode == "RGB"  # one image: the image itself
    assert [image.size for image in second] == [(8, 8), (4, 4)]  # a list: the list
    assert "condition_images" not in reward_columns([{"prompt": "p", "digit": 1}])
    assert row_condition_images([{"prompt": "p"}]) is None


def test_a_jsonl_dataset_holds_image_paths_relative_to_its_file(tmp_path, monkeypatch):
    folder = tmp_path / "edits"
    (folder / "images").mkdir(parents=True)
    red().save(folder / "images" / "0.png")
    red(4).save(folder / "images" / "1.png")
    rows = [
        {"prompt": "make it blue", "image": "images/0.png"},
        {"prompt": "combine them", "image": ["images/0.png", "images/1.png"]},
    ]
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    monkeypatch.chdir(tmp_path)  # not the file's folder: the paths are read relative to the file anyway
    dataset = load_prompt_source("edits/edits.jsonl")
    first, second = (open_condition_images(row["image"]) for row in dataset)
    assert [image.size for image in first] == [(8, 8)] and [image.size for image in second] == [(8, 8), (4, 4)]


def failing_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the dataset was checked")


@pytest.mark.parametrize("column", ["condition_images", "images", "prompts", "self", "models"])
def test_a_column_named_like_a_reward_keyword_is_refused_before_the_model_loads(make_config, monkeypatch, column):
    monkeypatch.setattr(trl_nft.nft_trainer, "load_pipeline", failing_load)
    dataset = Dataset.from_dict({"prompt": ["a", "b"], column: [1, 2]})
    with pytest.raises(ValueError, match=rf"column named '{column}'.*rename the column"):
        DiffusionNFTTrainer("tiny-sd3", "jpeg_compressibility", args=make_config(), train_dataset=dataset)


def test_a_row_whose_image_cannot_be_opened_is_named_before_the_model_loads(make_config, monkeypatch, tmp_path):
    monkeypatch.setattr(trl_nft.nft_trainer, "load_pipeline", failing_load)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = Dataset.from_dict({"prompt": ["a", "b", "c"], "image": [red(), red(), str(tmp_path / "broken.png")]})
    with pytest.raises(ValueError, match=r"train_dataset row 2: its 'image' cannot be opened: .*broken.png"):
        DiffusionNFTTrainer("tiny-sd3", "jpeg_compressibility", args=make_config(), train_dataset=dataset)


def test_a_text_to_image_model_given_condition_images_says_so(make_config):
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "image": [red(), red()]})
    with pytest.raises(ValueError, match=r"'image' column, but StableDiffusion3Pipeline generates from text alone"):
        DiffusionNFTTrainer("tiny-sd3", "jpeg_compressibility", args=make_config(), train_dataset=dataset)


def test_an_edit_reward_on_a_dataset_without_source_images_is_refused(make_config, monkeypatch, prompts_dataset):
    monkeypatch.setattr(trl_nft.nft_trainer, "load_pipeline", failing_load)

    def preserves_the_source(images, prompts, condition_images, **columns):
        return [1.0] * len(images)

    with pytest.raises(ValueError, match=r"'preserves_the_source' scores an edit .* has no 'image' column"):
        DiffusionNFTTrainer("tiny-sd3", preserves_the_source, args=make_config(), train_dataset=prompts_dataset)


def count_encodings(trainer) -> list[list[str]]:
    """The prompts of each `encode_conditions` call the trainer makes from now on."""
    calls, encode = [], trainer.adapter.encode_conditions

    def counted(prompts, images, resolution):
        calls.append(prompts)
        return encode(prompts, images, resolution)

    trainer.adapter.encode_conditions = counted
    return calls


def test_rows_are_encoded_once_per_prompt_and_image_and_the_cache_keys_on_the_image(make_config):
    """Two rows share a prompt but not an image, two share both: a rollout encodes three conditions, and the
    prompt-embedding cache keeps them apart by image (a cache keyed on the prompt alone would give the second row the
    first row's image)."""
    blue = Image.new("RGB", (8, 8), (10, 10, 200))
    dataset = Dataset.from_dict(
        {"prompt": ["make it green", "make it green", "make it round", "make it round"], "image": [red(), blue] * 2}
    )
    rows = [dataset[0], dataset[1], dataset[0], dataset[2], dataset[1]]
    encoded = []
    for cache_size in (0, 8):
        config = make_config(max_steps=1, prompt_embedding_cache_size=cache_size)
        trainer = DiffusionNFTTrainer("tiny-flux-kontext", "jpeg_compressibility", args=config, train_dataset=dataset)
        calls = count_encodings(trainer)
        conditioning = trainer._encode_conditions(rows)
        assert calls == [["make it green", "make it green", "make it round"]]
        latents = conditioning["image_latents"]
        assert torch.equal(latents[0], latents[2]) and torch.equal(latents[1], latents[4])
        assert not torch.equal(latents[0], latents[1])
        encoded.append(conditioning)
        trainer._encode_conditions(rows)  # again: from the cache when it is on
        assert len(calls) == (2 if cache_size == 0 else 1)
    for key, value in encoded[0].items():
        torch.testing.assert_close(encoded[1][key], value)


def test_trl_nft_trains_an_edit_model_from_a_jsonl_of_instructions_and_image_paths(tmp_path):
    """As a user runs it: `trl nft --model tiny-flux-kontext --dataset edits/train.jsonl`, the images beside the file;
    the model card's example loads a source image the run saved and edits it."""
    folder = tmp_path / "edits"
    (folder / "images").mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (80, 96), (60 * index, 100, 200)).save(folder / "images" / f"{index}.png")
    rows = [{"prompt": f"make it number {index}", "image": f"images/{index}.png"} for index in range(2)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    output_dir = run_trl_nft("tiny-flux-kontext", tmp_path, "--dataset", "edits/train.jsonl")
    card = (output_dir / "README.md").read_text()
    assert "pipeline_tag: image-to-image" in card and "FluxKontextPipeline" in card
    assert (output_dir / "images" / "source_0.png").is_file()
    assert f'source = load_image("{output_dir}/images/source_0.png")' in card
    assert "image=source" in card and "max_area=4096, _auto_resize=False" in card
