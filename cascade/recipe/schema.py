"""The typed, strict schema of a whole-cascade recipe.

Every section is a pydantic model that forbids unknown keys and coerces nothing (a string is never read as
a number). Checks between fields of different sections, which need the whole stage list, live in
`cascade.recipe.checks`. Attribute docstrings are the documentation: they become the JSON schema's
descriptions, which editors show while a recipe is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import core_schema

from cascade.errors import number_text


@dataclass(frozen=True)
class Sane:
    """Bounds no real recipe comes near: past them a value can only be a mistake (an extra digit, a value meant
    for another field), and a network, a loop or a seed built from it would hang or crash far from the recipe.
    The message says so; the JSON schema carries them as minimum/maximum."""

    low: float | None = None
    high: float | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: Any) -> dict:
        json_schema = handler(schema)
        if self.low is not None:
            json_schema.setdefault("minimum", self.low)
        if self.high is not None:
            json_schema.setdefault("maximum", self.high)
        return json_schema

    def _check(self, value: float) -> float:
        if self.high is not None and value > self.high:
            raise ValueError(f"{number_text(value)} is beyond {number_text(self.high)}, which can only be a mistake")
        if self.low is not None and value < self.low:
            raise ValueError(f"{number_text(value)} is below {number_text(self.low)}, which can only be a mistake")
        return value


# The bounds: far above any real recipe (imagen-video.yaml: channels 384, 8 res blocks, 1280 pixels, 128 frames,
# 10^6 steps, 256 sampling steps, lr 1e-4), far below where anything overflows or hangs.
MAX_WIDTH = 2**16  # channels, attention widths, token counts, pixels, frames, batch sizes
MAX_STEPS = 10**9  # optimizer steps and intervals counted in steps
MAX_SAMPLING_STEPS = 100_000  # network evaluations of a sampler
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds, everywhere a recipe's seed is used
MAX_LOGSNR = 100.0  # |log-SNR|: sigmoid(100) is 1 in float64
MAX_GUIDANCE = 1000.0  # guidance weights (Imagen Video: up to 15)
FVD_MIN_FRAMES = 9  # cascade.eval.fvd.FVDProtocol: I3D needs at least 9 frames (canonical 16)

Probability = Annotated[float, Field(ge=0, le=1)]
Width = Annotated[int, Field(gt=0), Sane(high=MAX_WIDTH)]
Steps = Annotated[int, Field(gt=0), Sane(high=MAX_STEPS)]
SamplingSteps = Annotated[int, Field(gt=0), Sane(high=MAX_SAMPLING_STEPS)]
Seed = Annotated[int, Field(ge=0), Sane(high=MAX_SEED)]
LearningRate = Annotated[float, Field(gt=0), Sane(high=1.0)]
"""Adam's step moves each weight by about lr: 1 or more destroys any network."""
LogSNR = Annotated[float, Sane(low=-MAX_LOGSNR, high=MAX_LOGSNR)]
GuidanceWeight = Annotated[float, Field(ge=0), Sane(high=MAX_GUIDANCE)]
Name = Annotated[str, Field(max_length=255)]  # a file name's limit
PathText = Annotated[str, Field(max_length=4096)]  # a path's limit


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True,
                              validate_default=True, allow_inf_nan=False)


class TextEncoder(Strict):
    path: PathText = "google/t5-v1_1-xxl"
    """Local folder (a `save_pretrained` layout) or hub id of the frozen T5 encoder; the hub only where
    the machine has internet."""
    max_tokens: Width = 128
    """Captions are tokenized to at most this many tokens; padding is masked."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype the encoder runs in."""
    dim: Width = 4096
    """Width of the encoder's token embeddings (4096 for T5-XXL); the U-Nets' text input width."""
    build_tiny: bool = False
    """`cascade run` builds a tiny random T5 of width `dim` at `path` (its tokenizer trained on the dataset's
    captions) when the folder does not exist: for the tiny recipe and tests, never a real model."""


