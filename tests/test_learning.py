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
        advantage_clip=1.0,  # saturates r for |A| >= 1 std: a strong signal for a short run
        kl_coef=0.0,
        lora_r=8,
        lora_alpha=16,
        max_steps=60,
    )
    trainer = DiffusionNFTTrainer("tiny-sd3", reward, args=config, train_dataset=prompts, eval_dataset=prompts)
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    return trainer.evaluate()["eval_reward"] - before


def test_reward_rises_and_beats_a_shuffled_reward_control(make_config):
    gain = _eval_gain(make_config, shuffle=False)
    control = _eval_gain(make_config, shuffle=True)
    # Random drift of a random model makes its images busier, so even the control's JPEG size creeps up; the real
    # reward must rise clearly more. Measured (seeds 0 / 1 / 2): gain 0.080 / 0.074 / 0.125 kB, control 0.029 / 0.018 /
    # 0.012 kB; the within-group reward std is about 0.07 kB.
    assert gain > 0.04, f"the reward rose by only {gain:.3f} kB"
    assert gain - control > 0.03, (
        f"real reward gain {gain:.3f} is not clearly above the shuffled control {control:.3f}"
    )
