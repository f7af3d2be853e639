"""DiffusionNFT learns on tiny-sd3 with a real reward, and a shuffled-reward control (same seed and budget) learns
clearly less: the rise comes from the reward signal, not from training noise."""

import random

from datasets import Dataset

from trl_nft import DiffusionNFTTrainer
from trl_nft.rewards import get_reward


def _eval_gain(make_config, shuffle: bool) -> float:
    jpeg = get_reward("jpeg_incompressibility")
    rng = random.Random(0)

    def reward(images, prompts, **kwargs):
        values = jpeg(images, prompts)
        if shuffle:  # break the image <-> reward link, keep the reward distribution
            rng.shuffle(values)
        return values

    prompts = Dataset.from_dict({"prompt": [f"a picture number {i}" for i in range(32)]})
    config = make_config(
        per_device_train_batch_size=16,
        num_generations=8,
        num_inference_steps=6,
        learning_rate=3e-2,
        beta=0.1,
        kl_coef=0.0,
        lora_r=8,
        lora_alpha=16,
        max_steps=40,
    )
    trainer = DiffusionNFTTrainer(
        "tiny-sd3", reward, args=config, train_dataset=prompts, eval_dataset=prompts.select(range(16))
    )
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    return trainer.evaluate()["eval_reward"] - before


def test_reward_rises_and_beats_a_shuffled_reward_control(make_config):
    gain = _eval_gain(make_config, shuffle=False)
    control = _eval_gain(make_config, shuffle=True)
    # Measured on 2 CPU cores: gain 0.155 kB, control 0.040 kB (within-group reward std is about 0.07 kB).
    assert gain > 0.08, f"the reward rose by only {gain:.3f} kB"
    assert gain > 2.5 * control, f"real reward gain {gain:.3f} is not clearly above the shuffled control {control:.3f}"