class UNet(Strict):
    channels: Width
    """Width of the outermost level; level i has channels * channel_mults[i]."""
    channel_mults: list[Annotated[int, Field(gt=0), Sane(high=64)]] = Field(min_length=1, max_length=16)
    """Width multiplier per level, outermost first. The video is downsampled 2x between levels."""
    num_res_blocks: list[Annotated[int, Field(gt=0), Sane(high=256)]]
    """Space-time units per level on each path (Efficient U-Net: more at low resolution)."""
    spatial_attention: list[bool]
    """Per-frame spatial self-attention per level."""
    cross_attention: list[bool]
    """Cross-attention to the T5 token embeddings per level."""
    temporal: list[Literal["attention", "conv", "none"]]
    """Temporal layer per level: attention (base stage) or convolution (super-resolution stages)."""
    head_dim: Width = 64
    """Channels per attention head."""
    context_dim: Width | None = None
    """Width the text tokens are projected to once; default: the innermost level's width."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout inside residual blocks."""
    max_temporal_distance: Width = 32
    """Relative temporal positions are clipped at this distance in the attention bias."""
    checkpointing: bool = False
    """Activation checkpointing per block: less memory, one more forward pass per step."""
    frame_time: bool = False
    """Add an embedding of each frame's time (seconds from the clip's centre) to that frame's conditioning: the
    arrow of time, which temporal attention with a still-symmetric relative bias lacks (needed to learn captions
    about motion direction)."""

    @model_validator(mode="after")
    def _per_level_lengths(self) -> UNet:
        levels = len(self.channel_mults)
        for name in ("num_res_blocks", "spatial_attention", "cross_attention", "temporal"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but channel_mults has {levels} "
                                 f"levels; give one entry per level")
        for level, mult in enumerate(self.channel_mults):
            width = self.channels * mult
            uses_attention = (self.spatial_attention[level] or self.cross_attention[level]
                              or self.temporal[level] == "attention")
            if uses_attention and width % self.head_dim:
                raise ValueError(f"level {level} has {width} channels, not divisible by head_dim {self.head_dim}")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


class Schedule(Strict):
    kind: Literal["cosine"] = "cosine"
    """Continuous-time cosine log-SNR schedule, clipped (VDM, PD)."""
    logsnr_min: LogSNR = -20.0
    """log-SNR at t = 1 (pure noise end)."""
    logsnr_max: LogSNR = 20.0
    """log-SNR at t = 0 (clean end)."""
    shift_base_resolution: Width | None = None
    """Resolution-shifted schedule (simple diffusion, for d x d images): log-SNR + 2 log(base / d), with d =
    sqrt(width x height) for a W x H frame (the square of the same pixel count). None: no shift."""

    @model_validator(mode="after")
    def _ordered(self) -> Schedule:
        if self.logsnr_min >= self.logsnr_max:
            raise ValueError(f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})")
        return self


class Diffusion(Strict):
    parameterization: Literal["v", "eps", "x"] = "v"
    """What the network predicts. Imagen Video uses v for every stage; eps causes colour shifts in
    super-resolution and cannot be distilled."""
    schedule: Schedule = Schedule()
    loss_weighting: Literal["snr+1", "truncated_snr"] = "snr+1"
    """Weight in x-space: SNR+1 (= MSE in v-space) or max(SNR, 1) (Salimans & Ho 2022, §4)."""
    residual: bool = False
    """Super-resolution stages, v only: diffuse the residual over the upsampled input (SRDiff, Li et al. 2022)
    rather than the video itself, so an untrained detail model already returns the input's upsampling. A
    reparameterization inside the network (`VideoUNet(residual=True)`): samplers, distillation and guidance are
    unchanged. Not in Imagen Video, whose stages concatenate the input only."""

    @model_validator(mode="after")
    def _residual_needs_v(self) -> Diffusion:
        if self.residual and self.parameterization != "v":
            raise ValueError(f"residual: true needs parameterization v (the residual enters as v' - sigma b), got "
                             f"{self.parameterization}")
        return self


