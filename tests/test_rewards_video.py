"""How rewards see videos (`trl_nft.rewards.video`, docs/rewards.md "Rewards on videos"): image rewards score evenly
spaced frames with their video's prompt and columns, aggregated per video; video-aware rewards get whole videos."""

import pytest
from PIL import Image

from trl_nft.rewards.scoring import score_samples
from trl_nft.rewards.video import frame_indices, score_videos, takes_videos


def _video(values: list[int]) -> list[Image.Image]:
    """A video whose frame `i` is a uniform gray of `values[i]`."""
    return [Image.new("RGB", (8, 8), (value,) * 3) for value in values]


def _gray(images, prompts, **columns):
    return [image.getpixel((0, 0))[0] / 255 for image in images]


def test_frames_are_evenly_spaced_with_the_first_and_the_last():
    assert frame_indices(9, 3) == [0, 4, 8]
    assert frame_indices(5, 4) == [0, 1, 3, 4]
    assert frame_indices(5, None) == frame_indices(5, 9) == [0, 1, 2, 3, 4]
    assert frame_indices(5, 1) == [2]  # one frame: the middle one


def test_an_image_reward_scores_the_chosen_frames_and_aggregates_them_per_video():
    videos = [_video([0, 51, 102]), _video([255, 255, 0])]
    assert score_videos(_gray, videos, ["a", "b"], {}) == pytest.approx([0.2, 2 / 3])  # every frame, mean
    assert score_videos(_gray, videos, ["a", "b"], {}, frames=2) == pytest.approx([0.2, 0.5])  # first and last
    assert score_videos(_gray, videos, ["a", "b"], {}, aggregation="min") == pytest.approx([0.0, 0.0])


def test_each_frame_is_scored_with_its_videos_prompt_and_columns():
    seen = []

    def reward(images, prompts, digit, **columns):
        seen.extend(zip(prompts, digit, strict=True))
        return [None if d is None else 1.0 for d in digit]

    videos = [_video([0, 0, 0]), _video([0, 0, 0])]
    assert score_videos(reward, videos, ["a", "b"], {"digit": [None, 7]}, frames=2) == [None, 1.0]
    assert seen == [("a", None), ("a", None), ("b", 7), ("b", 7)]


def test_a_video_aware_reward_receives_whole_videos():
    def motion(videos, prompts, **columns):
        return [float(abs(_gray(video[-1:], [])[0] - _gray(video[:1], [])[0])) for video in videos]

    class Judge:
        takes_videos = True

        def __call__(self, **kwargs):
            return [float(len(video)) for video in kwargs["videos"]]

    assert takes_videos(motion) and takes_videos(Judge()) and not takes_videos(_gray)
    videos = [_video([0, 51, 102]), _video([255, 255])]
    assert score_videos(motion, videos, ["a", "b"], {}) == pytest.approx([0.4, 0.0])
    assert score_samples(
        [motion, Judge(), _gray], ["motion", "judge", "gray"], videos, ["a", "b"], {}
    ).rewards.tolist() == [
        pytest.approx([0.4, 3.0, 0.2]),
        pytest.approx([0.0, 2.0, 1.0]),
    ]


def test_a_reward_with_the_wrong_output_on_videos_is_named():
    def short(images, prompts, **columns):
        return [0.0]

    videos = [_video([0, 0, 0])]
    with pytest.raises(ValueError, match=r"'short' returned 1 values for 3 video frames \(1 videos\)"):
        score_videos(short, videos, ["a"], {})
    with pytest.raises(ValueError, match=r"'nan' returned nan for video 0"):
        score_samples([lambda images, prompts: [float("nan")] * 3], ["nan"], videos, ["a"], {})
