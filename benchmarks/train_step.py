"""One training step of cascade's base-stage `VideoUNet` against two peers, imagen-pytorch's `Unet3D` and
diffusers' `UNet3DConditionModel`, side by side.

    bash benchmarks/setup_peers.sh                          # once: .venv-bench with torch, the peers, cascade
    .venv-bench/bin/python benchmarks/train_step.py         # CPU, fp32, the reference input
    .venv-bench/bin/python benchmarks/train_step.py --device cuda --dtype bfloat16 --batch 8 --frames 16 --size 64

What is measured, per model, on identical input tensors (same seed, same values, same shapes):
- train step: forward + MSE loss + backward + AdamW step (+ zero_grad), split into its forward / backward /
  optimizer parts; `fwd+bwd` is forward + backward.
- forward only: the forward under `torch.no_grad()` (sampling cost per network evaluation).
- parameters, FLOPs of one forward and of forward + backward (`torch.utils.flop_counter.FlopCounterMode`, which
  counts matrix products, convolutions and attention; AdamW and elementwise ops are not counted), and the number of
  ATen ops one forward issues, counted below autograd by a dispatch mode, views included (what launch overhead
  scales with on a GPU).
- peak memory of a train step (see below).

Timing alternates the models in one process: `--warmup` rounds, then `--repeats` rounds, each round one step of
ours, then one of imagen-pytorch, then one of diffusers (A B C A B C ...), so all see the same machine load over
time; the report gives medians and the ratio peer / ours of the medians (> 1: ours is faster). The machine this
runs on is shared and noisy: compare only within one run.

Memory is measured in a fresh child process per model, not in the timing process: on CPU the only honest measure
is the resident set size, and PyTorch's CPU allocator keeps no peak statistics (`torch.cuda.max_memory_allocated`
has no CPU counterpart), while the process-wide RSS peak of a process holding both models mixes the two (and glibc
keeps freed memory mapped, so the second model would inherit the first's peak). Each child builds one model and the
inputs, resets the kernel's high-water mark (`/proc/self/clear_refs`, value 5), runs two train steps (the first
allocates AdamW's state) and reads `VmHWM`. Reported: the peak RSS and its growth over the RSS after building the
model and the inputs (activations, gradients, optimizer state and allocator slack). On CUDA the children report
`torch.cuda.max_memory_allocated` over the same two steps instead. The children also count FLOPs and ops.

Conditioning: every network gets the same noisy video, the same log-SNR per sample, the same T5-sized text
embeddings and the same padding mask. What each network does with them differs; see CONDITIONING_DIFFERENCES,
which is also written into the JSON (diffusers, for one, repeats the text once per frame and ignores the mask).
Models are matched by parameter count (each peer within 10 % of ours), not by layout: ours follows Imagen's
Efficient U-Net (fewer blocks at high resolution, more at low resolution), with imagen-pytorch's channel widths at
every resolution.

imagen-pytorch's `import` reaches the Hugging Face hub (a default argument of `Unet3D` reads the T5 config of
google/t5-v1_1-base at class-definition time); `import_imagen` sets HF_HUB_OFFLINE and shims that one call, which
only decides a default we override (`text_embed_dim=4096`). The peers' prints are captured, not shown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent

# Ours: imagen-pytorch's widths per resolution (64, 128, 256, 384 at 32, 16, 8, 4 px), blocks growing towards low
# resolution (Imagen App. B.1); 47.7M parameters against imagen-pytorch's 49.2M and diffusers' 50.1M.
OURS_CONFIG = dict(
    in_channels=3, out_channels=3, cond_channels=0,
    channels=64, channel_mults=(1, 2, 4, 6), num_res_blocks=(1, 2, 3, 3),
    spatial_attention=(False, False, True, True), cross_attention=(False, True, True, True),
    temporal=("attention",) * 4, head_dim=64, text_dim=4096,
)
# imagen-pytorch 2.1.0 Unet3D as in shared/reference/peer-benchmarks.md (49.2M parameters);
# `max_text_len` is set to --text-len at build time so it sees every token ours sees.
IMAGEN_CONFIG = dict(
    dim=64, dim_mults=(1, 2, 4, 6), num_resnet_blocks=2,
    layer_attns=(False, False, True, True), layer_cross_attns=(False, True, True, True),
    attn_heads=8, attn_dim_head=64, text_embed_dim=4096, max_text_len=64,
)
# diffusers 0.42.1 UNet3DConditionModel as in shared/reference/peer-benchmarks.md (50.1M parameters): spatial
# self- and cross-attention at the first three levels (32, 16, 8 px), none at 4 px but in the middle block.
# `attention_head_dim=8` is, by a naming quirk of this class, the number of heads.
DIFFUSERS_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(64, 128, 256, 256), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    cross_attention_dim=4096, attention_head_dim=8,
)
PEERS = ("imagen", "diffusers")
CLASSES = {"ours": "cascade.nn.unet.VideoUNet", "imagen": "imagen_pytorch.imagen_video.Unet3D",
           "diffusers": "diffusers.UNet3DConditionModel"}
LABELS = {"ours": "ours: cascade VideoUNet", "imagen": "imagen-pytorch Unet3D",
          "diffusers": "diffusers UNet3DConditionModel"}
CONDITIONING_DIFFERENCES = {"imagen": [
    "Both get the same log-SNR per sample (imagen-pytorch's continuous-time diffusion also conditions its Unet3D on "
    "log-SNR): ours through Fourier features + MLP, the peer through learned sinusoidal features + MLP.",
    "Text, ours: LayerNorm + Linear(4096 -> 384) of all L tokens; cross-attention at levels 2-4 attends to those L "
    "tokens plus a learned null token, padded tokens masked out; the masked mean of the projected tokens is added "
    "to the noise embedding (FiLM in every ResBlock).",
    "Text, peer: Linear(4096 -> 64) of the tokens, padded tokens replaced by a learned null embedding (the mask is "
    "not used in attention), then a 2-layer Perceiver resampler to 36 latents (32 learned + 4 from the mean); "
    "cross-attention (and the spatial self-attention blocks, layer_attns_add_text_cond) attend to those 36 latents "
    "plus 2 time tokens, all of width 64; their mean also feeds the time conditioning.",
    "Ours also conditions on frame rate (fps_conditioning, default on; the benchmark passes 8 fps for every sample); "
    "the peer has no frame-rate input.",
    "Temporal layers: ours, non-causal temporal attention with a learned relative-position bias in every block of "
    "every level; the peer, causal temporal attention (relative-position MLP bias) plus a causal depthwise temporal "
    "conv once per level and at the stem and middle, and pseudo-3D ResNet blocks with a global-context attention.",
    "Layout: ours, 1/2/3/3 units per level on the way down and the same on the way up, one additive skip per level "
    "(Efficient U-Net); the peer, 1 + 2 ResNet blocks per level each way plus a middle block pair with attention, "
    "concatenated skips per block, cross-embed stem and pixel-shuffle upsampling.",
], "diffusers": [
    "Both get the same log-SNR per sample, used as diffusers' `timestep`: sinusoidal features (max period 10^4) + "
    "MLP; diffusers' model is written for integer timesteps 0-999, the values here lie in [-20, 20]. Ours: Fourier "
    "features + MLP.",
    "Text, diffusers: no text projection and no pooled text; the 4096-wide tokens are repeated once per frame "
    "(B*T copies) and every cross-attention projects them to keys and values (4096 -> 64/128/256) for each frame "
    "separately. Cross-attention sits in every block of the first three levels and in the middle block; the time "
    "embedding alone drives the ResNet blocks.",
    "Padding, diffusers: the mask is passed as `attention_mask`, which 0.42.1 accepts but forwards to no attention "
    "layer (checked: the output is identical with and without it), so padded tokens are attended to. Ours masks "
    "them out.",
    "Ours also conditions on frame rate; diffusers has no frame-rate input.",
    "Temporal layers: diffusers, a temporal transformer (non-causal self-attention over frames, no position bias) "
    "after every spatial transformer and at the stem, and a 4-layer temporal conv stack after every ResNet block; "
    "ours, non-causal temporal attention with a learned relative-position bias in every block of every level.",
    "Layout: diffusers, 1 ResNet block per level down, 2 up (concatenated skips), widths 64/128/256/256, a middle "
    "block with cross-attention at 4 px, spatial self-attention at 32, 16 and 8 px (ours: at 8 and 4 px only), "
    "frames folded into the batch for every spatial layer.",
]}


# ---------------------------------------------------------------------------------------------------------------
# Models


def import_imagen() -> type[nn.Module]:
    """imagen_pytorch.imagen_video.Unet3D, importable without network access and without printing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    original = transformers.T5Config.from_pretrained
    # Only the default `text_embed_dim` of Unet3D depends on this call; we always pass text_embed_dim=4096.
    transformers.T5Config.from_pretrained = classmethod(lambda cls, *args, **kwargs: cls(d_model=768))
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from imagen_pytorch.imagen_video import Unet3D
    finally:
        transformers.T5Config.from_pretrained = original
    return Unet3D


