"""A memory and compute plan of every stage's training, before any job is submitted (`cascade plan`).

Nothing is allocated: each stage's network is built under `FakeTensorMode` and one real training step (the loss of
`cascade.diffusion` and backward, in the recipe's precision) runs on fake tensors at the recipe's micro-batch and
training crop. A dispatch mode records every tensor storage the step creates and when it
dies, which gives the peak of live bytes; `FlopCounterMode` counts the FLOPs. Per-rank state (weights, gradients,
AdamW, EMA) follows from the parameter count and the stage's strategy; clipping, AdamW and the EMA update run after
backward and add temporaries of `OPTIMIZER_TRANSIENT` times the local fp32 weights:

- ddp: every rank holds fp32 weights (4 B/param), fp32 gradients plus DDP's gradient buckets (assumed a full second
  copy, the worst case without `gradient_as_bucket_view`: 8 B/param), AdamW's two moments (8 B) and the EMA (4 B).
- fsdp (FSDP2 per U-Net block and at the root): weights, gradients, AdamW and EMA all sharded over the world; on top,
  the gathered bf16 parameters of the root and of two blocks (the running one and the prefetched one) and the
  unsharded gradients of the root and of one block (bf16, plus the fp32 copy reduce-scattered).

The activation peak is measured on the step itself (gradients of the parameters excluded: they are counted above).
bf16-mixed is CPU autocast to bfloat16 with normalization layers promoted to float32, as CUDA autocast does (CPU
autocast keeps them in bf16). A fixed allowance (CUDA context, NCCL buffers) and a share of the rest (allocator
fragmentation) are added before the total is compared with the GPU's memory.
"""

from __future__ import annotations

import json
import sys
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cascade.recipe.schema import Recipe, Stage

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
DEFAULT_MFU = 0.4
CONTEXT_GIB = 3.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers, per rank
FRAGMENTATION = 0.10  # caching-allocator slack, as a share of everything else
OPTIMIZER_TRANSIENT = 0.1  # temporaries of clipping, foreach AdamW and the EMA update, per fp32 weight byte (0.09
# measured with `StepRecorder` on the tiny base; AdamW's moments themselves are counted as state)


# --------------------------------------------------------------------------------------------------------------
# measuring a step: live bytes and FLOPs
# --------------------------------------------------------------------------------------------------------------
class StepRecorder(TorchDispatchMode):
    """Records every storage an op creates (bytes, when it was created, when it died), on real or fake tensors, and
    counts FLOPs with torch's formulas (`torch.utils.flop_counter`; its `FlopCounterMode` is not used: its module
    tracker keeps activations alive, which inflated the measured peak 3-fold under checkpointing).

    Views and in-place results share an input's storage and are not counted. `peak(exclude=...)` replays the
    record, leaving out storages that are still alive (e.g. parameters' gradients, counted elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.events: list[tuple[int, int]] = []  # (key, +bytes) at creation, (key, -bytes) at death
        self._alive: dict[int, tuple[int, int]] = {}  # id(storage) -> (key, bytes)
        self._next = 0
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        """Name the current point of the record (e.g. 'backward'), to take peaks over a phase."""
        self.marks[name] = len(self.events)

    def _died(self, ident: int) -> None:
        key, size = self._alive.pop(ident)
        self.events.append((key, -size))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ident = id(storage)
            if ident in inputs or ident in self._alive:
                continue
            size = storage.nbytes()
            self._alive[ident] = (self._next, size)
            self.events.append((self._next, size))
            self._next += 1
            weakref.finalize(storage, self._died, ident)
        return out

    def keys_of(self, tensors) -> set[int]:
        """Record keys of these tensors' storages (those created under this mode and still alive)."""
        found = (self._alive.get(id(t.untyped_storage())) for t in tensors if t is not None)
        return {entry[0] for entry in found if entry is not None}

    def peak(self, exclude: set[int] = frozenset(), start: str | None = None, end: str | None = None) -> int:
        """The most bytes alive at once between two marks (from the start of the record, to its end)."""
        lo = self.marks[start] if start else 0
        hi = self.marks[end] if end else len(self.events)
        live = sum(size for key, size in self.events[:lo] if key not in exclude)
        top = live
        for key, size in self.events[lo:hi]:
            if key not in exclude:
                live += size
                top = max(top, live)
        return top


