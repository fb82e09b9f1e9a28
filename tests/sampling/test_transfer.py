"""The colour guided filter that carries an edit onto the input's structure (cascade.sampling.transfer), checked
against what a locally affine colour model must reproduce exactly and against a moved, recoloured object."""

import pytest
import torch

from cascade.sampling.transfer import apply_maps, fit_maps, guided_transfer, transfer_radius, upsample_maps


def _square(color, top: int, left: int, size: int = 8, frame: int = 32, background=(-0.2, -0.2, -0.2)):
    """(1, 3, 2, frame, frame): two frames of a square of `color` on `background`."""
    x = torch.tensor(background, dtype=torch.float64)[None, :, None, None, None].repeat(1, 1, 2, frame, frame)
    x[:, :, :, top:top + size, left:left + size] = torch.tensor(color, dtype=torch.float64)[None, :, None, None, None]
    return x


def test_a_global_affine_colour_map_is_reproduced():
    torch.manual_seed(0)
    guide = torch.rand(2, 3, 3, 12, 10, dtype=torch.float64) * 2 - 1
    m = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.8, -0.4], [-0.6, 0.2, 0.3]], dtype=torch.float64)  # not symmetric
    target = torch.einsum("bitxy,ij->bjtxy", guide, m) + torch.tensor([0.1, -0.2, 0.05])[None, :, None, None, None]
    out = apply_maps(fit_maps(guide, target, radius=2, eps=1e-10), guide)
    assert torch.allclose(out, target, atol=1e-6)
    transposed = torch.einsum("bitxy,ji->bjtxy", guide, m)  # the other contraction is a different map
    assert not torch.allclose(out, transposed, atol=1e-2)


def test_a_flat_frame_takes_the_edit_colour_exactly():
    guide = torch.full((1, 3, 1, 8, 8), 0.3, dtype=torch.float64)
    target = torch.full((1, 3, 1, 8, 8), -0.5, dtype=torch.float64)
    assert torch.allclose(guided_transfer(guide, target), target, atol=1e-12)


def test_a_moved_recoloured_object_keeps_the_input_edges_and_takes_the_new_colour():
    red, blue = (0.9, -0.8, -0.8), (-0.8, -0.8, 0.9)
    guide = _square(red, 10, 10)
    target = _square(blue, 11, 10)  # moved down by 1 px and recoloured: 7/8 of the input's object is blue in it
    out = guided_transfer(guide, target)
    inside, moved_in = (slice(10, 18), slice(10, 18)), (slice(18, 19), slice(10, 18))  # the input's / edit's only
    new = out[0, :, :, inside[0], inside[1]] - torch.tensor(blue)[:, None, None, None]  # the top row mixes: 0.25
    assert new.abs().max() < 0.3 and new.abs().mean() < 0.15
    assert (out[0, :, :, moved_in[0], moved_in[1]] - (-0.2)).abs().max() < 0.05  # background where only the edit
    # the input's edges: the object's mass centre (weighted by its contrast, weaker in the mixed top row) is near
    # the input's (14, 14), not the edit's (15, 14)
    weight = (out - (-0.2)).abs().sum(dim=1)[0, 0]
    weight = weight * (weight > 0.3)  # the object: the background is off by the ridge's shrinkage, < 0.05
    rows = torch.arange(32, dtype=torch.float64) + 0.5
    centre = (weight.sum(dim=1) @ rows / weight.sum(), weight.sum(dim=0) @ rows / weight.sum())
    assert abs(centre[0] - 14.0) < 0.2 and abs(centre[1] - 14.0) < 0.02


def test_maps_upsample_to_the_finer_stage_and_apply_there():
    red, blue = (0.9, -0.8, -0.8), (-0.8, -0.8, 0.9)
    low = torch.nn.functional.avg_pool3d(_square(red, 8, 8, size=16), (1, 4, 4))  # (1, 3, 2, 8, 8)
    edited = torch.nn.functional.avg_pool3d(_square(blue, 8, 8, size=16), (1, 4, 4))
    maps = fit_maps(low, edited, transfer_radius(8, 8))
    fine = upsample_maps(maps, 4, 32, 32)
    assert fine.shape == (1, 12, 4, 32, 32)
    out = apply_maps(fine, _square(red, 8, 8, size=16).repeat_interleave(2, dim=2))
    assert (out[0, :, :, 12:20, 12:20] - torch.tensor(blue)[:, None, None, None]).abs().max() < 0.1
    assert (out[0, :, :, :4, :4] - (-0.2)).abs().max() < 0.1


def test_one_astray_frame_takes_its_neighbours_colours():
    """The maps are fitted over frames too: an edit that drew the object dim in one frame of eight still recolours
    the input's object there (per frame, time_radius 0, it would go dim)."""
    red, blue = (0.9, -0.8, -0.8), (-0.8, -0.8, 0.9)
    guide = _square(red, 10, 10).repeat(1, 1, 4, 1, 1)  # 8 frames
    target = _square(blue, 10, 10).repeat(1, 1, 4, 1, 1)
    target[:, :, 4, 10:18, 10:18] = -0.2 + 0.1  # frame 4: the object almost background
    colour = lambda v: v[0, :, 4, 12:16, 12:16].mean(dim=(-2, -1))  # noqa: E731
    assert (colour(guided_transfer(guide, target)) - torch.tensor(blue)).abs().max() < 0.3
    assert (colour(guided_transfer(guide, target, time_radius=0)) - torch.tensor(blue)).abs().max() > 0.8


def test_the_box_filter_is_the_window_mean_inside_the_frame():
    from cascade.sampling.transfer import _box

    x = torch.rand(2, 3, 9, 7, dtype=torch.float64)
    out = _box(x, 2)
    for r, c in ((0, 0), (4, 3), (8, 6), (1, 5)):  # corners, middle, edges: the mean of the window's inside pixels
        assert torch.allclose(out[..., r, c], x[..., max(r - 2, 0):r + 3, max(c - 2, 0):c + 3].mean(dim=(-2, -1)))


def test_fit_maps_refuses_videos_of_two_shapes():
    with pytest.raises(ValueError, match="one shape"):
        fit_maps(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 4), 1)