def import_diffusers() -> type[nn.Module]:
    """diffusers.UNet3DConditionModel, importable without network access and without warnings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import UNet3DConditionModel
    return UNet3DConditionModel


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, Callable[..., Tensor], dict]:
    """(model, call(model, inputs) -> output, config) for 'ours', 'imagen' or 'diffusers', on args.device, in
    train mode."""
    torch.manual_seed(0)
    if name == "ours":
        from cascade.nn.unet import VideoUNet

        config = dict(OURS_CONFIG)
        model = VideoUNet(**config)

        def call(m: nn.Module, inp: dict) -> Tensor:
            return m(inp["x"], inp["logsnr"], text=inp["text"], text_mask=inp["mask"], fps=inp["fps"])
    elif name == "imagen":
        config = dict(IMAGEN_CONFIG, max_text_len=args.text_len)
        unet3d = import_imagen()
        with contextlib.redirect_stdout(io.StringIO()):  # "The base dimension of your u-net should ideally be ..."
            model = unet3d(**config)

        def call(m: nn.Module, inp: dict) -> Tensor:
            return m(inp["x"], inp["logsnr"], text_embeds=inp["text"], text_mask=inp["mask"])
    elif name == "diffusers":
        config = dict(DIFFUSERS_CONFIG)
        model = import_diffusers()(**config)

        def call(m: nn.Module, inp: dict) -> Tensor:
            # log-SNR as the timestep; the text is repeated per frame inside; attention_mask is not used by 0.42.1
            return m(inp["x"], inp["logsnr"], encoder_hidden_states=inp["text"], attention_mask=inp["mask"],
                     return_dict=False)[0]
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(args.device).train(), call, config


def make_inputs(args: argparse.Namespace) -> dict[str, Tensor]:
    """The same tensors for every model, from a fixed seed, built on the CPU then moved."""
    g = torch.Generator().manual_seed(1234)
    b, length = args.batch, args.text_len
    t = torch.rand(b, generator=g)
    # clipped cosine log-SNR in [-20, 20] (Kingma et al. 2021): lambda = -2 log tan(a t + b)
    lo, hi = math.atan(math.exp(-10.0)), math.atan(math.exp(10.0))
    logsnr = -2.0 * torch.log(torch.tan(lo + (hi - lo) * t))
    # sample i keeps length - (i + 1) * length / (2 b) real tokens: every sample has some padding
    lengths = torch.tensor([length - (i + 1) * length // (2 * b) for i in range(b)]).clamp(min=1)
    inputs = {
        "x": torch.randn(b, 3, args.frames, args.size, args.size, generator=g),  # (B, C, T, H, W)
        "target": torch.randn(b, 3, args.frames, args.size, args.size, generator=g),
        "logsnr": logsnr,  # (B,)
        "text": torch.randn(b, length, 4096, generator=g),  # (B, L, 4096), T5-XXL width
        "mask": torch.arange(length)[None, :] < lengths[:, None],  # (B, L) bool, True = real token
        "fps": torch.full((b,), 8.0),  # (B,), ours only
    }
    return {k: v.to(args.device) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Steps


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args: argparse.Namespace):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)


def train_step(model: nn.Module, call: Callable, opt: torch.optim.Optimizer, inp: dict,
               args: argparse.Namespace) -> dict[str, float]:
    """Forward, MSE loss, backward, AdamW step; seconds of each part and in all."""
    sync(args.device)
    t0 = time.perf_counter()
    with autocast(args):
        out = call(model, inp)
        loss = F.mse_loss(out.float(), inp["target"])
    sync(args.device)
    t1 = time.perf_counter()
    loss.backward()
    sync(args.device)
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(args.device)
    t3 = time.perf_counter()
    return {"train_step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
            "fwd_bwd": t2 - t0}


def forward_only(model: nn.Module, call: Callable, inp: dict, args: argparse.Namespace) -> float:
    sync(args.device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(args):
        call(model, inp)
    sync(args.device)
    return time.perf_counter() - t0


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # foreach=True is the default on CUDA; on CPU make both models use the same (multi-tensor) implementation.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)


# ---------------------------------------------------------------------------------------------------------------
# Child process: memory, FLOPs, op count of one model


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def child(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, call, _ = build(name, args)
    inp = make_inputs(args)
    opt = make_optimizer(model)
    result: dict = {}
    cuda = args.device.startswith("cuda")
    if cuda:
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base_kib = _proc_status_kib("VmRSS")
        hwm_reset = _reset_hwm()
    for _ in range(2):
        train_step(model, call, opt, inp, args)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result["memory"] = {"kind": "torch.cuda.max_memory_allocated", "peak_bytes": peak,
                            "growth_bytes": peak - base, "baseline_bytes": base}
    else:
        peak_kib = _proc_status_kib("VmHWM")
        result["memory"] = {
            "kind": "peak RSS (VmHWM after clear_refs)" if hwm_reset else "peak RSS (VmHWM, process lifetime)",
            "peak_bytes": peak_kib * 1024 if peak_kib is not None else None,
            "baseline_bytes": base_kib * 1024 if base_kib is not None else None,
            "growth_bytes": (peak_kib - base_kib) * 1024 if None not in (peak_kib, base_kib) else None,
        }

    from torch.utils.flop_counter import FlopCounterMode

    try:
        with autocast(args):
            with FlopCounterMode(display=False) as counter:
                out = call(model, inp)
            forward_flops = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                out = call(model, inp)
                F.mse_loss(out.float(), inp["target"]).backward()
            result["flops"] = {"forward": forward_flops, "fwd_bwd": counter.get_total_flops()}
    except Exception as err:  # noqa: BLE001 - report, do not fail the benchmark
        result["flops"] = {"error": f"{type(err).__name__}: {err}"}
    opt.zero_grad(set_to_none=True)
    try:
        with torch.no_grad(), autocast(args), _OpCounter() as ops:
            call(model, inp)
        result["aten_ops_forward"] = ops.count
    except Exception as err:  # noqa: BLE001
        result["aten_ops_forward"] = f"{type(err).__name__}: {err}"
    return result


def run_child(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    for key in ("device", "dtype", "batch", "frames", "size", "text_len", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child for {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Profile


def profile(name: str, args: argparse.Namespace, rows: int = 25) -> str:
    """torch.profiler table of one train step (after one warm-up step), top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, call, _ = build(name, args)
    inp = make_inputs(args)
    opt = make_optimizer(model)
    train_step(model, call, opt, inp, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        train_step(model, call, opt, inp, args)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


# ---------------------------------------------------------------------------------------------------------------
# Main


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _environment(args: argparse.Namespace) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "imagen_pytorch": ver("imagen-pytorch"),
        "diffusers": ver("diffusers"),
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "cascade", "benchmarks")),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt_flops(n) -> str:
    return f"{n / 1e9:.0f}" if isinstance(n, (int, float)) else "n/a"