class Augmentation(Strict):
    logsnr_min: LogSNR = -2.0
    """Noisiest augmentation level drawn in training (log-SNR of the noise added to the low-res input)."""
    logsnr_max: LogSNR = 20.0
    """Cleanest augmentation level drawn in training."""
    sample_logsnr: LogSNR = 1.6
    """Fixed level at sampling, same units (Imagen Video: SNR 3 or 5, log-SNR 1.1 or 1.6)."""

    @model_validator(mode="after")
    def _in_range(self) -> Augmentation:
        if self.logsnr_min >= self.logsnr_max:
            raise ValueError(f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})")
        if not self.logsnr_min <= self.sample_logsnr <= self.logsnr_max:
            raise ValueError(f"sample_logsnr {self.sample_logsnr} is outside the training range "
                             f"[{self.logsnr_min}, {self.logsnr_max}]: the network never saw that level")
        return self


class KnownFrames(Strict):
    """Known-frame conditioning (image-to-video, continuing a clip): the network takes, as four extra input channels,
    the known frames (zero elsewhere) and a mask channel. In training each sample gets, with these probabilities, its
    first frame or its first `clip_frames` frames as known frames (from its own clip; noise-augmented like the
    low-resolution input in a stage with augmentation), and none otherwise."""

    first_prob: Probability = 0.0
    """Share of training samples whose first frame is given (image-to-video)."""
    clip_prob: Probability = 0.0
    """Share of training samples whose first `clip_frames` frames are given (continuing a clip, long videos)."""
    clip_frames: Width = 2
    """Frames given when continuing a clip."""

    @model_validator(mode="after")
    def _shares(self) -> KnownFrames:
        if self.first_prob + self.clip_prob > 1:
            raise ValueError(f"first_prob + clip_prob = {self.first_prob + self.clip_prob:g} exceeds 1")
        return self


class Oscillation(Strict):
    high: GuidanceWeight = 15.0
    """Weight on even steps (and during the constant phase)."""
    low: GuidanceWeight = 1.0
    """Weight on odd steps after the constant phase."""
    constant_steps: Annotated[int, Field(ge=0), Sane(high=MAX_SAMPLING_STEPS)] = 0
    """Steps at the high weight before alternating."""


class Guidance(Strict):
    weight: GuidanceWeight = 0.0
    """Classifier-free guidance weight w in the (1+w) convention: 0 is the conditional model
    (Imagen Video's "constant w=6" is 7 in Imagen's convention)."""
    oscillate: Oscillation | None = None
    """Oscillating guidance (Imagen Video §2.6.2); used only for the base and first two SR stages."""
    text_drop_prob: Probability = 0.1
    """Probability of dropping the caption in training, which trains the unconditional model."""
    dynamic_threshold: Annotated[float, Field(gt=50, le=100)] | None = 99.5
    """Percentile (0-100) of |x-hat| for dynamic thresholding (Imagen §2.3); None disables it."""


class Sampler(Strict):
    kind: Literal["ddim", "ancestral", "stochastic", "consistency"] = "ddim"
    """DDIM; ancestral with stochasticity gamma; the N-step stochastic sampler for distilled models; or multistep
    consistency sampling (fresh noise at every step) for a one-step consistency student."""
    steps: SamplingSteps = 256
    """Network-evaluation steps (each doubled when guidance needs an unconditional pass)."""
    gamma: Probability = 0.3
    """Ancestral sampler: interpolation between the two posterior variances (VDM, Imagen Video §2.1)."""


class Optimizer(Strict):
    name: Literal["adamw", "adam"] = "adamw"
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.99]
    weight_decay: Annotated[float, Field(ge=0), Sane(high=100.0)] = 0.0
    eps: Annotated[float, Field(gt=0), Sane(high=1.0)] = 1e-8


