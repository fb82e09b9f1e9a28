"""CLIPSIM: text-video similarity as in text-to-video papers (e.g. GODIVA, Make-A-Video, VideoLDM).

The CLIP cosine similarity between a caption and each frame of its video is averaged over the frames (one value
per video), then over the videos (the dataset value). It is built on torchmetrics' ``CLIPScore``
(`torchmetrics.multimodal.clip_score`) with CLIP read from a local folder in the ``save_pretrained`` layout.

What we report: ``cosine``, the raw mean cosine, never clamped (it can be negative, e.g. with a random CLIP), and
``score = 100 * cosine`` (also unclamped). ``torchmetrics_score`` is torchmetrics' own convention,
``max(100 * mean cosine over all frames, 0)``: the value ``CLIPScore.compute()`` gives on the same frames. Note that
torchmetrics 1.9 clamps the *mean* at 0, not each sample as the CLIPScore paper (Hessel et al., 2021) does; with
the same frame count in every video it equals ``max(score, 0)``.

Adapter (checked with torchmetrics 1.9.0 and transformers 5.23.0, torch 2.13): what goes wrong when CLIPScore is
used as is, found by running it, and what we do about it:

1. ``CLIPScore(model_name_or_path=<local folder>)`` raises ``ValueError: Invalid model_name_or_path``: torchmetrics
   only loads names containing "openai", "jinaai" or "zer0int". Its other accepted form, a callable returning
   ``(model, processor)``, is what we pass (`load_clip`, which also reads float32 and offline).
2. transformers 5 ``CLIPModel.get_image_features`` / ``get_text_features`` return a ``BaseModelOutputWithPooling``
   (the projected embedding is its ``pooler_output``) instead of a tensor, so torchmetrics' ``features.norm(...)``
   fails with ``AttributeError``. `CLIPFeatures` wraps the model and returns the tensor (transformers 4 tensors pass
   through unchanged).
3. ``CLIPScore.update`` keeps only a running sum of ``100 * cos``, so the per-frame / per-video values CLIPSIM needs
   are lost, and it encodes a caption once per image (T times per video). `FrameCLIPScore` subclasses it: its
   ``update`` calls torchmetrics' own feature helper (``_get_features``: processor call, caption truncation to the
   text model's positions, feature call) for the frames in chunks and once per caption, normalises and takes the
   cosine as ``_clip_score_update`` does, adds ``100 * cos`` to CLIPScore's ``score`` / ``n_samples`` states (so the
   inherited ``compute()`` is torchmetrics' value) and keeps per-video cosines in a state of its own.

Not broken: the processor calls torchmetrics makes (lists of [3, H, W] uint8 tensors, ``padding=True``) work with
transformers 5's ``CLIPProcessor``. Without torchvision, transformers 5 loads a folder's ``CLIPImageProcessor`` as
``CLIPImageProcessorPil`` (with a warning); resizing is then PIL's bicubic rather than torchvision's, so scores from
machines with and without torchvision may differ slightly (not checked here: no torchvision on the machine).

`build_tiny_clip` writes a tiny randomly initialised CLIP for tests and the demo; scores from it measure nothing
and are reported as "tiny random CLIP".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    from torchmetrics.functional.multimodal.clip_score import _get_features
    from torchmetrics.multimodal.clip_score import CLIPScore
except ImportError as err:  # private helper: moved or renamed in a torchmetrics other than the one checked (1.9)
    raise ImportError(f"cascade.eval.clipsim needs torchmetrics' CLIPScore and its `_get_features` helper (checked "
                      f"with torchmetrics 1.9); install torchmetrics 1.9 with transformers: {err}") from err

__all__ = ["CLIPFeatures", "CLIPSim", "FrameCLIPScore", "build_tiny_clip", "load_clip", "TINY_CLIP_MARKER"]

# Written into the tiny CLIP's config.json, so that its scores are never taken for a real CLIP's.
TINY_CLIP_MARKER = "cascade_tiny_random_clip"

_MISSING_HINT = ("pass a local CLIP folder saved with `save_pretrained` (config.json, model weights, tokenizer and "
                 "processor files), e.g. openai/clip-vit-base-patch32 downloaded beforehand on a machine with hub "
                 "access (`CLIPModel.from_pretrained(id).save_pretrained(folder)` and the same for `CLIPProcessor`), "
                 "or `cascade.eval.clipsim.build_tiny_clip(folder)` for a tiny random one (tests and demo only)")


def _embedding(output: Any) -> Tensor:
    """The projected embedding from a get_*_features result: a tensor (transformers 4) or an output object whose
    `pooler_output` holds it (transformers 5)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, Tensor):
        raise TypeError(f"CLIP feature call returned {type(output).__name__} without a `pooler_output` tensor")
    return pooled


