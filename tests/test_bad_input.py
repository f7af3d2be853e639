"""Bad input a user gives the trainer, named before anything runs: a dataset lacking a column its reward needs, prompts
longer than the text encoders take (one warning, with the count), images of another size or mode reaching a reward.
(Every NFTConfig field's validation: tests/test_config.py.)"""

import logging

import pytest
from datasets import Dataset
from PIL import Image

from trl_nft import DiffusionNFTTrainer, get_reward
from trl_nft.rewards import to_tensor


def _needs_a_digit(images, prompts, digit, **columns):
    return [float(d) for d in digit]


def test_a_dataset_lacking_a_column_its_reward_needs_is_named_before_the_model_loads(make_config, prompts_dataset):
    # The model name does not exist: the column check comes first, so the error is about the column.
    with pytest.raises(ValueError, match=r"'_needs_a_digit' needs the dataset column 'digit', which train_dataset"):
        DiffusionNFTTrainer("no-such/model", _needs_a_digit, args=make_config(), train_dataset=prompts_dataset)
    with pytest.raises(ValueError, match=r"'geneval' needs the dataset column 'metadata', which eval_dataset lacks"):
        DiffusionNFTTrainer(
            "no-such/model",
            "jpeg_compressibility",
            args=make_config(),
            train_dataset=prompts_dataset,
            eval_dataset=prompts_dataset,
            eval_reward_funcs=["geneval"],
        )


def test_prompts_longer_than_the_text_encoders_take_get_one_warning_with_the_count(make_config, caplog):
    long = "a " + "very " * 100 + "long prompt"
    dataset = Dataset.from_dict({"prompt": [long, "a cat", long + " indeed", "a dog"] * 2})
    with caplog.at_level(logging.WARNING):
        trainer = DiffusionNFTTrainer(
            "tiny-sd3", "jpeg_compressibility", args=make_config(max_steps=1), train_dataset=dataset
        )
        trainer.train()
    warnings = [record.getMessage() for record in caplog.records if "truncat" in record.getMessage()]
    assert warnings == [
        "2 of the 4 distinct training prompts are longer than the text encoders take (tokenizer: 77 tokens, "
        "tokenizer_2: 77 tokens, tokenizer_3: 128 tokens) and are truncated: shorten them, or raise "
        "max_sequence_length where the long encoder allows it."
    ]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_rewards_convert_images_of_any_mode(mode):
    image = Image.new("RGB", (16, 16), (200, 100, 50)).convert(mode)
    assert to_tensor([image]).shape == (1, 3, 16, 16)
    assert len(get_reward("jpeg_compressibility")([image], ["a"])) == 1
    probability = get_reward("digit_accuracy")([image.resize((64, 64))], ["a handwritten digit seven"])  # resized too
    assert 0 <= probability[0] <= 1


def test_images_of_different_sizes_are_refused_clearly_where_a_reward_needs_one_size():
    images = [Image.new("RGB", (16, 16)), Image.new("RGB", (32, 24))]
    with pytest.raises(ValueError, match=r"to_tensor needs images of one size, got 16 x 16, 32 x 24: resize them"):
        to_tensor(images)
