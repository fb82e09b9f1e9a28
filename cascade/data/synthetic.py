"""The built-in synthetic dataset: one colored shape moving in a straight line over a plain background.

Captions are "a {color} {shape} moving {direction} on a {background} background" (videos) and
"a {color} {shape} on a {background} background" (stills for joint image-video training). Each sample's `Scene`
is continuous (position and size in frame fractions, speed in frame fractions per second), so `render` draws it
at any size, frame rate and duration, and the renders agree across scales and rates:

- area coverage is exact (the box filter of the shape's indicator over each pixel, in closed form), so a render
  at 4x the size averaged over 4x4 blocks equals the render at 1x up to uint8 rounding;
- frame i shows time t0 + i / fps, so every k-th frame of a render at k x fps is the render at fps.

`HELD_OUT` lists caption combinations kept out of the training split for compositional evaluation.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from cascade.data.shards import Manifest, ShardSink
from cascade.data.video import encode_image, encode_video

# RGB triples: the corners of the RGB cube, so any two colors differ by 255 in at least one channel and every
# color differs from both backgrounds by at least 127 in some channel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "white": (255, 255, 255), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Unit motion in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Caption combinations (color, shape, direction, background) never drawn for the training split, and the only ones
# drawn for `split="heldout"`: 14 of the 168 (8.3 %), two per color, built by the rule
# (COLORS[i // 2], SHAPES[i % 3], DIRECTIONS[i % 4], BACKGROUNDS[(3 * (i // 2) + i) % 2]) for i < 14, so shapes
# (5/5/4), directions (4/4/3/3) and backgrounds (7/7) are spread. Every attribute value, and every pair of values,
# still appears in training: a held-out caption is new only as a whole. Fixed: changing it changes both splits.
HELD_OUT: tuple[tuple[str, str, str, str], ...] = (
    ("red", "circle", "left", "black"),
    ("red", "square", "right", "gray"),
    ("green", "triangle", "up", "gray"),
    ("green", "circle", "down", "black"),
    ("blue", "square", "left", "black"),
    ("blue", "triangle", "right", "gray"),
    ("yellow", "circle", "up", "gray"),
    ("yellow", "square", "down", "black"),
    ("white", "triangle", "left", "black"),
    ("white", "circle", "right", "gray"),
    ("cyan", "square", "up", "gray"),
    ("cyan", "triangle", "down", "black"),
    ("magenta", "circle", "left", "black"),
    ("magenta", "square", "right", "gray"),
)
ALL_COMBOS: tuple[tuple[str, str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS))
TRAIN_COMBOS: tuple[tuple[str, str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)
SPLITS = ("train", "heldout")

SIZE_RANGE = (0.25, 0.4)  # the shape's extent, as a fraction of the frame's shorter side
MARGIN = 0.02  # frame fraction kept clear between the shape and the frame's edges over the sampled duration
TRAVEL_RANGE = (0.5, 1.0)  # distance travelled over the sampled duration, as a fraction of the room available
# H.264 quality of the videos. Decoded vs rendered at 64x64: mean abs error ~0.85 (uint8), almost all of it from
# yuv420p's half-resolution chroma at the shape's saturated edges (up to ~160 there; crf 0 barely improves it).
CRF = 4


@dataclass(frozen=True)
class Scene:
    """One shape moving at constant velocity. Positions are the center of the shape's bounding box.

    Fractions: x of the frame's width, y of its height (y down); `size` is the bounding box's side (the circle's
    diameter, the square's side, the triangle's base and height) as a fraction of the shorter side, so shapes keep
    their aspect at any frame size. `speed` is in frame fractions per second along `direction` (of the width for
    left/right, of the height for up/down). The triangle points up.
    """

    color: str
    shape: str
    direction: str
    background: str
    size: float
    start_x: float
    start_y: float
    speed: float

    def __post_init__(self) -> None:
        for name, value, allowed in (("color", self.color, COLORS), ("shape", self.shape, SHAPES),
                                     ("direction", self.direction, DIRECTIONS),
                                     ("background", self.background, BACKGROUNDS)):
            if value not in allowed:
                raise ValueError(f"scene {name} {value!r} is not one of {', '.join(allowed)}")
        if not self.size > 0:
            raise ValueError(f"scene size must be > 0, got {self.size}")
        if not (math.isfinite(self.start_x) and math.isfinite(self.start_y) and math.isfinite(self.speed)):
            raise ValueError(f"scene position and speed must be finite, got {self}")

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"

    @property
    def image_caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    @property
    def combo(self) -> tuple[str, str, str, str]:
        return (self.color, self.shape, self.direction, self.background)

    def center(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Center (x, y) in frame fractions at `times` (seconds)."""
        dx, dy = DIRECTIONS[self.direction]
        times = np.asarray(times, dtype=np.float64)
        return self.start_x + dx * self.speed * times, self.start_y + dy * self.speed * times

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"scene keys: missing {sorted(names - set(data))}, unknown {sorted(set(data) - names)}")
        return cls(**data)


