"""PSNR, SSIM and the background's deviation (cascade.eval.quality) against closed-form values."""

import math

import numpy as np
import pytest

from cascade.eval.quality import background_deviation, psnr_db, quality_scores, ssim


def _scene(offset: int = 0, left: int = 6) -> np.ndarray:
    """(4, 16, 16, 3): a red square on black, `offset` added to the background."""
    video = np.full((4, 16, 16, 3), offset, np.uint8)
    video[:, 5:10, left:left + 5] = (255, 0, 0)
    return video


def test_psnr_of_a_constant_offset_is_closed_form():
    truth = np.full((2, 8, 8, 3), 100, np.uint8)
    assert psnr_db(truth + 5, truth) == pytest.approx(20 * math.log10(255 / 5))
    assert psnr_db(truth, truth) == math.inf


def test_ssim_of_flat_frames_is_the_luminance_term():
    """Flat frames have no variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2, L = 1."""
    a, b = 0.2, 0.6
    video = np.full((3, 16, 16, 3), round(a * 255), np.uint8)
    truth = np.full((3, 16, 16, 3), round(b * 255), np.uint8)
    a, b = round(a * 255) / 255, round(b * 255) / 255
    assert ssim(video, truth) == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-3)  # float32
    assert ssim(truth, truth) == pytest.approx(1.0, abs=1e-3)  # float32: flat frames carry 4e-4 of variance noise
    assert ssim(_scene(), _scene(left=7)) < 0.95  # a moved edge costs structure; 8x8 frames take a 7-pixel window
    assert ssim(_scene()[:, :8, :8], _scene()[:, :8, :8]) == pytest.approx(1.0, abs=1e-3)


def test_background_deviation_is_the_cast_on_pure_background_only():
    truth = _scene()
    assert background_deviation(_scene(offset=10), truth, "black") == pytest.approx(10.0)
    # a square moved by one pixel changes no pixel that counts: the object is grown by one pixel first
    assert background_deviation(_scene(left=7), truth, "black") == pytest.approx(0.0)
    # moved further (cascade mode: the sample draws its own start): its object is not a cast of the background
    assert background_deviation(_scene(left=11), truth, "black") == pytest.approx(0.0)
    # a dim trail is: 12 pixels of (40, 0, 0) over the 256 - 77 pixels outside both grown objects (rows 4-10,
    # columns 5-15)
    trail = _scene(left=11)
    trail[:, 0:3, 0:4] = (40, 0, 0)
    assert background_deviation(trail, truth, "black") == pytest.approx(12 * 40 / 3 / (256 - 7 * 11))
    assert background_deviation(_scene(offset=60, left=11), truth, "black") == pytest.approx(60.0)  # a cast counts
    assert background_deviation(truth, np.full_like(truth, 255), "black") is None  # no background pixel


def test_quality_scores_sum_per_video_and_skip_what_does_not_apply():
    truth = _scene()
    sums = quality_scores([_scene(offset=10), truth], [truth, truth],
                          ["a red square moving left on a black background", "a video of my cat"])
    assert sums["psnr_db"][1] == 2 and sums["psnr_db"][0] == pytest.approx(psnr_db(_scene(offset=10), truth) + 100)
    assert sums["background"] == [pytest.approx(10.0), 1]  # the second caption names no background
    itself = quality_scores([truth], [truth], ["a red square moving left on a black background"], pixels=False)
    assert itself["psnr_db"] == [0.0, 0] and itself["ssim"] == [0.0, 0] and itself["background"] == [0.0, 1]