class LRSchedule(Strict):
    kind: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: constant, cosine decay or linear decay to min_lr_ratio * lr at max_steps."""
    warmup_steps: Annotated[int, Field(ge=0), Sane(high=MAX_STEPS)] = 0
    min_lr_ratio: Probability = 0.0


class Size(Strict):
    width: Width
    height: Width


class Train(Strict):
    batch_size: Width
    """Videos per device per step."""
    lr: LearningRate = 1e-4
    optimizer: Optimizer = Optimizer()
    lr_schedule: LRSchedule = LRSchedule()
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.9999
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "bf16-mixed"
    max_steps: Steps
    grad_clip: Annotated[float, Field(gt=0), Sane(high=1e9)] | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    accumulate_grad_batches: Width = 1
    checkpoint_every: Steps = 1000
    """Optimizer steps between checkpoints."""
    keep_checkpoints: Annotated[int, Field(gt=0), Sane(high=10**6)] = 3
    """The last K step checkpoints are kept, plus `last`."""
    image_fraction: Probability = 0.0
    """Share of samples that are still images (one-frame videos) in joint image-video training."""
    crop: Size | None = None
    """Train on random crops of this size (fully convolutional super-resolution stages); sample at full size."""
    crop_frames: Width | None = None
    """Train on random windows of this many consecutive frames (super-resolution stages whose temporal layers are
    convolutions: their normalization is per frame, so a window changes only the ends); sample at full length."""
    clip_start: Literal["random", "first"] = "random"
    """Where a training clip starts in a longer video: a random frame (temporal-crop augmentation), or the first
    frame, so frame 0 is always the video's start. In the tiny recipe the base learns the direction of motion
    from "first" clips and not from random ones (the sign of the motion stayed at chance after 2000 steps)."""
    seed: Seed = 0
    max_nonfinite: Steps = 20
    """A step with a non-finite loss is skipped and counted; this many in a row stop the run."""
    deterministic: bool = False
    """Deterministic algorithms (bitwise-reproducible resume on CPU; slower on GPU)."""


class GuidanceDistill(Strict):
    w_min: GuidanceWeight = 0.0
    w_max: GuidanceWeight = 4.0
    """Guidance weights drawn uniformly in [w_min, w_max] (Meng et al. 2023 use [0, 4])."""
    max_steps: Steps = 50_000
    lr: LearningRate = 1e-4

    @model_validator(mode="after")
    def _ordered(self) -> GuidanceDistill:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        return self


class ProgressiveDistill(Strict):
    start_steps: SamplingSteps = 256
    """Sampling steps of the first teacher (Imagen Video: 256 base, 128 super-resolution)."""
    end_steps: SamplingSteps = 8
    """Sampling steps of the final student; the steps halve each round."""
    steps_per_round: Steps = 50_000
    """Optimizer steps per halving (Salimans & Ho: 50k)."""
    lr: LearningRate = 1e-4
    loss_weighting: Literal["snr+1", "truncated_snr"] = "truncated_snr"

    @model_validator(mode="after")
    def _halvings(self) -> ProgressiveDistill:
        ratio = self.start_steps / self.end_steps
        if self.end_steps >= self.start_steps or ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(f"start_steps ({self.start_steps}) must be end_steps ({self.end_steps}) times a "
                             f"power of two greater than one: each round halves the steps")
        return self

    @property
    def rounds(self) -> int:
        return round(math.log2(self.start_steps / self.end_steps))


class ConsistencyDistill(Strict):
    steps: SamplingSteps = 1
    """Sampling steps of the student (segments of the time axis; Heek et al. 2024)."""
    substeps: Annotated[int, Field(ge=1), Sane(high=4096)] = 16
    """Teacher DDIM steps per student step: the teacher's ODE is followed on a grid of steps x substeps."""
    max_steps: Steps = 2000
    """Optimizer steps of the round."""
    lr: LearningRate = 1e-4
    target_ema: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    """EMA decay of the target network (a copy of the student that carries the teacher's step to the segment's
    end)."""
    loss_weighting: Literal["snr+1", "truncated_snr"] = "truncated_snr"


class Distill(Strict):
    guidance: GuidanceDistill | None = GuidanceDistill()
    """Guidance distillation first (None: skip it, e.g. for unguided stages)."""
    method: Literal["progressive", "consistency"] = "progressive"
    """After guidance distillation: progressive halvings (`progressive`) or one consistency-distillation round
    (`consistency`)."""
    progressive: ProgressiveDistill = ProgressiveDistill()
    """The halvings; start_steps is also the teacher's step count that guidance distillation trains on."""
    consistency: ConsistencyDistill = ConsistencyDistill()