def promote_norms(net: nn.Module) -> nn.Module:
    """Under CPU autocast, run the network's group and layer normalizations in float32, as CUDA autocast does (CPU
    autocast keeps them in bf16, which would halve the bytes of every normalized activation compared with a GPU).
    Changes `net` in place (its modules' forward) and returns it; outside autocast nothing changes."""
    def promoted(module: nn.Module, original: Callable) -> Callable:
        def forward(x: Tensor) -> Tensor:
            if not torch.is_autocast_enabled("cpu"):
                return original(x)
            w = None if module.weight is None else module.weight.float()
            b = None if module.bias is None else module.bias.float()
            if isinstance(module, nn.GroupNorm):
                return F.group_norm(x.float(), module.num_groups, w, b, module.eps)
            return F.layer_norm(x.float(), module.normalized_shape, w, b, module.eps)
        return forward

    for module in net.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.forward = promoted(module, module.forward)
    return net


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP formulas, plus the CPU fused attention (what `scaled_dot_product_attention` runs on CPU; the same
# FLOPs as the GPU kernels).
FLOP_FORMULAS = {**flop_counter.flop_registry,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     flop_counter.shape_wrapper(_cpu_flash_flops),
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                     flop_counter.shape_wrapper(_cpu_flash_backward_flops)}


# --------------------------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------------------------
def train_shape(stage: Stage, recipe: Recipe) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """(frames, height, width) of a training clip (the crop when set) and of its super-resolution input."""
    crop, window = stage.train.crop, stage.train.crop_frames
    frames, height, width = window or stage.frames, crop.height if crop else stage.height, crop.width if crop else stage.width
    if stage.input is None:
        return (frames, height, width), None
    source = recipe.stage(stage.input)
    return (frames, height, width), (frames * source.frames // stage.frames, height * source.height // stage.height,
                                     width * source.width // stage.width)


def synthetic_batch(stage: Stage, recipe: Recipe, batch_size: int, device: str | torch.device = "cpu") -> dict:
    """A model input as `cascade.data.loader.to_model_input` makes it: video (B, 3, T, H, W) and cond
    (B, 3, T', H', W') in [-1, 1] float32, text (B, L, D) float32, text_mask (B, L) bool, fps (B,), and is_image (B,)
    for joint image-video training (all False: every sample a video, the costlier case)."""
    (frames, height, width), low = train_shape(stage, recipe)
    tokens, dim = recipe.text_encoder.max_tokens, recipe.text_encoder.dim
    with torch.device(device):
        batch = dict(video=torch.rand(batch_size, 3, frames, height, width) * 2 - 1,
                     text=torch.randn(batch_size, tokens, dim), text_mask=torch.ones(batch_size, tokens, dtype=torch.bool),
                     fps=torch.full((batch_size,), float(stage.fps)))
        if stage.train.image_fraction > 0:
            batch["is_image"] = torch.zeros(batch_size, dtype=torch.bool)
        if low is not None:
            batch["cond"] = torch.rand(batch_size, 3, *low) * 2 - 1
    return batch


def autocast_of(precision: str) -> torch.autocast | None:
    """What Lightning's precision plugin wraps the forward in (on the CPU here)."""
    if precision in ("bf16-mixed", "16-mixed"):
        return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    return None


def loss_and_backward(net: nn.Module, stage: Stage, batch: dict, precision: str) -> Tensor:
    """One micro-batch of StageModule's training step: draw the noise level and noise, the stage's conditioning
    (caption dropout, noise augmentation), the loss of `cascade.diffusion`, backward."""
    from cascade.diffusion import Denoiser, diffusion_loss, sample_logsnr_train, stage_inputs
    from cascade.recipe.build import build_augmentation, build_known_frames, build_schedule

    x = batch["video"]
    amp = autocast_of(precision)
    with amp if amp is not None else nullcontext():
        logsnr = sample_logsnr_train(x.shape[0], build_schedule(stage), device=x.device).float()
        noise = torch.randn_like(x)
        cond = stage_inputs(batch, build_augmentation(stage), training=True,
                            text_drop_prob=stage.guidance.text_drop_prob, known_frames=build_known_frames(stage))
        loss = diffusion_loss(Denoiser(net, stage.diffusion.parameterization), x, logsnr, noise,
                              stage.diffusion.loss_weighting, **cond).mean()
    loss.backward()
    return loss.detach()


@dataclass
class StepMeasure:
    """What one training step of a stage's network does, per rank and micro-batch."""

    parameters: int
    block_parameters: int  # the largest U-Net block (an FSDP unit)
    root_parameters: int  # parameters outside the blocks (the FSDP root unit)
    step_bytes: int  # peak bytes the forward and backward create, the parameters' gradients included
    activation_bytes: int  # the same without the parameters' gradients
    flops: int  # forward and backward (recomputation included when checkpointing)


def measure_step(net: nn.Module, stage: Stage, recipe: Recipe, batch_size: int, precision: str) -> StepMeasure:
    """Run one forward and backward of `net` (real or fake tensors; the tensors it creates are what is measured)."""
    batch = synthetic_batch(stage, recipe, batch_size, next(net.parameters()).device)
    params = list(net.parameters())
    from cascade.lit.sharding import unet_blocks

    blocks = list(unet_blocks(net))  # the units fully_shard gathers one at a time
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks] or [0]
    tracker = StepRecorder()
    net.train()
    with tracker:
        loss_and_backward(net, stage, batch, precision)
    grads = tracker.keys_of(p.grad for p in params)
    total = sum(p.numel() for p in params)
    measure = StepMeasure(parameters=total, block_parameters=max(block_sizes),
                          root_parameters=total - sum(block_sizes), step_bytes=tracker.peak(),
                          activation_bytes=tracker.peak(exclude=grads),
                          flops=tracker.flops)
    for p in params:
        p.grad = None
    return measure


def with_checkpointing(stage: Stage, checkpointing: bool) -> Stage:
    return stage.model_copy(update=dict(unet=stage.unet.model_copy(update=dict(checkpointing=checkpointing))))


def fake_step(stage: Stage, recipe: Recipe, batch_size: int, precision: str, checkpointing: bool) -> StepMeasure:
    """`measure_step` of the stage's network built on fake tensors: nothing is allocated. Under a sharded strategy
    the network computes in the training dtype (FSDP's all-gathered bf16 parameters; no autocast weight cache)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cascade.recipe.build import build_unet

    with FakeTensorMode(allow_non_fake_inputs=False):
        sharded_bf16 = stage.launch.strategy == "fsdp" and precision == "bf16-mixed"
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if sharded_bf16 else torch.float32)
        try:
            net = build_unet(with_checkpointing(stage, checkpointing), recipe, device="cpu")
        finally:
            torch.set_default_dtype(default)
        return measure_step(promote_norms(net), stage, recipe, batch_size, precision)


# --------------------------------------------------------------------------------------------------------------
# the plan of a stage
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    stage: str
    parameters: int
    strategy: str
    world: int
    micro_batch: int
    accumulate: int
    checkpointing: bool
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    ema_gib: float
    gathered_gib: float  # fsdp: gathered bf16 parameters and unsharded gradients of the root and two blocks
    activations_gib: float  # peak during forward and backward, with checkpointing
    activations_no_ckpt_gib: float  # the same without
    overhead_gib: float  # CUDA context and allocator fragmentation
    total_gib: float
    gpu_memory_gib: float
    fits: bool
    tflop_per_step: float  # per rank, one optimizer step (all accumulated micro-batches)
    seconds_per_step: float
    max_steps: int
    gpu_hours: float

    @property
    def shortfall_gib(self) -> float:
        return max(0.0, self.total_gib - self.gpu_memory_gib)


def plan_stage(stage: Stage, recipe: Recipe, gpus_per_node: int | None = None, gpu_memory_gib: float = 80.0,
               mfu: float = DEFAULT_MFU, peak_tflops: float = H100_BF16_TFLOPS) -> StagePlan:
    """The per-rank memory and the compute of training `stage` (see the module's docstring for the accounting)."""
    train, launch = stage.train, stage.launch
    world = launch.nodes * (gpus_per_node or launch.gpus_per_node)
    precision = train.precision
    on = fake_step(stage, recipe, train.batch_size, precision, checkpointing=True)
    off = fake_step(stage, recipe, train.batch_size, precision, checkpointing=False)
    used = on if stage.unet.checkpointing else off
    flops = used.flops
    p = used.parameters
    if launch.strategy == "fsdp":
        shard = p / world
        weights, grads, optim, ema = 4 * shard, 4 * shard, 8 * shard, 4 * shard
        half = 2 if precision in ("bf16-mixed", "16-mixed", "bf16-true") else 4
        gathered = half * (used.root_parameters + 2 * used.block_parameters) \
            + (half + 4) * (used.root_parameters + used.block_parameters)
    else:
        weights, grads, optim, ema, gathered = 4 * p, 8 * p, 8 * p, 4 * p, 0
    state = weights + grads + optim + ema + gathered
    # Gradient clipping, AdamW and the EMA update run after backward, when the activations are gone.
    working = max(used.activation_bytes, OPTIMIZER_TRANSIENT * weights)
    overhead = CONTEXT_GIB * GIB + FRAGMENTATION * (state + working)
    total = state + working + overhead
    step_flops = flops * train.accumulate_grad_batches
    seconds = step_flops / (mfu * peak_tflops * 1e12)
    return StagePlan(
        stage=stage.name, parameters=p, strategy=launch.strategy, world=world, micro_batch=train.batch_size,
        accumulate=train.accumulate_grad_batches, checkpointing=stage.unet.checkpointing,
        weights_gib=weights / GIB, grads_gib=grads / GIB, optimizer_gib=optim / GIB, ema_gib=ema / GIB,
        gathered_gib=gathered / GIB, activations_gib=on.activation_bytes / GIB,
        activations_no_ckpt_gib=off.activation_bytes / GIB, overhead_gib=overhead / GIB, total_gib=total / GIB,
        gpu_memory_gib=gpu_memory_gib, fits=total <= gpu_memory_gib * GIB, tflop_per_step=step_flops / 1e12,
        seconds_per_step=seconds, max_steps=train.max_steps, gpu_hours=seconds * train.max_steps * world / 3600,
    )


def plan(recipe: Recipe, stages: list[str] | None = None, **options) -> list[StagePlan]:
    """`plan_stage` of each named stage (default: all), in the recipe's order."""
    chosen = [s for s in recipe.stages if stages is None or s.name in stages]
    return [plan_stage(s, recipe, **options) for s in chosen]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def format_plan(rows: list[StagePlan], mfu: float, peak_tflops: float) -> str:
    """The table `cascade plan` prints: one row per stage, GiB per rank, then the assumptions."""
    header = (f"{'stage':<6} {'params':>6} {'strat':<5} {'world':>5} {'mb':>3} {'ckpt':<4} {'weights':>7} {'grads':>6} "
              f"{'optim':>6} {'ema':>5} {'gather':>6} {'act':>6} {'act-nockpt':>10} {'total':>6} {'fits':<4} "
              f"{'TFLOP/step':>10} {'s/step':>6} {'GPU-hours':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.stage:<6} {_count(r.parameters):>6} {r.strategy:<5} {r.world:>5} {r.micro_batch:>3} "
            f"{'yes' if r.checkpointing else 'no':<4} {r.weights_gib:>7.2f} {r.grads_gib:>6.2f} {r.optimizer_gib:>6.2f} "
            f"{r.ema_gib:>5.2f} {r.gathered_gib:>6.2f} {r.activations_gib:>6.2f} {r.activations_no_ckpt_gib:>10.2f} "
            f"{r.total_gib:>6.1f} {'yes' if r.fits else 'NO':<4} {r.tflop_per_step:>10.1f} {r.seconds_per_step:>6.2f} "
            f"{r.gpu_hours:>9,.0f}")
    memory = rows[0].gpu_memory_gib if rows else 0
    lines.append(
        f"GiB per rank of {memory:g} GiB. total = weights + grads + optim + ema + gather + activations (with or "
        f"without checkpointing, as the stage trains) + {CONTEXT_GIB:g} GiB CUDA context + {FRAGMENTATION:.0%} "
        f"fragmentation. ddp: fp32 weights, grads with DDP's bucket copy, AdamW moments and EMA on every rank; fsdp: "
        f"all sharded, plus the gathered bf16 root and two blocks. TFLOP/step per rank (forward, backward, "
        f"recomputation; all accumulated micro-batches); time at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s. The T5 "
        f"encoder is not in the step (embedding cache).")
    return "\n".join(lines)


def plan_command(args) -> int:
    """`cascade plan RECIPE [--gpus-per-node N] [--gpu-memory GiB] [overrides]`."""
    from cascade.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stages = args.stages.split(",") if args.stages else None
    if stages:
        unknown = [s for s in stages if s not in {st.name for st in recipe.stages}]
        if unknown:
            print(f"error: {args.recipe}: no stage {', '.join(unknown)}; the stages are "
                  f"{', '.join(s.name for s in recipe.stages)}", file=sys.stderr)
            return 2
    rows = plan(recipe, stages, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory, mfu=args.mfu,
                peak_tflops=args.peak_tflops)
    print(f"{args.recipe}: {recipe.name}, {len(rows)} stages")
    print(format_plan(rows, args.mfu, args.peak_tflops))
    if args.json:
        args.json.write_text(json.dumps(dict(recipe=str(args.recipe), gpu_memory_gib=args.gpu_memory, mfu=args.mfu,
                                             peak_tflops=args.peak_tflops, context_gib=CONTEXT_GIB,
                                             fragmentation=FRAGMENTATION,
                                             stages=[asdict(r) for r in rows]), indent=2) + "\n")
        print(f"wrote {args.json}")
    short = [r for r in rows if not r.fits]
    for r in short:
        print(f"error: stage {r.stage} does not fit: {r.total_gib:.1f} GiB per rank of {r.gpu_memory_gib:g} GiB "
              f"({r.shortfall_gib:.1f} GiB short)")
    return 1 if short else 0
