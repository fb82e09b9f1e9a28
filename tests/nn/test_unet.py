"""The video U-Net on tiny configs: shapes, what the temporal layers may and may not see, text masking,
activation checkpointing, conditioning paths."""

import pytest
import torch
import torch.nn.functional as F

from cascade.nn import VideoUNet, upsample_condition
from cascade.nn.attention import TemporalAttention, TemporalConv

TEXT_DIM = 32

KINDS = {
    "base": dict(cond_channels=0, spatial_attention=(False, True), temporal="attention"),
    "tsr": dict(cond_channels=3, aug_conditioning=True, spatial_attention=False, temporal="conv"),
    "ssr": dict(cond_channels=3, aug_conditioning=True, spatial_attention=(False, True), temporal="conv"),
}


def make(kind: str, **extra) -> VideoUNet:
    torch.manual_seed(0)
    net = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=(1, 2), cross_attention=(False, True),
                    head_dim=8, text_dim=TEXT_DIM, **{**KINDS[kind], **extra})
    # Output layers start at zero (identity residuals); give every parameter a value so that each path
    # actually contributes and the tests below can see it.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def inputs(kind: str, batch=2, frames=4, size=8, tokens=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, frames, size, size, generator=g)
    text = torch.randn(batch, tokens, TEXT_DIM, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 4:] = False
    kw = dict(text=text, text_mask=mask, fps=torch.full((batch,), 4.0))
    if kind == "tsr":
        kw.update(cond=torch.randn(batch, 3, max(frames // 2, 1), size, size, generator=g), aug_logsnr=torch.zeros(batch))
    if kind == "ssr":
        kw.update(cond=torch.randn(batch, 3, frames, size // 2, size // 2, generator=g), aug_logsnr=torch.zeros(batch))
    return x, torch.tensor([-3.0, 2.0][:batch]), kw


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_finite(kind):
    net = make(kind)
    x, logsnr, kw = inputs(kind)
    y = net(x, logsnr, **kw)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", KINDS)
def test_one_frame_input_ignores_temporal_weights(kind):
    net = make(kind)
    x, logsnr, kw = inputs(kind, frames=1)
    before = net(x, logsnr, **kw)
    temporal = [m for m in net.modules() if isinstance(m, (TemporalAttention, TemporalConv))]
    assert temporal
    with torch.no_grad():
        for module in temporal:
            for p in module.parameters():
                p.copy_(torch.randn_like(p))
    assert torch.equal(net(x, logsnr, **kw), before)


def test_video_frames_interact_in_base():
    net = make("base")
    x, logsnr, kw = inputs("base", frames=4)
    y = net(x, logsnr, **kw)
    x2 = x.clone()
    x2[:, :, 2] += 1.0  # change frame 2 only
    y2 = net(x2, logsnr, **kw)
    for other in (0, 1, 3):
        assert not torch.allclose(y[:, :, other], y2[:, :, other], atol=1e-6), f"frame {other} did not see frame 2"


def test_images_in_a_video_batch_stay_independent():
    """is_image bypasses the temporal layers for those samples only (joint image-video training)."""
    net = make("base")
    x, logsnr, kw = inputs("base", frames=4)
    is_image = torch.tensor([True, False])
    y = net(x, logsnr, is_image=is_image, **kw)
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    y2 = net(x2, logsnr, is_image=is_image, **kw)
    assert torch.allclose(y[0, :, [0, 1, 3]], y2[0, :, [0, 1, 3]], atol=1e-6)  # image sample: frames independent
    assert not torch.allclose(y[1, :, 0], y2[1, :, 0], atol=1e-6)  # video sample: frames interact


@pytest.mark.parametrize("kind", KINDS)
def test_padding_tokens_do_not_change_the_output(kind):
    net = make(kind)
    x, logsnr, kw = inputs(kind)
    y = net(x, logsnr, **kw)
    text = kw["text"].clone()
    text[0, 4:] = torch.randn_like(text[0, 4:]) * 100  # garbage in the padded positions of sample 0
    longer = F.pad(text, (0, 0, 0, 5), value=7.0)  # and five more padding tokens
    longer_mask = F.pad(kw["text_mask"], (0, 5), value=False)
    y2 = net(x, logsnr, **{**kw, "text": longer, "text_mask": longer_mask})
    assert torch.allclose(y, y2, atol=1e-5)
    text[0, 1] = torch.randn_like(text[0, 1])  # a real token does change it
    assert not torch.allclose(net(x, logsnr, **{**kw, "text": text}), y, atol=1e-5)


def test_unconditional_pass_is_defined():
    net = make("base")
    x, logsnr, kw = inputs("base")
    uncond = net(x, logsnr, fps=kw["fps"])  # text=None: only the learned null token
    all_masked = net(x, logsnr, text=kw["text"], text_mask=torch.zeros_like(kw["text_mask"]), fps=kw["fps"])
    assert torch.isfinite(uncond).all()
    assert torch.allclose(uncond, all_masked, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        net = make(kind, checkpointing=checkpointing).train()
        x, logsnr, kw = inputs(kind)
        net(x, logsnr, **kw).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ssr_is_fully_convolutional():
    """Trained on crops, applied at full size: without spatial attention nothing depends on the input size,
    so the same weights run at any size divisible by the downsampling factor."""
    net = make("ssr", spatial_attention=False)
    x, logsnr, kw = inputs("ssr", size=16)
    assert net(x, logsnr, **kw).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        net(x[..., :15, :15], logsnr, **{**kw, "cond": kw["cond"][..., :7, :7]})


def test_condition_upsampling():
    cond = torch.arange(2 * 3 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 3, 2, 4, 4)
    up_t = upsample_condition(cond, frames=6, height=4, width=4)
    assert torch.equal(up_t[:, :, 0], cond[:, :, 0]) and torch.equal(up_t[:, :, 2], cond[:, :, 0])
    assert torch.equal(up_t[:, :, 3], cond[:, :, 1])
    up_s = upsample_condition(cond, frames=2, height=8, width=8)
    expected = F.interpolate(cond[:, :, 1], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(up_s[:, :, 1], expected)
    with pytest.raises(ValueError, match="repeat"):
        upsample_condition(cond, frames=5, height=4, width=4)


def test_guidance_embedding_starts_without_effect():
    """A guidance-distilled student starts as its teacher: the new embedding is zero-initialised."""
    torch.manual_seed(0)
    teacher = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=1, head_dim=8, text_dim=TEXT_DIM)
    student = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=1, head_dim=8, text_dim=TEXT_DIM,
                        guidance_conditioning=True)
    missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("guidance_emb.") for k in missing)
    x, logsnr, kw = inputs("base")
    torch.testing.assert_close(student(x, logsnr, guidance=torch.tensor([0.0, 5.0]), **kw), teacher(x, logsnr, **kw))


def test_missing_conditioning_is_a_clear_error():
    net = make("ssr")
    x, logsnr, kw = inputs("ssr")
    with pytest.raises(ValueError, match="cond"):
        net(x, logsnr, **{k: v for k, v in kw.items() if k != "cond"})
    with pytest.raises(ValueError, match="aug_logsnr"):
        net(x, logsnr, **{k: v for k, v in kw.items() if k != "aug_logsnr"})


@pytest.mark.parametrize("frame_time", [False, True])
def test_frame_time_gives_the_network_the_arrow_of_time(frame_time):
    """Temporal attention whose relative bias is symmetric (as initialised) cannot tell a clip from its reverse: the
    network is exactly equivariant to reversing time, so no caption about motion direction can be learned.
    Frame-time conditioning breaks that symmetry."""
    from cascade.nn import VideoUNet

    torch.manual_seed(0)
    net = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=1, spatial_attention=False,
                    cross_attention=(False, True), temporal="attention", head_dim=8, text_dim=12,
                    frame_time_conditioning=frame_time).eval()
    with torch.no_grad():  # wake the zero-initialised layers, keep the relative bias symmetric (zero)
        for name, p in net.named_parameters():
            if not name.endswith("temporal.bias"):
                p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(2, 3, 5, 8, 8)
    cond = dict(text=torch.randn(2, 4, 12), text_mask=torch.ones(2, 4, dtype=torch.bool), fps=torch.full((2,), 4.0))
    with torch.no_grad():
        forward = net(z, torch.zeros(2), **cond)
        backward = net(z.flip(2), torch.zeros(2), **cond).flip(2)
    gap = (forward - backward).abs().max().item()
    if frame_time:
        assert gap > 1e-3
    else:
        assert gap < 1e-5


@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_temporal_conv_gradient_under_bfloat16_autocast_matches_float32(frames):
    """The weight gradient of the temporal convolution under CPU bfloat16 autocast is float32's to bfloat16's
    precision at every clip length; torch 2.13's conv padding a 2-frame clip itself returned NaN here (and
    precision bf16-mixed with train.crop_frames 2 trained NaN from the second step)."""
    torch.manual_seed(0)
    layer = TemporalConv(16)
    with torch.no_grad():
        layer.conv.weight.normal_(0, 0.1)
    h, upstream = torch.randn(4 * frames, 16, 8, 8), torch.randn(4 * frames, 16, 8, 8)

    def weight_grad(autocast: bool) -> torch.Tensor:
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(h, frames, None)
        (out.float() * upstream).sum().backward()
        return layer.conv.weight.grad.clone()

    exact, low = weight_grad(False), weight_grad(True)
    assert torch.isfinite(low).all() and (low - exact).norm() / exact.norm() < 2e-2


@pytest.mark.parametrize("kind", ["tsr", "ssr"])
def test_residual_unet_is_the_plain_unet_on_the_residual(kind):
    """residual=True is a reparameterization of the same weights: with b = alpha_aug * up(cond), the network sees
    z - alpha b and its output v' becomes v' - sigma b (SRDiff's residual, in v)."""
    plain, residual = make(kind), make(kind, residual=True)
    residual.load_state_dict(plain.state_dict())
    x, logsnr, kw = inputs(kind)
    kw["aug_logsnr"] = torch.tensor([1.6, 8.0])
    b = upsample_condition(kw["cond"], x.shape[2], x.shape[3], x.shape[4]) * torch.sigmoid(
        kw["aug_logsnr"]).sqrt().view(-1, 1, 1, 1, 1)
    alpha, sigma = (torch.sigmoid(s * logsnr).sqrt().view(-1, 1, 1, 1, 1) for s in (1, -1))
    torch.testing.assert_close(residual(x, logsnr, **kw), plain(x - alpha * b, logsnr, **kw) - sigma * b)


def test_an_untrained_residual_unet_returns_its_upsampled_input_from_pure_noise():
    """With the output layer at zero (how a fresh network starts) the residual stage's x-hat at log-SNR -20 is the
    clean input upsampled; a plain stage's is zero."""
    from cascade.diffusion.param import Denoiser

    net = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=1, cross_attention=False, head_dim=8,
                    text_dim=TEXT_DIM, **KINDS["ssr"], residual=True).eval()
    assert not net.out.weight.any()
    x, _, kw = inputs("ssr")
    kw["aug_logsnr"] = torch.full((2,), 20.0)
    x_hat = Denoiser(net, "v")(x, torch.full((2,), -20.0), **kw)
    torch.testing.assert_close(x_hat, upsample_condition(kw["cond"], 4, 8, 8), atol=1e-3, rtol=0)  # alpha = 4.5e-5
    with pytest.raises(ValueError, match="super-resolution"):
        VideoUNet(channels=16, channel_mults=(1, 2), text_dim=TEXT_DIM, residual=True)