class Launch(Strict):
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where a local run trains; SLURM runs use the GPUs they are given."""
    nodes: Annotated[int, Field(gt=0), Sane(high=100_000)] = 1
    gpus_per_node: Annotated[int, Field(gt=0), Sane(high=1024)] = 8
    """Devices (processes) per node: GPUs, or CPU processes with accelerator cpu."""
    cpus_per_task: Width = 8
    time: Annotated[str, Field(max_length=32)] = "48:00:00"
    """SLURM time limit, [D-]HH:MM:SS."""
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _time_format(self) -> Launch:
        if not re.fullmatch(r"(\d{1,4}-)?\d{1,3}:\d{2}:\d{2}", self.time):
            raise ValueError(f"time {self.time!r} is not [D-]HH:MM:SS")
        return self


class Stage(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
    """Unique name, used in overrides (stages.NAME.train.lr=...) and on the command line."""
    kind: Literal["base", "tsr", "ssr"]
    """base: text to video; tsr: temporal super-resolution; ssr: spatial super-resolution."""
    input: Name | None = None
    """Name of the earlier stage whose output this stage refines; none for the base stage."""
    frames: Width
    width: Width
    height: Width
    fps: Annotated[float, Field(gt=0), Sane(high=10_000.0)]
    unet: UNet
    diffusion: Diffusion = Diffusion()
    augmentation: Augmentation | None = None
    """Noise conditioning augmentation of the low-resolution input (super-resolution stages)."""
    known_frames: KnownFrames | None = None
    """Train the stage to condition on known frames (image-to-video, continuing a clip); none: the network has no
    known-frame input and `cascade sample --image` / `--story` fall back to reconstruction guidance."""
    guidance: Guidance = Guidance()
    sampler: Sampler = Sampler()
    train: Train
    distill: Distill = Distill()
    launch: Launch = Launch()


class Data(Strict):
    kind: Literal["synthetic", "shards"] = "synthetic"
    """synthetic: the built-in generated dataset, written to `root`; shards: a dataset folder at `shards`."""
    shards: PathText | None = None
    """Folder of webdataset shards with its manifest.json (built by `cascade data videos|images|synth`)."""
    root: PathText = "data/synthetic"
    """Where the synthetic dataset is written."""
    count: Annotated[int, Field(gt=0), Sane(high=10**9)] = 1000
    """Synthetic videos to generate."""
    images: Annotated[int, Field(ge=0), Sane(high=10**9)] = 0
    """Synthetic still images to generate as well (joint image-video training)."""
    seed: Annotated[int, Field(ge=0), Sane(high=MAX_SEED - 1)] = 0
    """The held-out evaluation split uses seed + 1."""
    num_workers: Annotated[int, Field(ge=0), Sane(high=1024)] = 4
    """DataLoader worker processes per rank."""
    embeddings: PathText | None = None
    """T5 embedding cache folder; None: DATASET/embeddings. Without a cache captions are encoded on the fly."""
    max_bad_fraction: Probability | None = 0.01
    """Stop the run when more than this share of the last `bad_window` samples were bad, and before that many were
    read as soon as the bad count is implausible for data within this share (binomial tail below 1e-3); None:
    never."""
    bad_window: Steps = 1000
    decode_cache_mb: Annotated[int, Field(ge=0), Sane(high=2**24)] = 0
    """Per DataLoader worker: keep decoded videos (every frame, at the stage's size) in memory, up to this many MiB,
    least recently used dropped first, so later epochs cut their clips without decoding. For datasets that fit
    (the tiny demo: 512 videos); the clips are the same either way. 0: decode every sample every time."""

    @model_validator(mode="after")
    def _shards_given(self) -> Data:
        if self.kind == "shards" and not self.shards:
            raise ValueError("kind is 'shards' but no shards path is given")
        return self


class Eval(Strict):
    num_videos: Annotated[int, Field(gt=0), Sane(high=10**8)] = 2048
    steps: list[SamplingSteps] = Field(default=[8, 16, 64, 256], max_length=64)
    guidance: list[GuidanceWeight] = Field(default=[0.0, 2.0, 6.0], max_length=64)
    aug_logsnr: list[LogSNR] = Field(default=[1.1, 1.6], max_length=64)
    metrics: list[Literal["fvd", "clipsim", "probes", "quality"]] = Field(default=["fvd", "clipsim"], max_length=8)
    clip_path: PathText | None = None
    """Local CLIP folder for CLIPSIM."""
    frames: Width = 16
    """Frames per video fed to I3D for FVD (stages with fewer frames get no FVD); at least 9 when FVD is among the
    metrics (the I3D protocol's minimum)."""
    fvd_stages: list[Name] | None = Field(default=None, max_length=64)
    """The stages that get an FVD (each with at least eval.frames frames). None: every evaluated stage that has
    eval.frames frames. I3D at 224x224 costs about a second per video on a CPU core: the tiny recipe names only its
    final stage."""
    data: PathText | None = None
    """Folder of shards to evaluate on. None: for a synthetic recipe, a generated split of held-out caption
    combinations; for real data, the training shards (the report says so)."""
    batch_size: Width = 8
    """Videos sampled together during evaluation."""
    modes: list[Literal["gt", "cascade"]] = Field(default=["gt", "cascade"], min_length=1, max_length=8)
    """Inputs of the super-resolution stages: gt (the ground truth at the input stage's resolution: the stage
    alone) and/or cascade (the previous stages' samples: the cascade as used)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The networks' precision when `cascade run` evaluates (both evaluations, the video tools, the report's samples)
    and the default of `cascade eval --dtype`: the forward pass under autocast, the sampler's state float32."""


class Wandb(Strict):
    project: Name
    entity: Name | None = None
    mode: Literal["offline", "online"] = "offline"
    """offline unless the machine is set up for wandb (`wandb login`)."""


class Logging(Strict):
    every_n_steps: Steps = 10
    """Scalars (loss, loss per log-SNR bucket, learning rate, gradient norm, videos/s) every N steps."""
    sample_every: Steps | None = 1000
    """Sample videos from the EMA model every N steps (mp4 in the run folder, and wandb); None: never."""
    sample_steps: SamplingSteps = 16
    """Sampler steps for those periodic samples."""
    sample_count: Width = 2
    wandb: Wandb | None = None
    """wandb logging; CSV logs are always written."""


class Cluster(Strict):
    partition: Name | None = None
    account: Name | None = None
    qos: Name | None = None
    signal_seconds: Annotated[int, Field(gt=0), Sane(high=10**7)] = 300
    """SIGUSR1 this many seconds before the time limit (checkpoint, then requeue)."""


class Recipe(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=255)]
    """Run name; the run folder is runs/NAME unless run_dir says otherwise."""
    extends: PathText | None = None
    """A recipe file this one overrides (at most one level); resolved at load time."""
    run_dir: PathText | None = None
    text_encoder: TextEncoder = TextEncoder()
    stages: list[Stage] = Field(min_length=1, max_length=64)
    """The cascade in sampling order: a base stage, then super-resolution stages."""
    data: Data = Data()
    eval: Eval = Eval()
    logging: Logging = Logging()
    cluster: Cluster = Cluster()

    _overrides: list[str] = PrivateAttr(default_factory=list)

    def record_overrides(self, paths: list[str]) -> None:
        """Remember the dotted paths set on the command line (`load_recipe` does), for `overridden`."""
        self._overrides = list(paths)

    def overridden(self, path: str) -> bool:
        """Whether `path` (e.g. stages.base.sampler.steps) was set by a command-line override, itself or through a
        section that holds it (stages.base.sampler={...})."""
        return any(path == o or path.startswith(o + ".") for o in self._overrides)

    def run_folder(self, stage: str | None = None) -> Path:
        """The run folder (`run_dir`, default runs/NAME), or a stage's folder inside it: every path a run writes
        (checkpoints, teachers/, distilled/, eval/, slurm/, report.md) is under it."""
        root = Path(self.run_dir or f"runs/{self.name}")
        return root if stage is None else root / stage

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages are {', '.join(s.name for s in self.stages)}")
