"""Watching a run: sample grids on disk and in TensorBoard, early stopping at a target reward."""

from PIL import Image

from trl_nft import DiffusionNFTTrainer
from trl_nft.callbacks import sample_grid


def test_sample_grids_land_on_disk_and_in_tensorboard(make_config, prompts_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(report_to="tensorboard", sample_logging_steps=1, sample_logging_num_images=3)
    DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset).train()
    saved = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [path.name for path in saved] == ["step_000001.png", "step_000002.png"]
    grid = Image.open(saved[0])
    assert grid.width == 4 * 64 and grid.height == 64 + 12  # 3 images in a row of 4, under a caption line
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("train/samples")] == [1, 2]


def test_sample_logging_can_be_switched_off(make_config, prompts_dataset, tmp_path):
    config = make_config(sample_logging_steps=0)
    DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset).train()
    assert not (tmp_path / "run" / "samples").exists()


def test_early_stopping_at_a_target_reward(make_config, prompts_dataset):
    config = make_config(max_steps=5, early_stopping_reward=0.0)  # JPEG sizes are positive: reached at once
    trainer = DiffusionNFTTrainer("tiny-sd3", "jpeg_incompressibility", args=config, train_dataset=prompts_dataset)
    trainer.train()
    assert trainer.state.global_step == 1


def test_sample_grid_layout():
    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(6)]
    grid = sample_grid(images, [f"prompt {i}" for i in range(6)], [float(i) for i in range(6)], columns=4)
    assert grid.size == (4 * 32, 2 * (32 + 12))
    assert grid.getpixel((32 + 5, 12 + 5)) == (40, 0, 0)  # the second image, below its caption
