import pytest
import torch

from cascade.nn.unet import VideoUNet
from cascade.sampling.windows import WindowedDenoiser, blend_weights, window_starts

CASES = [  # (total, window, overlap, align)
    (24, 8, 0, 1), (17, 8, 3, 1), (20, 8, 2, 2), (22, 8, 3, 2), (32, 16, 4, 4), (40, 16, 6, 4), (9, 8, 7, 1),
    (8, 8, 3, 1), (30, 10, 9, 2), (100, 16, 8, 4),
]


def _cond(batch: int, total: int, ratio: int, h: int = 4, w: int = 4, **extra) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(text=torch.randn(batch, 5, 8, generator=g), text_mask=torch.ones(batch, 5, dtype=torch.bool),
                fps=torch.full((batch,), 8.0), cond=torch.randn(batch, 3, total // ratio, h, w, generator=g),
                aug_logsnr=torch.zeros(batch), **extra)


def test_window_starts_cases():
    assert window_starts(24, 8, 0) == [0, 8, 16]  # exact cover, no overlap
    assert window_starts(17, 8, 3) == [0, 5, 9]  # the last window ends at 17
    assert window_starts(8, 8, 3) == [0]  # one clip
    assert window_starts(20, 8, 2, align=2) == [0, 6, 12]
    assert window_starts(22, 8, 3, align=2) == [0, 4, 8, 12, 14]  # stride 5 rounded down to 4
    assert window_starts(32, 16, 4, align=4) == [0, 12, 16]
    assert window_starts(40, 16, 6, align=4) == [0, 8, 16, 24]  # stride 10 rounded down to 8
    assert window_starts(16, 4, 3, align=4) == [0, 4, 8, 12]  # stride 1 raised to align 4


@pytest.mark.parametrize("total,window,overlap,align", CASES)
def test_window_starts_cover_and_align(total, window, overlap, align):
    starts = window_starts(total, window, overlap, align)
    assert starts[0] == 0 and starts[-1] + window == total
    assert all(a % align == 0 for a in starts)
    assert all(b > a for a, b in zip(starts, starts[1:]))  # strictly increasing
    assert all(b - a <= window for a, b in zip(starts, starts[1:]))  # no gap
    stride = max((window - overlap) // align * align, align)
    assert all(b - a == stride for a, b in zip(starts[:-1], starts[1:-1]))


@pytest.mark.parametrize("args,match", [
    ((7, 8, 2), "shorter than the window"),
    ((20, 8, 8), "overlap"),
    ((20, 8, -1), "overlap"),
    ((20, 0, 0), "at least 1"),
    ((20, 8, 2, 0), "at least 1"),
    ((21, 8, 2, 2), "multiple of 2"),  # the last window cannot start on an input frame
    ((24, 6, 2, 4), "window .6. must be a multiple"),
])
def test_window_starts_errors(args, match):
    with pytest.raises(ValueError, match=match):
        window_starts(*args)


@pytest.mark.parametrize("total,window,overlap,align", CASES)
def test_blend_weights_sum_to_one(total, window, overlap, align):
    starts = window_starts(total, window, overlap, align)
    weights = blend_weights(total, window, starts, overlap)
    assert weights.shape == (len(starts), window) and weights.dtype == torch.float64
    assert (weights > 0).all()
    total_weight = torch.zeros(total, dtype=torch.float64)
    for a, w in zip(starts, weights):
        total_weight[a:a + window] += w
    torch.testing.assert_close(total_weight, torch.ones(total, dtype=torch.float64), rtol=0, atol=1e-12)


def test_blend_weights_ramps():
    w = blend_weights(20, 8, [0, 6, 12], 2)  # overlaps of exactly 2 frames: ramps 1/3, 2/3 cross
    third = 1 / 3
    torch.testing.assert_close(w[0], torch.tensor([1, 1, 1, 1, 1, 1, 2 * third, third], dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.tensor([third, 2 * third, 1, 1, 1, 1, 2 * third, third],
                                                  dtype=torch.float64))
    torch.testing.assert_close(w[2], w[0].flip(0))
    assert torch.equal(blend_weights(8, 8, [0], 3), torch.ones(1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="uncovered"):
        blend_weights(20, 8, [0, 12], 2)
    with pytest.raises(ValueError, match="must lie in"):
        blend_weights(20, 8, [0, 13], 2)


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_upsampled_cond_passes_through(ratio):
    def denoiser(z, logsnr, *, cond, **_):  # x_hat = the lower stage's video, frames repeated r times
        return cond.repeat_interleave(ratio, dim=2).to(z.dtype)

    total, window = 40, 8
    windowed = WindowedDenoiser(denoiser, window=window, overlap=4, ratio=ratio)
    z = torch.randn(2, 3, total, 4, 4, dtype=torch.float64)
    constant = torch.full((2, 3, total // ratio, 4, 4), 0.3, dtype=torch.float64)
    out = windowed(z, torch.zeros(2), **_cond(2, total, ratio) | dict(cond=constant))
    torch.testing.assert_close(out, torch.full_like(z, 0.3), rtol=0, atol=1e-12)  # constant stays constant
    # a varying cond passes through too: each window's cond frames line up with its z frames
    varying = torch.arange(total // ratio, dtype=torch.float64)[:, None, None].expand(2, 3, -1, 4, 4)
    out = windowed(z, torch.zeros(2), **_cond(2, total, ratio) | dict(cond=varying))
    torch.testing.assert_close(out, varying.repeat_interleave(ratio, dim=2), rtol=0, atol=1e-12)
    assert windowed.calls == 2 * len(windowed.windows(total))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_identity_and_pointwise_pass_through(dtype):
    total = 26
    frame = torch.arange(total, dtype=torch.float64)[:, None, None]  # the absolute frame index, encoded in z
    z = (frame + torch.randn(2, 3, total, 4, 4, dtype=torch.float64)).to(dtype)
    tol = dict(float64=1e-12, float32=1e-5, bfloat16=1e-2)[str(dtype).split(".")[1]]
    for fn in (lambda z: z, lambda z: torch.sin(z) * z):
        windowed = WindowedDenoiser(lambda z, logsnr, **_: fn(z), window=8, overlap=3)
        out = windowed(z, torch.zeros(2), **_cond(2, total, 1))
        assert out.dtype == dtype and out.shape == z.shape
        torch.testing.assert_close(out.double(), fn(z).double(), rtol=tol, atol=tol * total)
        assert windowed.calls == len(windowed.windows(total)) == 5


def test_window_length_input_is_the_denoiser():
    received = []

    def denoiser(z, logsnr, **cond):
        received.append(cond)
        return torch.sin(z) * logsnr[:, None, None, None, None] + cond["cond"].mean()

    windowed = WindowedDenoiser(denoiser, window=8, overlap=2, ratio=2)
    z, logsnr, cond = torch.randn(2, 3, 8, 4, 4), torch.tensor([0.5, -1.0]), _cond(2, 8, 2)
    out = windowed(z, logsnr, **cond)
    assert windowed.calls == 1 and len(received) == 1
    assert all(received[0][k] is v for k, v in cond.items())  # kwargs untouched
    assert torch.equal(out, denoiser(z, logsnr, **cond))


def test_windows_receive_their_slices():
    received = []

    def denoiser(z, logsnr, **cond):
        received.append((z, logsnr, cond))
        return z

    total, window, ratio = 20, 8, 2
    known = torch.randn(2, 3, total, 4, 4)
    known_mask = torch.rand(2, total) > 0.5
    cond = _cond(2, total, ratio, known=known, known_mask=known_mask, guidance=torch.ones(2),
                 is_image=torch.zeros(2, dtype=torch.bool))
    windowed = WindowedDenoiser(denoiser, window=window, overlap=2, ratio=ratio)
    z, logsnr = torch.randn(2, 3, total, 4, 4), torch.tensor([0.5, -1.0])
    windowed(z, logsnr, **cond)
    starts = windowed.windows(total)
    assert starts == [0, 6, 12] and len(received) == 3
    for a, (z_i, logsnr_i, cond_i) in zip(starts, received):
        assert torch.equal(z_i, z[:, :, a:a + window]) and logsnr_i is logsnr
        assert torch.equal(cond_i["known"], known[:, :, a:a + window])
        assert torch.equal(cond_i["known_mask"], known_mask[:, a:a + window])
        assert torch.equal(cond_i["cond"], cond["cond"][:, :, a // ratio:(a + window) // ratio])
        assert cond_i["cond"].shape[2] == window // ratio
        for key in ("text", "text_mask", "fps", "aug_logsnr", "guidance", "is_image"):
            assert cond_i[key] is cond[key]  # per-sample: unchanged
    with pytest.raises(ValueError, match="cond has 9 frames"):
        windowed(z, logsnr, **cond | dict(cond=cond["cond"][:, :, :9]))


def test_video_unet_windowed_tsr():
    """A real tiny TSR U-Net (temporal convolutions) over 3 windows: finite, right shape, and on frames
    whose receptive field (2 temporal convs of kernel 3: 2 frames) stays inside every covering window it
    equals the full-length pass, since such a stage is local in time."""
    unet = VideoUNet(channels=8, channel_mults=(1,), num_res_blocks=1, cross_attention=False,
                     spatial_attention=False, temporal="conv", text_dim=8, cond_channels=3, aug_conditioning=True,
                     head_dim=8).eval()
    with torch.no_grad():
        for p in unet.parameters():  # the zero-initialised layers would make the network trivially local
            p.add_(0.2 * torch.randn_like(p))
    total, window, overlap, ratio, reach = 24, 12, 6, 2, 2
    windowed = WindowedDenoiser(unet, window=window, overlap=overlap, ratio=ratio)
    z, logsnr, cond = torch.randn(2, 3, total, 8, 8), torch.tensor([1.0, -2.0]), _cond(2, total, ratio, 8, 8)
    with torch.no_grad():
        out = windowed(z, logsnr, **cond)
        full = unet(z, logsnr, **cond)
    starts = windowed.windows(total)
    assert starts == [0, 6, 12] and windowed.calls == 3
    assert out.shape == z.shape and out.dtype == z.dtype and torch.isfinite(out).all()
    safe = [t for t in range(total) if all((a == 0 or t - a >= reach) and (a + window == total
                                                                           or a + window - 1 - t >= reach)
                                           for a in starts if a <= t < a + window)]
    assert {8, 9, 14, 15} <= set(safe)  # frames inside two windows' overlap are among them
    torch.testing.assert_close(out[:, :, safe], full[:, :, safe], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, full, atol=1e-3)  # near the cut edges the windows do see less
