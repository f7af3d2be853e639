"""The learning check the families' tests share: the reward gain of a short run against a shuffled-reward control."""

import random

from datasets import Dataset

from trl_nft import DiffusionNFTTrainer
from trl_nft.rewards import to_tensor
from trl_nft.rewards.video import takes_videos


def eval_gain(
    make_config, model, reward, shuffle: bool, prompts: Dataset | None = None, eval_prompts=None, **overrides
) -> float:
    """The reward on `eval_prompts` (default: `prompts`; one image each, fixed noise) after training on `prompts`
    minus before. `model` is a name or a function building a fresh pipeline; with `shuffle`, the rewards of each
    rollout are permuted (same distribution, no link to the images)."""
    rng = random.Random(0)

    def shuffled(values: list) -> list:
        if shuffle:  # break the sample <-> reward link, keep the reward distribution
            rng.shuffle(values)
        return values

    if takes_videos(reward):  # the control sees what the reward sees: whole videos

        def scored(videos, prompts, **kwargs):
            return shuffled(reward(videos, prompts))

    else:

        def scored(images, prompts, **kwargs):
            return shuffled(reward(images, prompts))

    if prompts is None:
        prompts = Dataset.from_dict({"prompt": [f"a picture number {i}" for i in range(32)]})
    config = make_config(
        **{
            "per_device_train_batch_size": 16,
            "num_generations": 8,
            "nft_beta": 0.1,
            "advantage_clip": 1.0,  # saturates r for |A| >= 1 std: a strong signal for a short run
            "kl_coef": 0.0,
            "lora_r": 8,
            "lora_alpha": 16,
            **overrides,
        }
    )
    pipeline = model if isinstance(model, str) else model()
    eval_prompts = prompts if eval_prompts is None else eval_prompts
    trainer = DiffusionNFTTrainer(pipeline, scored, args=config, train_dataset=prompts, eval_dataset=eval_prompts)
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    return trainer.evaluate()["eval_reward"] - before


def assert_beats_a_shuffled_control(
    make_config, model, reward, minimum_gain: float, minimum_margin: float, **eval_gain_kwargs
) -> None:
    """Train on `reward` and, as the control, on the same reward shuffled within each rollout (`eval_gain`): the
    real run's gain must exceed `minimum_gain`, and the control's by `minimum_margin`."""
    real = eval_gain(make_config, model, reward, False, **eval_gain_kwargs)
    control = eval_gain(make_config, model, reward, True, **eval_gain_kwargs)
    assert real > minimum_gain, f"the reward rose by only {real:.4f}"
    assert real - control > minimum_margin, (
        f"real reward gain {real:.4f} is not clearly above the shuffled control {control:.4f}"
    )


def brightness(images, prompts, **kwargs) -> list[float]:
    """Mean pixel value of each image, in [0, 1]."""
    return to_tensor(images).mean(dim=(1, 2, 3)).tolist()
