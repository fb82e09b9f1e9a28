"""Shards from real media: a folder of videos (or still images) and a caption table in the WebVid layout.

The caption table is CSV (or TSV) or JSONL, chosen by suffix, with an id column (`id` or `videoid`), a caption
column (`caption` or `name`) and optionally `path` (the file, relative to the media folder). Without `path` the file
is `{id}.*` in the media folder, or in its `page_dir` subfolder (the layout of the WebVid download script).

Every video is decoded and re-encoded frame by frame (never the whole video in memory) to H.264 with its longest
side at most `max_size`, keeping all frames at the source frame rate; images become PNGs. Rows that cannot be used
are skipped with a reason from `SKIP_REASONS` and listed in the manifest; the build goes on. Workers convert files in
parallel; the parent writes the samples in the caption table's order, so the shards do not depend on `workers`.

This module imports no torch at import time: spawned workers start in a fraction of a second.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import av
from tqdm import tqdm

if TYPE_CHECKING:
    from cascade.data.shards import Manifest

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ID_COLUMNS = ("id", "videoid")
CAPTION_COLUMNS = ("caption", "name")
PATH_COLUMN = "path"
SUBDIR_COLUMN = "page_dir"

MISSING_ID = "missing id"
BAD_ROW = "bad caption table row"
EMPTY_CAPTION = "empty caption"
BAD_CAPTION = "caption not valid text"
MISSING_FILE = "missing file"
UNDECODABLE = "undecodable file"
NO_VIDEO_STREAM = "no video stream"
NO_FRAME_RATE = "no frame rate"
ZERO_FRAMES = "zero frames"
SKIP_REASONS = (MISSING_ID, BAD_ROW, EMPTY_CAPTION, BAD_CAPTION, MISSING_FILE, UNDECODABLE, NO_VIDEO_STREAM,
                NO_FRAME_RATE, ZERO_FRAMES)

VIDEO_CRF = 18  # x264 constant rate factor: visually lossless at training resolutions


class BuildError(ValueError):
    """A bad argument (folder, caption table, setting); the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------- caption table


@dataclass(frozen=True)
class Row:
    """One row of the caption table; `caption` is as read (validated later), `line` is 1-based in the file."""
    id: str
    caption: object
    path: str | None
    subdir: str | None
    line: int
    problem: str = ""  # BAD_ROW when the row cannot be read, with `detail`
    detail: str = ""


def _pick(columns, choices: tuple[str, ...], path: Path, what: str) -> str:
    for choice in choices:
        if choice in columns:
            return choice
    found = ", ".join(map(str, columns)) or "none"
    raise BuildError(f"{path}: no {what} column (expected {' or '.join(choices)}; found {found})")


def _text(value) -> str | None:
    """A table cell as an id/path string; None when empty or absent."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def read_captions(path: str | Path) -> Iterator[Row]:
    """Rows of a caption table (.csv, .tsv, .jsonl, .ndjson), streamed; the header is checked before returning."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{path}: caption table not found" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    raise BuildError(f"{path}: unknown caption table format '{suffix or 'no suffix'}' (expected .csv, .tsv or "
                     f".jsonl)")


def _open_text(path: Path):
    # Undecodable bytes become lone surrogates: the row's caption is then skipped as not valid text, not the file.
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _read_csv(path: Path, delimiter: str) -> Iterator[Row]:
    file = _open_text(path)
    try:
        reader = csv.DictReader(file, delimiter=delimiter)
        try:
            columns = reader.fieldnames
        except csv.Error as error:
            raise BuildError(f"{path}: unreadable header ({error})") from None
        if columns is None:
            raise BuildError(f"{path}: empty caption table")
        id_column = _pick(columns, ID_COLUMNS, path, "id")
        caption_column = _pick(columns, CAPTION_COLUMNS, path, "caption")
    except BaseException:
        file.close()
        raise

    def rows() -> Iterator[Row]:
        with file:
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:  # e.g. a field over csv.field_size_limit(): skip the row, go on
                    # line_num still counts the lines before the bad row
                    yield Row("", None, None, None, reader.line_num + 1, BAD_ROW, f"not CSV ({error})")
                    continue
                yield Row(id=_text(record.get(id_column)) or "", caption=record.get(caption_column),
                          path=_text(record.get(PATH_COLUMN)), subdir=_text(record.get(SUBDIR_COLUMN)),
                          line=reader.line_num)
    return rows()


def _read_jsonl(path: Path) -> Iterator[Row]:
    file = _open_text(path)
    try:
        lines = ((number, text) for number, text in enumerate(file, 1) if text.strip())
        first = next(lines, None)
        if first is None:
            raise BuildError(f"{path}: empty caption table")
        try:
            record = json.loads(first[1])
        except json.JSONDecodeError as error:
            raise BuildError(f"{path}: line {first[0]} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise BuildError(f"{path}: line {first[0]} is not a JSON object")
        id_column = _pick(list(record), ID_COLUMNS, path, "id")
        caption_column = _pick(list(record), CAPTION_COLUMNS, path, "caption")
    except BaseException:
        file.close()
        raise

    def rows() -> Iterator[Row]:
        with file:
            for number, text in itertools.chain([first], lines):
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    yield Row("", None, None, None, number, BAD_ROW, f"not JSON ({error.msg})")
                    continue
                if not isinstance(record, dict):
                    yield Row("", None, None, None, number, BAD_ROW, "not a JSON object")
                    continue
                yield Row(id=_text(record.get(id_column)) or "", caption=record.get(caption_column),
                          path=_text(record.get(PATH_COLUMN)), subdir=_text(record.get(SUBDIR_COLUMN)),
                          line=number)
    return rows()


def count_rows(path: str | Path) -> int | None:
    """Rows of a caption table (one cheap pass, for the progress bar); None when the CSV does not parse."""
    path = Path(path)
    with _open_text(path) as file:
        if path.suffix.lower() not in (".csv", ".tsv"):
            return sum(1 for text in file if text.strip())
        try:
            records = csv.reader(file, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            return max(0, sum(1 for record in records if record) - 1)
        except csv.Error:
            return None


def clean_caption(value: object) -> tuple[str, str | None, str]:
    """-> (caption stripped of surrounding whitespace, skip reason or None, detail)."""
    if value is None:
        return "", EMPTY_CAPTION, "no caption"
    if not isinstance(value, str):
        return "", BAD_CAPTION, f"caption is a JSON {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "", BAD_CAPTION, "caption is not valid UTF-8"
    if "\x00" in value:
        return "", BAD_CAPTION, "caption contains a NUL character"
    value = value.strip()
    return value, None if value else EMPTY_CAPTION, "" if value else "caption is empty or whitespace"


def sample_key(id: str) -> str:
    """A webdataset key from an id: every character but letters, digits, '-' and '_' becomes '_' (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", id)


class _Keys:
    """Sanitized, unique keys in table order: a repeated key gets `_1`, `_2`, ... appended."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def make(self, id: str) -> str:
        base = key = sample_key(id)
        number = 0
        while key in self._used:
            number += 1
            key = f"{base}_{number}"
        self._used.add(key)
        return key


def find_media(folder: Path, row: Row, suffixes: tuple[str, ...]) -> Path | None:
    """The row's `path` (relative to `folder`), else the first `{id}.SUFFIX` in `folder` or `folder/page_dir`."""
    if row.path:
        return folder / row.path  # an absolute path stays as it is
    bases = [folder] + ([folder / row.subdir] if row.subdir else [])
    for base in bases:
        for suffix in (*suffixes, *(s.upper() for s in suffixes)):
            candidate = base / f"{row.id}{suffix}"
            if candidate.is_file():
                return candidate
    return None


# ------------------------------------------------------------------------------------------ conversion (workers)


@dataclass(frozen=True)
class Converted:
    media: bytes  # mp4 (H.264) or png
    meta: dict


@dataclass(frozen=True)
class Skipped:
    reason: str  # one of SKIP_REASONS
    detail: str = ""


def fit_size(width: int, height: int, max_size: int, even: bool = False) -> tuple[int, int]:
    """Longest side at most `max_size`, aspect ratio kept, never upscaled; even sizes (yuv420p) when `even`."""
    scale = min(1.0, max_size / max(width, height))

    def side(length: int) -> int:
        exact = length * scale
        if not even:
            return max(1, min(round(exact), length))
        return max(2, min(2 * round(exact / 2), length - length % 2, max_size - max_size % 2))
    return side(width), side(height)


def _detail(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def convert_video(path: str, max_size: int = 512, crf: int = VIDEO_CRF, threads: int = 0) -> Converted | Skipped:
    """Decode a video frame by frame, resize to `fit_size(..., even=True)` and encode H.264 mp4 at the source rate.

    Memory holds a few decoded frames and the encoded output. threads: codec threads (0: FFmpeg's choice).
    """
    try:
        container = av.open(path)
    except FileNotFoundError as error:
        return Skipped(MISSING_FILE, _detail(error))
    except Exception as error:  # anything FFmpeg cannot open is reported, never fatal
        return Skipped(UNDECODABLE, _detail(error))
    output = io.BytesIO()
    target = None
    try:
        with container:
            if not container.streams.video:
                kinds = ", ".join(stream.type for stream in container.streams) or "none"
                return Skipped(NO_VIDEO_STREAM, f"streams: {kinds}")
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = "AUTO", threads
            source_rate = stream.average_rate or stream.guessed_rate
            if not source_rate or source_rate <= 0:
                return Skipped(NO_FRAME_RATE, "the container gives no average or guessed frame rate")
            rate = Fraction(source_rate).limit_denominator(1001)
            frames = 0
            for frame in container.decode(stream):
                if target is None:
                    source_size = frame.width, frame.height
                    width, height = fit_size(frame.width, frame.height, max_size, even=True)
                    target = av.open(output, mode="w", format="mp4")
                    encoder = target.add_stream("libx264", rate=rate)
                    encoder.pix_fmt, encoder.width, encoder.height = "yuv420p", width, height
                    encoder.options = {"crf": str(crf)}
                    encoder.codec_context.thread_count = threads
                image = frame.reformat(width, height, format="rgb24", interpolation="BICUBIC")
                image.pts, image.time_base = frames, 1 / rate
                target.mux(encoder.encode(image))
                frames += 1
            if target is None:
                return Skipped(ZERO_FRAMES, "the video stream decodes to no frames")
            target.mux(encoder.encode())
            target.close()
            target = None
            if container.duration:
                source_duration = container.duration / av.time_base
            elif stream.duration and stream.time_base:
                source_duration = float(stream.duration * stream.time_base)
            else:
                source_duration = frames / float(rate)
    except Exception as error:
        return Skipped(UNDECODABLE, _detail(error))
    finally:
        if target is not None:
            target.close()
    meta = dict(kind="video", fps=float(rate), frames=frames, duration=frames / float(rate), width=width,
                height=height, source=path, source_fps=float(source_rate), source_width=source_size[0],
                source_height=source_size[1], source_duration=source_duration)
    return Converted(output.getvalue(), meta)


def convert_image(path: str, max_size: int = 512, threads: int = 0) -> Converted | Skipped:
    """Decode the first frame of an image file, resize to `fit_size(...)` and encode PNG (rgb24, no alpha)."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return Skipped(UNDECODABLE, "no image stream")
            stream = container.streams.video[0]
            stream.thread_count = threads
            frame = next(container.decode(stream), None)
            if frame is None:
                return Skipped(UNDECODABLE, "the image decodes to no frame")
            width, height = fit_size(frame.width, frame.height, max_size)
            image = frame.reformat(width, height, format="rgb24", interpolation="BICUBIC")
            media = _encode_png(image)
    except FileNotFoundError as error:
        return Skipped(MISSING_FILE, _detail(error))
    except Exception as error:
        return Skipped(UNDECODABLE, _detail(error))
    meta = dict(kind="image", fps=0.0, frames=1, duration=0.0, width=width, height=height, source=path,
                source_width=frame.width, source_height=frame.height)
    return Converted(media, meta)


def _encode_png(image: av.VideoFrame) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.pix_fmt, stream.width, stream.height = "rgb24", image.width, image.height
        image.pts = None
        container.mux(stream.encode(image))
        container.mux(stream.encode())
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ building (parent)


@dataclass(frozen=True)
class _Task:
    row: Row
    source: str  # the media file, or where the row is when there is none
    caption: str
    path: str | None = None
    skip: Skipped | None = None


def _tasks(rows: Iterator[Row], folder: Path, captions: Path, suffixes: tuple[str, ...]) -> Iterator[_Task]:
    for row in rows:
        where = f"{captions}:{row.line}"
        if row.problem:
            yield _Task(row, where, "", skip=Skipped(row.problem, row.detail))
            continue
        if not row.id:
            yield _Task(row, where, "", skip=Skipped(MISSING_ID, "the id cell is empty or absent"))
            continue
        path = find_media(folder, row, suffixes)
        source = str(path) if path is not None else str(folder / f"{row.id}.*")
        caption, reason, detail = clean_caption(row.caption)
        if reason:
            yield _Task(row, source, "", skip=Skipped(reason, detail))
        elif path is None or not path.is_file():
            expected = f"no {row.id}{{{','.join(suffixes)}}} in {folder}" + (f" or {folder / row.subdir}"
                                                                             if row.subdir else "")
            yield _Task(row, source, "", skip=Skipped(MISSING_FILE, "not a file" if path else expected))
        else:
            yield _Task(row, source, caption, path=str(path))


def _ordered(tasks: Iterator[_Task], convert: Callable[[str], Converted | Skipped],
             workers: int) -> Iterator[tuple[_Task, Converted | Skipped]]:
    """(task, result) in task order; up to 4 * workers conversions in flight (bounded memory)."""
    if workers <= 1:
        for task in tasks:
            yield task, task.skip or convert(task.path)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads (torch, tqdm)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, None if task.skip else pool.submit(convert, task.path)))
            if len(pending) >= 4 * workers:
                task, future = pending.popleft()
                yield task, task.skip or future.result()
        while pending:
            task, future = pending.popleft()
            yield task, task.skip or future.result()


def _check(max_size: int, samples_per_shard: int, workers: int, smallest: int) -> None:
    if max_size < smallest:
        raise BuildError(f"--max-size must be at least {smallest}, got {max_size}")
    if samples_per_shard < 1:
        raise BuildError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if workers < 0:
        raise BuildError(f"--workers must be 0 (in-process) or more, got {workers}")


def _build(kind: str, folder, captions, out, convert, suffixes: tuple[str, ...], samples_per_shard: int,
           workers: int, info: dict) -> Manifest:
    from cascade.data.shards import ShardSink  # here, not at the top: webdataset imports torch (slow worker start)

    folder, captions, out = Path(folder), Path(captions), Path(out)
    if not folder.is_dir():
        raise BuildError(f"{folder}: {kind} folder not found" if not folder.exists() else f"{folder}: not a folder")
    rows = read_captions(captions)
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a folder")
    try:
        sink = ShardSink(out, samples_per_shard, dict(builder=kind, media=str(folder), captions=str(captions),
                                                      samples_per_shard=samples_per_shard, **info))
    except OSError as error:
        raise BuildError(f"{out}: cannot create the output folder ({error.strerror})") from None
    keys = _Keys()
    media_ext = "mp4" if kind == "videos" else "png"
    with tqdm(total=count_rows(captions), desc=f"{kind} -> {out}", unit=kind[:-1]) as bar:
        for task, result in _ordered(_tasks(rows, folder, captions, suffixes), convert, workers):
            if isinstance(result, Skipped):
                sink.skip(task.source, result.reason)
                sink.manifest.skipped[-1].update(id=task.row.id, line=task.row.line, detail=result.detail)
                bar.set_postfix(skipped=len(sink.manifest.skipped), refresh=False)
            else:
                sink.write(keys.make(task.row.id), result.media, media_ext, task.caption,
                           dict(result.meta, id=task.row.id))
            bar.update()
    return sink.close()


def _threads(workers: int) -> int:
    """Codec threads per conversion: FFmpeg's choice in-process, else the cores shared among the workers."""
    return 0 if workers <= 1 else max(1, (os.cpu_count() or 1) // workers)


def build_video_shards(videos: str | Path, captions: str | Path, out: str | Path, max_size: int = 512,
                       samples_per_shard: int = 256, workers: int = 4, crf: int = VIDEO_CRF) -> Manifest:
    """Shards of H.264 mp4 videos (longest side <= max_size, every frame at the source rate) with their captions.

    workers: conversion processes (0 or 1: in this process). Raises BuildError for bad arguments; bad rows and
    files are skipped and listed in the manifest.
    """
    _check(max_size, samples_per_shard, workers, smallest=2)
    convert = partial(convert_video, max_size=max_size, crf=crf, threads=_threads(workers))
    return _build("videos", videos, captions, out, convert, VIDEO_SUFFIXES, samples_per_shard, workers,
                  dict(max_size=max_size, crf=crf))


def build_image_shards(images: str | Path, captions: str | Path, out: str | Path, max_size: int = 512,
                       samples_per_shard: int = 1024, workers: int = 4) -> Manifest:
    """Shards of PNG stills (longest side <= max_size) with their captions, for joint image-video training."""
    _check(max_size, samples_per_shard, workers, smallest=1)
    convert = partial(convert_image, max_size=max_size, threads=_threads(workers))
    return _build("images", images, captions, out, convert, IMAGE_SUFFIXES, samples_per_shard, workers,
                  dict(max_size=max_size))


# ------------------------------------------------------------------------------------------------ commands


def summary(manifest: Manifest, out: Path) -> str:
    counts = ", ".join(f"{reason} {count}" for reason, count in manifest.to_dict()["skipped_by_reason"].items())
    media = (f"{manifest.videos} videos ({manifest.video_seconds / 3600:.2f} h)" if manifest.videos or not
             manifest.images else f"{manifest.images} images")
    return (f"{out}: {media} in {len(manifest.shards)} shards; skipped {len(manifest.skipped)}"
            + (f" ({counts})" if counts else ""))


def _command(build, media: Path, args) -> int:
    try:
        manifest = build(media, args.captions, args.out, max_size=args.max_size,
                         samples_per_shard=args.samples_per_shard, workers=args.workers)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out))
    if not manifest.samples:
        print(f"warning: {args.out}: every row was skipped; see skipped_by_reason in its manifest.json",
              file=sys.stderr)
    return 0


def videos_command(args) -> int:
    """`cascade data videos`: 0 on success, 2 with a one-line message for bad arguments."""
    return _command(build_video_shards, args.videos, args)


def images_command(args) -> int:
    """`cascade data images`: 0 on success, 2 with a one-line message for bad arguments."""
    return _command(build_image_shards, args.images, args)
