"""Showing videos where images go (sample grids, TensorBoard, the model card): a strip of frames, or an animated GIF."""

from PIL import Image

from .rewards.video import frame_indices


def frame_strip(video: list[Image.Image], frames: int = 4) -> Image.Image:
    """`frames` evenly spaced frames of `video` side by side, the first and the last included."""
    chosen = [video[i] for i in frame_indices(len(video), frames)]
    width, height = chosen[0].size
    strip = Image.new("RGB", (width * len(chosen), height))
    for i, frame in enumerate(chosen):
        strip.paste(frame, (i * width, 0))
    return strip


def save_gif(frames: list[Image.Image], path: str, fps: int = 8) -> None:
    """`frames` as an animated GIF at `fps` frames per second, looping (what the Hub, browsers and W&B show)."""
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