class CLIPFeatures(nn.Module):
    """A `CLIPModel` whose `get_image_features` / `get_text_features` return the projected embedding tensor, as
    torchmetrics expects (transformers 5 returns an output object)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.clip = model

    @property
    def config(self) -> Any:
        return self.clip.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return _embedding(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return _embedding(self.clip.get_text_features(*args, **kwargs))


def load_clip(path: str | Path) -> tuple[CLIPFeatures, Any]:
    """(`CLIPFeatures` around the float32 `CLIPModel`, frozen and in eval mode; `CLIPProcessor`) from a local
    `save_pretrained` folder, offline."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP folder {path} does not exist: {_MISSING_HINT}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder {path} has no config.json: {_MISSING_HINT}")
    try:
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load CLIP from {path} ({err}); {_MISSING_HINT}") from err
    return CLIPFeatures(model.eval().requires_grad_(False)), processor


def is_tiny_clip(path: str | Path) -> bool:
    """Whether `path` holds the tiny random CLIP `build_tiny_clip` writes."""
    try:
        return bool(json.loads((Path(path) / "config.json").read_text()).get(TINY_CLIP_MARKER, False))
    except (OSError, ValueError):
        return False


def _as_frames(videos: np.ndarray | Tensor, captions: Sequence[str]) -> Tensor:
    """Checked (B, T, H, W, 3) uint8 videos -> (B, T, 3, H, W) uint8 tensor."""
    if isinstance(videos, np.ndarray):
        videos = torch.from_numpy(np.ascontiguousarray(videos))
    if not isinstance(videos, Tensor):
        raise TypeError(f"videos must be a numpy array or torch tensor (B, T, H, W, 3) uint8, got "
                        f"{type(videos).__name__}")
    if videos.dtype != torch.uint8:
        raise TypeError(f"videos must be uint8 in [0, 255], got {videos.dtype}; convert with "
                        f"(x.clamp(0, 1) * 255).round().to(torch.uint8) or the numpy equivalent")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (B, T, H, W, 3) (channels last), got shape {tuple(videos.shape)}")
    if 0 in videos.shape:
        raise ValueError(f"videos has an empty axis: shape {tuple(videos.shape)}")
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a list of strings, one per video")
    if len(captions) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(captions)} captions; pass one caption per video")
    return videos.permute(0, 1, 4, 2, 3)