def all_captions() -> list[str]:
    """Every caption the dataset can hold, videos and stills of both splits: e.g. the text a tokenizer for it is
    trained on when the dataset itself is not at hand."""
    videos = [Scene(c, s, d, b, 0.3, 0.5, 0.5, 0.0).caption for c, s, d, b in ALL_COMBOS]
    stills = [Scene(c, s, "left", b, 0.3, 0.5, 0.5, 0.0).image_caption for c, s, b in
              itertools.product(COLORS, SHAPES, BACKGROUNDS)]
    return videos + stills


def sample_scene(rng: np.random.Generator, split: str = "train", seconds: float = 2.0) -> Scene:
    """A random scene whose shape stays inside the frame (with `MARGIN`) for `seconds`, at any frame aspect.

    train draws uniformly from the 154 combinations outside `HELD_OUT`, heldout uniformly from `HELD_OUT`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    combos = TRAIN_COMBOS if split == "train" else HELD_OUT
    color, shape, direction, background = combos[rng.integers(len(combos))]
    size = float(rng.uniform(*SIZE_RANGE))
    # The half-extent in frame fractions is size/2 * shorter/side <= size/2 on both axes, whatever the aspect.
    low, high = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    travel = float(rng.uniform(*TRAVEL_RANGE)) * (high - low)
    along = float(rng.uniform(low, high - travel))  # where the motion starts, for a positive direction
    across = float(rng.uniform(low, high))
    dx, dy = DIRECTIONS[direction]
    if dx + dy < 0:
        along = low + high - along  # mirror: start on the far side
    start_x, start_y = (along, across) if dx else (across, along)
    return Scene(color, shape, direction, background, size, start_x, start_y, travel / seconds)


def render(scene: Scene, frames: int, width: int, height: int, fps: float, t0: float = 0.0) -> np.ndarray:
    """The scene at times t0 + i / fps, i < frames: -> (T, H, W, 3) uint8, exact area coverage (anti-aliased)."""
    if frames < 1 or width < 1 or height < 1 or not fps > 0:
        raise ValueError(f"render needs frames, width, height >= 1 and fps > 0, got {frames}, {width}, {height}, "
                         f"{fps}")
    times = t0 + np.arange(frames) / fps
    x, y = scene.center(times)
    alpha = _coverage(scene.shape, x * width, y * height, scene.size * min(width, height) / 2, width, height)
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    foreground = np.array(COLORS[scene.color], dtype=np.float32)
    video = background + alpha[..., None].astype(np.float32) * (foreground - background)
    return np.rint(video).astype(np.uint8)


def render_image(scene: Scene, width: int, height: int) -> np.ndarray:
    """The scene at t = 0 (a still): -> (H, W, 3) uint8."""
    return render(scene, 1, width, height, fps=1.0)[0]


def _coverage(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel [j, j+1] x [i, i+1] covered by the shape centered at (cx[t], cy[t]) px, half-extent
    r px: -> (T, H, W) float64. Computed in a per-frame window around the shape, then placed in the frame."""
    box = math.ceil(2 * r) + 3  # window side in pixels: covers [c - r - 1, c + r + 1]
    ox = np.floor(cx - r).astype(np.int64) - 1  # (T,) window origins
    oy = np.floor(cy - r).astype(np.int64) - 1
    visible = (ox > -box) & (ox < width) & (oy > -box) & (oy < height)
    ox, oy = np.clip(ox, -box, width), np.clip(oy, -box, height)
    cols = ox[:, None] + np.arange(box)  # (T, box)
    rows = oy[:, None] + np.arange(box)
    x0, x1 = cols - cx[:, None], cols + 1 - cx[:, None]  # pixel edges relative to the center
    y0, y1 = rows - cy[:, None], rows + 1 - cy[:, None]
    if shape == "square":  # separable: overlap of the pixel's x and y intervals with [-r, r]
        ax = np.clip(np.minimum(x1, r) - np.maximum(x0, -r), 0, None)
        ay = np.clip(np.minimum(y1, r) - np.maximum(y0, -r), 0, None)
        window = ay[:, :, None] * ax[:, None, :]
    else:
        window = _profile_coverage(shape, x0, x1, y0, y1, r)
    window *= visible[:, None, None]
    canvas = np.zeros((len(cx), height + 2 * box, width + 2 * box))
    canvas[np.arange(len(cx))[:, None, None], (rows + box)[:, :, None], (cols + box)[:, None, :]] = window
    return canvas[:, box:box + height, box:box + width]


