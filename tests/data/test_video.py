"""PyAV video files: what is written decodes to the same frame count, size and (close) content."""

import numpy as np
import pytest
import torch

from cascade.data.video import read_video, to_uint8, write_video


def smooth_video(frames=6, height=24, width=40):
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([x * 255 / width, y * 255 / height, (t * 40) % 255], axis=-1)
    return rgb.astype(np.uint8)


# GIF stores frame delays in whole centiseconds (6 fps is written as 16 cs, read back as 6.25 fps) and at most
# 256 colours per clip (the smooth video has 6 x 24 x 40 of them): a preview format, hence the looser bounds. The
# per-clip palette measures 6.4 levels here, the fixed dithered rgb8 palette of ffmpeg's encoder 6.3.
@pytest.mark.parametrize("suffix, tolerance, fps_tolerance", [(".mp4", 6.0, 0.01), (".gif", 7.0, 0.3)])
def test_round_trip(tmp_path, suffix, tolerance, fps_tolerance):
    video = smooth_video()
    path = write_video(tmp_path / f"v{suffix}", video, fps=6)
    frames, fps = read_video(path)
    assert frames.shape == video.shape
    assert abs(fps - 6) < fps_tolerance
    assert np.abs(frames.astype(float) - video).mean() < tolerance


def test_gif_of_few_colours_is_exact_and_keeps_each_clips_colours(tmp_path):
    """One palette for the clip, no dithering: a clip of at most 256 colours comes back exactly (a synthetic render
    has about 115), with its own colours rather than a fixed cube's."""
    from cascade.data.synthetic import render, sample_scene

    video = render(sample_scene(np.random.default_rng(0)), 16, 64, 64, 8.0)
    assert len(np.unique(video.reshape(-1, 3), axis=0)) <= 256
    frames, _ = read_video(write_video(tmp_path / "clip.gif", video, fps=8))
    np.testing.assert_array_equal(frames, video)


def test_odd_sizes_and_bad_input(tmp_path):
    frames, _ = read_video(write_video(tmp_path / "odd.mp4", smooth_video(3, 15, 21), fps=3))
    assert frames.shape[0] == 3 and frames.shape[1] >= 15 and frames.shape[2] >= 21
    with pytest.raises(ValueError, match="only .mp4 and .gif"):
        write_video(tmp_path / "v.avi", smooth_video(), fps=3)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "v.mp4", smooth_video().astype(np.float32), fps=3)


def test_to_uint8_maps_the_unit_interval():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4).expand(3, 1, 1, 4)
    assert to_uint8(video)[0, 0, :, 0].tolist() == [0, 128, 255, 255]