class FrameCLIPScore(CLIPScore):
    """torchmetrics' `CLIPScore` over the frames of captioned videos, CLIP from a local folder (see the module
    docstring). `compute()` is CLIPScore's: max(100 * mean cosine over all frames, 0); the `video_cosine` state
    holds each video's frame-mean cosine."""

    def __init__(self, path: str | Path, batch_size: int = 64, **kwargs: Any) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 frames, got {batch_size}")
        super().__init__(model_name_or_path=partial(load_clip, path), **kwargs)
        self.batch_size = batch_size
        self.add_state("video_cosine", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def frame_cosines(self, videos: np.ndarray | Tensor, captions: Sequence[str]) -> Tensor:
        """(B, T, H, W, 3) uint8 videos and B captions -> (B, T) float32 cosine of each frame with its caption.
        Changes no state."""
        frames = _as_frames(videos, captions)
        b, t = frames.shape[:2]
        device = self.score.device
        flat = list(frames.reshape(b * t, *frames.shape[2:]))
        image = torch.cat([_get_features(flat[i:i + self.batch_size], "image", device, self.model, self.processor)
                           for i in range(0, len(flat), self.batch_size)])
        text = _get_features(list(captions), "text", device, self.model, self.processor)
        # as torchmetrics' _clip_score_update: L2-normalise, then the sum of products
        image = image / image.norm(p=2, dim=-1, keepdim=True)
        text = text / text.norm(p=2, dim=-1, keepdim=True)
        return (image.reshape(b, t, -1) * text[:, None]).sum(-1).float()

    def update(self, videos: np.ndarray | Tensor, captions: Sequence[str]) -> None:  # type: ignore[override]
        """Add a batch: (B, T, H, W, 3) uint8 videos and their B captions."""
        cosines = self.frame_cosines(videos, captions)
        self.score += (100 * cosines).sum()
        self.n_samples += cosines.numel()
        self.video_cosine.append(cosines.mean(1))


class CLIPSim:
    """CLIPSIM of captioned videos with a local CLIP. `score` scores one batch; `update` / `compute` / `reset`
    accumulate batches. Results: dict(cosine=mean over videos of the frame-mean cosine (unclamped), score=100 *
    cosine (unclamped), torchmetrics_score=max(100 * mean frame cosine, 0) (torchmetrics' CLIPScore convention),
    per_video=[frame-mean cosine per video], videos=count, frames=frames scored, model=name, tiny_random=bool)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        """`path`: a local CLIP folder in the `save_pretrained` layout. `batch_size`: frames per CLIP forward."""
        self.path = str(path)
        self.tiny_random = is_tiny_clip(path)
        self.model_name = f"tiny random CLIP ({self.path})" if self.tiny_random else self.path
        self.metric = FrameCLIPScore(path, batch_size=batch_size).to(device)

    def _result(self, per_video: Tensor, frames: int, torchmetrics_score: Tensor) -> dict:
        cosine = float(per_video.double().mean())
        return dict(cosine=cosine, score=100 * cosine, torchmetrics_score=float(torchmetrics_score),
                    per_video=[float(v) for v in per_video], videos=len(per_video), frames=frames,
                    model=self.model_name, tiny_random=self.tiny_random)

    def score(self, videos: np.ndarray | Tensor, captions: Sequence[str]) -> dict:
        """CLIPSIM of one batch, (B, T, H, W, 3) uint8 and B captions; the accumulated state is left alone."""
        cosines = self.metric.frame_cosines(videos, captions)
        # CLIPScore.compute's convention on these frames
        convention = torch.clamp((100 * cosines).sum() / cosines.numel(), min=0)
        return self._result(cosines.mean(1).cpu(), cosines.numel(), convention)

    def update(self, videos: np.ndarray | Tensor, captions: Sequence[str]) -> None:
        """Accumulate a batch, (B, T, H, W, 3) uint8 and B captions."""
        self.metric.update(videos, captions)

    def compute(self) -> dict:
        """CLIPSIM of everything passed to `update` since the last `reset`."""
        if int(self.metric.n_samples) == 0:
            raise RuntimeError("CLIPSim.compute() before any update(videos, captions)")
        per_video = torch.cat([torch.atleast_1d(v) for v in self.metric.video_cosine]).cpu()
        return self._result(per_video, int(self.metric.n_samples), self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


def build_tiny_clip(folder: str | Path, seed: int = 0, dim: int = 32, layers: int = 2, image_size: int = 32,
                    patch_size: int = 8) -> Path:
    """A randomly initialised tiny CLIP saved like a real checkpoint (config.json, model.safetensors, vocab.json,
    merges.txt, tokenizer.json, tokenizer_config.json, processor_config.json), offline. The tokenizer is CLIP's
    byte-level BPE over a vocabulary of the 256 byte symbols, each also with the end-of-word suffix "</w>", and
    the two special tokens, with no merges (every word is spelt out). `CLIPModel` / `CLIPProcessor.from_pretrained`
    load it; config.json carries `TINY_CLIP_MARKER` so its scores are reported as a tiny random CLIP's."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:  # transformers 5: the default CLIPImageProcessor needs torchvision; the PIL one preprocesses the same
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    if dim % 2 or image_size % patch_size:
        raise ValueError(f"dim ({dim}) must be even and image_size ({image_size}) a multiple of patch_size "
                         f"({patch_size})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    max_tokens = 77
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)
    image_processor = ImageProcessor(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    heads = 2
    text = dict(vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=max_tokens, bos_token_id=vocab[bos],
                eos_token_id=vocab[eos], pad_token_id=vocab[eos])
    vision = dict(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim, **{TINY_CLIP_MARKER: True})
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)  # transformers 5 writes tokenizer.json only; 4 also reads the BPE files
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder
