"""The reward registry and the `RewardModel` base: names, options, lazy loading once per process, batching, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.rewards import RewardModel, get_reward, register_reward, resolve_checkpoint, to_tensor


class CountingReward(RewardModel):
    """Mean of the red channel times a loaded "weight"; counts its loads and the batch sizes it was called with."""

    default_checkpoint = "my-org/red-weight"
    loads, batches = [], []

    def load(self):
        CountingReward.loads.append((self.checkpoint, str(self.device), self.dtype))
        return torch.tensor(2.0, device=self.device, dtype=self.dtype)

    def score(self, weight, images, prompts, **columns):
        CountingReward.batches.append(len(images))
        return [float(weight) * float(np.asarray(image)[..., 0].mean()) for image in images]


register_reward("counting_red")(CountingReward)


@pytest.fixture(autouse=True)
def _reset_counts():
    CountingReward.loads.clear()
    CountingReward.batches.clear()


def _images(n):
    return [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(n)]


def test_get_reward_builds_a_registered_class_with_its_options():
    reward = get_reward("counting_red", checkpoint="other/weights", batch_size=3)
    assert isinstance(reward, CountingReward) and reward.checkpoint == "other/weights" and reward.batch_size == 3
    assert get_reward("counting_red").checkpoint == "my-org/red-weight"
    assert reward.name == "counting_red"


def test_loads_lazily_once_per_checkpoint_device_and_dtype_and_batches_calls():
    first = get_reward("counting_red", checkpoint="lazy/one", batch_size=3)
    second = get_reward("counting_red", checkpoint="lazy/one")
    assert CountingReward.loads == []  # nothing is loaded before the first call
    assert first(_images(7), ["p"] * 7) == [2.0 * 10 * i for i in range(7)]
    assert CountingReward.batches == [3, 3, 1]
    second(_images(2), ["p"] * 2)
    assert CountingReward.loads == [("lazy/one", "cpu", torch.float32)]  # shared with `first`
    second.to(dtype=torch.bfloat16)(_images(1), ["p"])
    assert CountingReward.loads[-1] == ("lazy/one", "cpu", torch.bfloat16)


def test_unknown_name_suggests_the_closest_and_lists_all():
    with pytest.raises(
        ValueError, match=r"Unknown reward 'pick_score'. Did you mean 'pickscore'.*Known rewards: .*geneval"
    ):
        get_reward("pick_score")


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("counting_red")(CountingReward)
    with pytest.raises(TypeError, match="must subclass RewardModel"):
        register_reward("not_a_reward_model")(dict)
    with pytest.raises(TypeError, match="takes no options"):
        get_reward("jpeg_compressibility", checkpoint="x")


def test_missing_local_checkpoint_is_named(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(FileNotFoundError, match="nowhere/model"):
        resolve_checkpoint(missing, "test")
    assert resolve_checkpoint("owner/name", "test") == "owner/name"  # a Hub id is left to from_pretrained


def test_to_tensor_is_float_in_unit_range():
    images = [Image.new("RGB", (4, 3), (255, 0, 51))]
    tensor = to_tensor(images)
    assert tensor.shape == (1, 3, 3, 4) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_trainer_mixes_names_callables_and_reward_objects(make_config, prompts_dataset):
    def brightness(images, prompts, **kwargs):
        return [float(np.asarray(image).mean()) for image in images]

    trainer = DiffusionNFTTrainer(
        "tiny-sd3",
        ["jpeg_incompressibility", brightness, get_reward("counting_red")],
        args=make_config(max_steps=1, reward_weights=[1.0, 0.5, 0.0]),
        train_dataset=prompts_dataset,
    )
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    means = [log[f"rewards/{name}/mean"] for name in ("jpeg_incompressibility", "brightness", "counting_red")]
    assert log["reward"] == pytest.approx(means[0] + 0.5 * means[1], rel=1e-5)


def test_two_rewards_with_one_name_are_refused(make_config, prompts_dataset):
    with pytest.raises(ValueError, match="share a name"):
        DiffusionNFTTrainer(
            "tiny-sd3",
            [get_reward("counting_red"), get_reward("counting_red", checkpoint="x/y")],
            args=make_config(),
            train_dataset=prompts_dataset,
        )
