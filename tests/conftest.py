import pytest
from datasets import Dataset

from trl_nft import NFTConfig


@pytest.fixture
def prompts_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": [f"a photo of object number {i}" for i in range(16)]})


@pytest.fixture
def make_config(tmp_path):
    """An `NFTConfig` for fast CPU runs on tiny-sd3; keyword arguments override."""

    def make(**overrides) -> NFTConfig:
        defaults = dict(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=4,
            num_generations=4,
            num_inference_steps=4,
            lora_r=4,
            lora_alpha=8,
            max_steps=2,
            logging_steps=1,  # every step's metrics, which most tests read
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        return NFTConfig(**{**defaults, **overrides})

    return make