def _profile_coverage(shape: str, x0, x1, y0, y1, r: float) -> np.ndarray:
    """Exact pixel coverage of a shape {|x| <= w(y)} symmetric about x = 0: (T, box) edges -> (T, box, box).

    The covered length of row y in [x0, x1] is L(w) = sum_k s_k relu(w - P_k) with P = max(x0, 0), max(x1, 0),
    max(-x1, 0), max(-x0, 0) and s = +, -, +, -; its integral over [y0, y1] is closed-form for both profiles.
    """
    edges = [(np.maximum(x0, 0), 1.0), (np.maximum(x1, 0), -1.0), (np.maximum(-x1, 0), 1.0),
             (np.maximum(-x0, 0), -1.0)]
    ya, yb = np.clip(y0, -r, r)[:, :, None], np.clip(y1, -r, r)[:, :, None]  # (T, box, 1)
    total = np.zeros(ya.shape[:2] + (x0.shape[1],))
    if shape == "triangle":
        # w(y) = (y + r) / 2 on [-r, r]: with h = w(y), dy = 2 dh and 2 * integral of relu(h - P) dh = relu(h - P)^2
        ha, hb = (ya + r) / 2, (yb + r) / 2
        for p, sign in edges:
            p = p[:, None, :]
            total += sign * (np.maximum(hb - p, 0) ** 2 - np.maximum(ha - p, 0) ** 2)
        return total
    if shape != "circle":
        raise ValueError(f"unknown shape {shape!r}")
    # w(y) = sqrt(r^2 - y^2); relu(w - P) > 0 on |y| < Y = sqrt(r^2 - P^2), where its antiderivative is
    # G(y) = (y sqrt(r^2 - y^2) + r^2 asin(y / r)) / 2 - P y.
    for p, sign in edges:
        p = p[:, None, :]
        limit = np.sqrt(np.maximum(r * r - p * p, 0))
        for y, s in ((np.clip(yb, -limit, limit), sign), (np.clip(ya, -limit, limit), -sign)):
            root = np.sqrt(np.maximum(r * r - y * y, 0))
            total += s * (0.5 * (y * root + r * r * np.arcsin(np.clip(y / r, -1, 1))) - p * y)
    return total


def write_synthetic(out: str | Path, count: int, seed: int, images: int = 0, split: str = "train", width: int = 64,
                    height: int = 64, fps: float = 16.0, seconds: float = 2.0,
                    samples_per_shard: int = 256) -> Manifest:
    """Write `count` videos (mp4) and `images` stills (png) as shards + manifest.json in `out`.

    Sample n of each kind comes from its own generator, seeded (seed, kind, n), so a dataset is a prefix of a larger
    one with the same seed. Stills are spread evenly among the videos; keys are `synth-{seed}-{position:08d}`.
    """
    _check(count, images, seed, split, width, height, fps, seconds, samples_per_shard)
    frames = max(1, round(fps * seconds))
    from tqdm.auto import tqdm

    info = dict(builder="synthetic", seed=seed, split=split, width=width, height=height, fps=fps, frames=frames,
                seconds=seconds, videos=count, images=images)
    # Interleave: sample n of a kind with k samples sits at (n + 0.5) / k of the way through.
    order = sorted([((n + 0.5) / count, 0, n) for n in range(count)] +
                   [((n + 0.5) / images, 1, n) for n in range(images)])
    with ShardSink(out, samples_per_shard, info) as sink, tqdm(total=len(order), desc="synth", unit="sample") as bar:
        for position, (_, kind, n) in enumerate(order):
            scene = sample_scene(np.random.default_rng([seed, kind, n]), split, seconds)
            meta = dict(width=width, height=height, source="synthetic", split=split, seed=seed, scene=scene.to_dict())
            key = f"synth-{seed}-{position:08d}"
            if kind == 0:
                video = render(scene, frames, width, height, fps)
                meta.update(kind="video", fps=fps, frames=frames, duration=frames / fps)
                sink.write(key, encode_video(video, fps, crf=CRF), "mp4", scene.caption, meta)
            else:
                meta.update(kind="image", fps=0.0, frames=1, duration=0.0)
                sink.write(key, encode_image(render_image(scene, width, height)), "png", scene.image_caption, meta)
            bar.update()
    return sink.manifest


def _check(count, images, seed, split, width, height, fps, seconds, samples_per_shard) -> None:
    problems = []
    if count < 1:
        problems.append(f"count must be >= 1, got {count}")
    if images < 0:
        problems.append(f"images must be >= 0, got {images}")
    if seed < 0:
        problems.append(f"seed must be >= 0, got {seed}")
    if split not in SPLITS:
        problems.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if width < 4 or height < 4 or width % 2 or height % 2:
        problems.append(f"width and height must be even (H.264 yuv420p) and >= 4, got {width}x{height}")
    if not (math.isfinite(fps) and fps > 0) or not (math.isfinite(seconds) and seconds > 0):
        problems.append(f"fps and seconds must be > 0, got fps {fps}, seconds {seconds}")
    if samples_per_shard < 1:
        problems.append(f"samples-per-shard must be >= 1, got {samples_per_shard}")
    if problems:
        raise ValueError("; ".join(problems))


def synth_command(args) -> int:
    """`cascade data synth`: 0 on success, 2 (with the reason on stderr) for bad arguments."""
    settings = dict(images=args.images, split=args.split, width=args.width, height=args.height, fps=args.fps,
                    seconds=args.seconds, samples_per_shard=args.samples_per_shard)
    try:
        _check(args.count, seed=args.seed, **settings)
    except ValueError as error:
        print(f"error: cascade data synth: {error}", file=sys.stderr)
        return 2
    manifest = write_synthetic(args.out, args.count, args.seed, **settings)
    print(f"wrote {manifest.videos} videos and {manifest.images} images ({args.split}) in {len(manifest.shards)} "
          f"shards to {args.out}")
    return 0
