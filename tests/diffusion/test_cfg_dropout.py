"""Caption dropout trains exactly the unconditional model that guidance evaluates."""

import pytest
import torch

from cascade.diffusion import drop_captions
from cascade.nn import VideoUNet


def test_dropout_rate_and_whole_captions():
    mask = torch.ones(20_000, 7, dtype=torch.bool)
    mask[:, 5:] = False
    dropped = drop_captions(mask, 0.1, torch.Generator().manual_seed(0))
    gone = ~dropped.any(dim=1)
    assert abs(gone.float().mean().item() - 0.1) < 0.01  # binomial std is 0.002
    assert torch.equal(dropped[~gone], mask[~gone])  # kept captions are untouched, padding stays masked
    assert torch.equal(drop_captions(mask, 0.0), mask) and not drop_captions(mask, 1.0).any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_captions(mask, 1.5)


def test_a_dropped_caption_is_the_unconditional_input():
    torch.manual_seed(0)
    net = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=1, head_dim=8, text_dim=12).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, logsnr, fps = torch.randn(2, 3, 2, 8, 8), torch.zeros(2), torch.full((2,), 4.0)
    text, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    dropped = drop_captions(mask, 1.0)
    torch.testing.assert_close(net(x, logsnr, text=text, text_mask=dropped, fps=fps), net(x, logsnr, fps=fps))