def report_table(result: dict) -> str:
    """Columns: ours, then each peer with its ratio peer / ours. Times: median (min) and the ratio of the medians
    (of the minima); under contention the minimum is the run with the least interference, so both are shown."""
    models = result["models"]
    peers = [n for n in models if n != "ours"]
    o = models["ours"]
    header = ["", LABELS["ours"]]
    for n in peers:
        header += [LABELS[n], f"{n} / ours"]
    rows = [header]

    def add(label: str, cell: Callable[[dict], str], ratio: Callable[[dict, dict], str] = lambda p, o: "") -> None:
        row = [label, cell(o)]
        for n in peers:
            row += [cell(models[n]), ratio(models[n], o)]
        rows.append(row)

    add("parameters", lambda m: f"{m['params'] / 1e6:.2f}M", lambda p, o: f"{p['params'] / o['params']:.3f}")
    for key, label in (("train_step", "train step (fwd+bwd+AdamW)"), ("fwd_bwd", "  fwd+bwd"),
                       ("forward", "  forward (with grad)"), ("backward", "  backward"),
                       ("optimizer", "  AdamW step"), ("forward_nograd", "forward only (no_grad)")):
        add(label, lambda m, k=key: f"{m['time_s'][k]['median']:.3f} s ({m['time_s'][k]['min']:.3f})",
            lambda p, o, k=key: f"{p['time_s'][k]['median'] / o['time_s'][k]['median']:.2f}x "
                                f"({p['time_s'][k]['min'] / o['time_s'][k]['min']:.2f}x)")

    def mem(key: str) -> Callable[[dict], str]:
        return lambda m: _fmt_bytes(m.get("memory", {}).get(key))

    def mem_ratio(key: str) -> Callable[[dict, dict], str]:
        def ratio(p: dict, o: dict) -> str:
            a, b = o.get("memory", {}).get(key), p.get("memory", {}).get(key)
            return f"{b / a:.2f}" if a and b else ""
        return ratio

    add("peak memory", mem("peak_bytes"), mem_ratio("peak_bytes"))
    add("  growth during train steps", mem("growth_bytes"), mem_ratio("growth_bytes"))
    for key, label in (("fwd_bwd", "GFLOP per train step (fwd+bwd)"), ("forward", "GFLOP per forward")):
        add(label, lambda m, k=key: _fmt_flops(m.get("flops", {}).get(k)),
            lambda p, o, k=key: f"{p['flops'][k] / o['flops'][k]:.2f}"
            if k in p.get("flops", {}) and k in o.get("flops", {}) else "")
    for m in models.values():
        if "fwd_bwd" in m.get("flops", {}):
            m["gflops_per_s_fwd_bwd"] = m["flops"]["fwd_bwd"] / m["time_s"]["fwd_bwd"]["median"] / 1e9
    add("achieved GFLOP/s (fwd+bwd)",
        lambda m: f"{m['gflops_per_s_fwd_bwd']:.1f}" if "gflops_per_s_fwd_bwd" in m else "n/a")
    add("ATen ops per forward", lambda m: str(m.get("aten_ops_forward", "n/a")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (or cuda:N)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 runs under torch.autocast (weights and AdamW stay fp32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="height = width, pixels")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens (4096 dims each)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, each one step of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--skip-children", action="store_true", help="no memory / FLOP / op-count children")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to run against ours, from {', '.join(PEERS)} (default: all)")
    parser.add_argument("--profile", choices=["ours", *PEERS], help="print a torch.profiler table of one model's "
                        "train step instead of benchmarking")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/train_step-<device>.json, "
                        "with -bfloat16 appended for that dtype)")
    parser.add_argument("--child", choices=["ours", *PEERS], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    peers = tuple(p for p in args.peers.split(",") if p)
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        parser.error(f"--peers {args.peers!r}: choose from {', '.join(PEERS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    torch.set_num_threads(args.threads)
    if args.profile:
        print(profile(args.profile, args))
        return

    names = ("ours", *peers)
    built = {name: build(name, args) for name in names}
    inp = make_inputs(args)
    params = {name: sum(p.numel() for p in built[name][0].parameters()) for name in names}
    for peer in peers:
        mismatch = params[peer] / params["ours"] - 1
        print(f"parameters: ours {params['ours']:,}, {peer} {params[peer]:,} ({mismatch:+.1%})", flush=True)
        if abs(mismatch) > 0.10:
            raise SystemExit(f"parameter counts differ by {mismatch:+.1%} (ours {params['ours']:,}, {peer} "
                             f"{params[peer]:,}); match the configurations to within 10 %")
    opts = {name: make_optimizer(built[name][0]) for name in names}
    print(f"{args.device} {args.dtype}, {args.threads} threads, input {args.batch}x3x{args.frames}x{args.size}x"
          f"{args.size}, text {args.text_len}x4096; order per round: {', '.join(names)}", flush=True)

    times: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    load = {"before": os.getloadavg()}
    for i in range(args.warmup + args.repeats):
        for name in names:  # A B C A B C ...
            model, call, _ = built[name]
            parts = train_step(model, call, opts[name], inp, args)
            if i >= args.warmup:
                for key, value in parts.items():
                    times[name].setdefault(key, []).append(value)
        tag = "warm-up" if i < args.warmup else "train"
        print(f"  {tag} round {i + 1}: " + ", ".join(
            f"{n} {times[n]['train_step'][-1]:.2f} s" if i >= args.warmup else n for n in names), flush=True)
    for name in names:
        built[name][0].eval()
    for i in range(1 + args.repeats):  # one warm-up round for the no-grad path
        for name in names:
            model, call, _ = built[name]
            elapsed = forward_only(model, call, inp, args)
            if i >= 1:
                times[name].setdefault("forward_nograd", []).append(elapsed)
    load["after"] = os.getloadavg()
    configs = {name: built[name][2] for name in names}
    del built, opts

    result: dict = {
        "benchmark": "train_step",
        "settings": {
            "device": args.device, "dtype": args.dtype, "batch": args.batch, "channels": 3, "frames": args.frames,
            "height": args.size, "width": args.size, "text_len": args.text_len, "text_dim": 4096,
            "text_real_tokens": inp["mask"].sum(1).tolist(), "repeats": args.repeats, "warmup": args.warmup,
            "threads": args.threads, "order": f"alternating, {', '.join(names)} in every round",
            "loss": "MSE against a fixed random target", "optimizer": "AdamW(lr=1e-4, weight_decay=0.01, foreach)",
            "loadavg_1_5_15min": load,
        },
        "environment": _environment(args),
        "models": {},
        "conditioning_differences": {peer: CONDITIONING_DIFFERENCES[peer] for peer in peers},
    }
    for name in names:
        result["models"][name] = {
            "name": CLASSES[name], "config": configs[name], "params": params[name],
            "time_s": {k: {"median": _median(v), "min": min(v), "max": max(v), "all": v}
                       for k, v in times[name].items()},
        }
    if not args.skip_children:
        for name in names:
            print(f"  measuring memory and FLOPs of {name} in a child process", flush=True)
            result["models"][name].update(run_child(name, args))
    result["ratios_over_ours"] = {peer: {
        "of_medians": {k: _median(times[peer][k]) / _median(times["ours"][k]) for k in times["ours"]},
        "of_minima": {k: min(times[peer][k]) / min(times["ours"][k]) for k in times["ours"]},
    } for peer in peers}

    table = report_table(result)
    print()
    print(table)
    print(f"\ntimes: median (min) of {args.repeats} rounds after {args.warmup} warm-up rounds; ratio > 1: ours is "
          f"faster. "
          f"load average before {load['before'][0]:.1f}, after {load['after'][0]:.1f}")
    out = args.out or REPO / "benchmarks" / "results" / (
        f"train_step-{args.device.split(':')[0]}" + ("" if args.dtype == "float32" else f"-{args.dtype}") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
