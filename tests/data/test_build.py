"""Real-data shard builders: real mp4/mkv/png files in, shards + manifest out; bad rows and files skipped with reasons."""

import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cascade.cli import main
from cascade.data.build import fit_size, sample_key
from cascade.data.shards import Manifest
from cascade.data.video import encode_image, read_video

ROOT = Path(__file__).resolve().parents[2]

# id -> (frames, width, height, fps, file relative to the media folder)
GOOD = {
    "a": (12, 96, 64, 8.0, "a.mp4"),
    "b": (10, 40, 30, 12.5, "b.mp4"),
    "c": (20, 64, 48, 30.0, "page1/c.mkv"),  # found through the WebVid page_dir column
    "dot.id": (10, 40, 30, 12.5, "dot.id.mp4"),  # key "dot_id"
    "dot_id": (12, 96, 64, 8.0, "dot_id.mp4"),  # sanitizes to "dot_id" as well: key "dot_id_1"
}
CSV_ROWS = [  # videoid, name, page_dir, expected skip reason (None: kept)
    ("a", "a red gradient sliding right", "", None),
    ("corrupt", "random bytes", "", "undecodable file"),
    ("b", "a small slow clip, with a comma", "", None),
    ("truncated", "the first half of an mp4", "", "undecodable file"),
    ("missing", "no file has this id", "", "missing file"),
    ("c", "thirty frames a second", "page1", None),
    ("empty", "   ", "", "empty caption"),
    ("audio", "only sound", "", "no video stream"),
    ("nothing", "a video stream without frames", "", "zero frames"),
    ("badtext", "BADTEXT", "", "caption not valid text"),
    ("dot.id", "a dotted id", "", None),
    ("dot_id", "an id that collides once sanitized", "", None),
]
KEYS = ["a", "b", "c", "dot_id", "dot_id_1"]


def gradient(frames, height, width):
    """A gradient that slides right by 7 px a frame, brightening blue: every frame differs."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([((x + 7 * t) * 255 // (width + 7 * frames)), y * 255 // height, t * 200 // frames], axis=-1)
    return rgb.astype(np.uint8)


def write_source(path, frames, fps, audio=False):
    """Frames (T, H, W, 3) uint8 -> an H.264 file in the container its suffix names; audio=True adds an AAC track."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.pix_fmt, stream.height, stream.width = "yuv420p", *frames.shape[1:3]
        if audio:
            sound = container.add_stream("aac", rate=8000)
            sound.layout = "mono"
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate = 8000
            for packet in [*sound.encode(chunk), *sound.encode(None)]:
                container.mux(packet)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_csv(path, header, rows, raw=None):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    for placeholder, value in (raw or {}).items():
        data = data.replace(placeholder.encode(), value)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("webvid")
    videos = root / "videos"
    (videos / "page1").mkdir(parents=True)
    for frames, width, height, fps, name in GOOD.values():
        write_source(videos / name, gradient(frames, height, width), fps)
    valid = (videos / "a.mp4").read_bytes()
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (videos / "truncated.mp4").write_bytes(valid[: len(valid) // 2])
    shutil.copy(videos / "b.mp4", videos / "empty.mp4")
    shutil.copy(videos / "b.mp4", videos / "badtext.mp4")
    with av.open(str(videos / "audio.mp4"), mode="w") as container:  # an AAC track and nothing else
        sound = container.add_stream("aac", rate=8000)
        sound.layout = "mono"
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        chunk.sample_rate = 8000
        for packet in [*sound.encode(chunk), *sound.encode(None)]:
            container.mux(packet)
    write_source(videos / "nothing.mkv", np.zeros((0, 32, 32, 3), np.uint8), 8, audio=True)

    table = write_csv(root / "results_10M_val.csv", ["videoid", "name", "page_dir"],
                      [row[:3] for row in CSV_ROWS], raw={"BADTEXT": b"\xff\xfe not utf-8"})
    lines = [
        json.dumps({"id": 7, "caption": "a numeric id with a path", "path": "a.mp4"}),
        json.dumps({"id": "nested", "caption": "a path into a subfolder", "path": "page1/c.mkv"}),
        json.dumps({"id": "x", "caption": 42, "path": "b.mp4"}),
        '{"id": "w", "caption": "a lone \\ud800 surrogate", "path": "b.mp4"}',
        "[1, 2]",
        "",
        json.dumps({"caption": "no id", "path": "a.mp4"}),
        json.dumps({"id": "b", "caption": "found by its id"}),
        json.dumps({"id": "gone", "caption": "a path to nowhere", "path": "gone.mp4"}),
        "not json {",
    ]
    jsonl = root / "captions.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return dict(root=root, videos=videos, csv=table, jsonl=jsonl)


def read_shard(path):
    """-> [(key, {ext: bytes})] in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def read_dataset(folder):
    manifest = Manifest.read(folder)
    samples = []
    for shard in manifest.shards:
        content = read_shard(folder / shard["path"])
        assert len(content) == shard["samples"]
        samples += content
    return manifest, samples


@pytest.fixture(scope="module")
def built(media):
    outs = {}
    for workers in (2, 0):
        out = media["root"] / f"shards-{workers}"
        assert main(["data", "videos", "--videos", str(media["videos"]), "--captions", str(media["csv"]),
                     "--out", str(out), "--max-size", "48", "--samples-per-shard", "2",
                     "--workers", str(workers)]) == 0
        outs[workers] = out
    return outs


def test_videos_round_trip_captions_metadata_and_frames(built, media):
    manifest, samples = read_dataset(built[2])
    captions = {row[0]: row[1] for row in CSV_ROWS}
    assert [key for key, _ in samples] == KEYS
    for (key, files), id in zip(samples, GOOD):
        frames, width, height, fps, name = GOOD[id]
        meta = json.loads(files["json"])
        assert files["txt"].decode() == captions[id].strip()
        assert meta["id"] == id and meta["source"] == str(media["videos"] / name) and meta["kind"] == "video"
        assert (meta["source_width"], meta["source_height"], meta["source_fps"]) == (width, height, fps)
        assert meta["frames"] == frames and meta["fps"] == fps
        assert meta["duration"] == pytest.approx(frames / fps) and meta["source_duration"] == pytest.approx(
            frames / fps, abs=0.1)
        assert max(meta["width"], meta["height"]) <= 48 and meta["width"] % 2 == meta["height"] % 2 == 0
        assert meta["width"] / meta["height"] == pytest.approx(width / height, rel=0.05)

        video, decoded_fps = read_video(files["mp4"])
        assert video.shape == (frames, meta["height"], meta["width"], 3)
        assert decoded_fps == pytest.approx(fps)
        source, _ = read_video(media["videos"] / name)
        # Resizing keeps each frame's mean colour: frames are all there, in order, with their content.
        assert np.abs(video.mean(axis=(1, 2)) - source.mean(axis=(1, 2))).max() < 4


def test_manifest_counts_hours_shards_and_skips(built, media):
    manifest = Manifest.read(built[2])
    assert manifest.videos == manifest.samples == len(GOOD) and manifest.images == 0
    assert [shard["samples"] for shard in manifest.shards] == [2, 2, 1]
    seconds = sum(frames / fps for frames, _, _, fps, _ in GOOD.values())
    data = json.loads((built[2] / "manifest.json").read_text())
    assert data["hours_of_video"] == pytest.approx(seconds / 3600)
    expected = [(id, reason) for id, _, _, reason in CSV_ROWS if reason]
    assert [(skip["id"], skip["reason"]) for skip in manifest.skipped] == expected
    assert data["skipped_by_reason"] == {"undecodable file": 2, "missing file": 1, "empty caption": 1,
                                         "no video stream": 1, "zero frames": 1, "caption not valid text": 1}
    by_id = {skip["id"]: skip for skip in manifest.skipped}
    assert by_id["corrupt"]["source"] == str(media["videos"] / "corrupt.mp4")
    assert by_id["missing"]["source"] == str(media["videos"] / "missing.*")
    assert "Invalid data" in by_id["truncated"]["detail"] and by_id["audio"]["detail"] == "streams: audio"
    assert manifest.info["max_size"] == 48 and manifest.info["builder"] == "videos"


def test_workers_do_not_change_the_dataset(built):
    parallel, serial = (read_dataset(built[workers]) for workers in (2, 0))
    assert parallel[0].to_dict() == serial[0].to_dict()
    for (key, files), (key0, files0) in zip(parallel[1], serial[1], strict=True):
        assert (key, files["txt"], files["json"]) == (key0, files0["txt"], files0["json"])


def test_jsonl_paths_ids_and_bad_rows(media, tmp_path):
    out = tmp_path / "shards"
    assert main(["data", "videos", "--videos", str(media["videos"]), "--captions", str(media["jsonl"]),
                 "--out", str(out), "--workers", "0"]) == 0
    manifest, samples = read_dataset(out)
    assert [key for key, _ in samples] == ["7", "nested", "b"]
    metas = [json.loads(files["json"]) for _, files in samples]
    assert [(m["width"], m["height"]) for m in metas] == [(96, 64), (64, 48), (40, 30)]  # never upscaled
    assert [files["txt"].decode() for _, files in samples] == ["a numeric id with a path",
                                                              "a path into a subfolder", "found by its id"]
    assert [(skip["line"], skip["reason"]) for skip in manifest.skipped] == [
        (3, "caption not valid text"), (4, "caption not valid text"), (5, "bad caption table row"),
        (7, "missing id"), (9, "missing file"), (10, "bad caption table row")]
    assert manifest.skipped[0]["detail"] == "caption is a JSON int, not a string"
    assert manifest.skipped[2]["source"] == f"{media['jsonl']}:5"


def test_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = {"p": gradient(1, 60, 100)[0], "q": gradient(1, 10, 20)[0]}
    for name, picture in pictures.items():
        (folder / f"{name}.png").write_bytes(encode_image(picture))
    pictures["r"] = gradient(1, 32, 64)[0]
    with av.open(str(folder / "r.jpg"), mode="w", format="image2") as container:  # found as {id}.jpg
        stream = container.add_stream("mjpeg")
        stream.pix_fmt, stream.height, stream.width = "yuvj420p", 32, 64
        container.mux(stream.encode(av.VideoFrame.from_ndarray(pictures["r"], format="rgb24")))
        container.mux(stream.encode())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (folder / "blank.png").write_bytes(encode_image(pictures["q"]))
    table = write_csv(tmp_path / "captions.csv", ["id", "caption"],
                      [("p", "wide"), ("broken", "a broken png"), ("q", "tiny"), ("blank", ""),
                       ("huge", "x" * 200_000), ("r", "a jpeg")])  # past csv.field_size_limit()
    out = tmp_path / "shards"
    assert main(["data", "images", "--images", str(folder), "--captions", str(table), "--out", str(out),
                 "--max-size", "50", "--samples-per-shard", "2", "--workers", "2"]) == 0
    manifest, samples = read_dataset(out)
    assert manifest.images == 3 and manifest.videos == 0 and manifest.video_seconds == 0
    assert [shard["samples"] for shard in manifest.shards] == [2, 1]
    assert [(skip["id"], skip["reason"]) for skip in manifest.skipped] == [
        ("broken", "undecodable file"), ("blank", "empty caption"), ("", "bad caption table row")]
    assert manifest.skipped[-1]["line"] == 6 and "field larger than field limit" in manifest.skipped[-1]["detail"]
    assert [key for key, _ in samples] == ["p", "q", "r"]
    for (key, files), size in zip(samples, [(50, 30), (20, 10), (50, 25)]):
        meta = json.loads(files["json"])
        assert (meta["kind"], meta["frames"], meta["fps"], meta["duration"]) == ("image", 1, 0, 0)
        assert (meta["width"], meta["height"]) == size
        assert (meta["source_width"], meta["source_height"]) == pictures[key].shape[1::-1]
        image, _ = read_video(files["png"])
        assert image.shape == (1, size[1], size[0], 3)
        assert np.abs(image.mean(axis=(1, 2)) - pictures[key].mean(axis=(0, 1))).max() < 4


@pytest.mark.parametrize("case, message", [
    ("no-folder", "nope: videos folder not found"),
    ("no-table", "nope.csv: caption table not found"),
    ("no-id", "clips.csv: no id column (expected id or videoid; found clip, text)"),
    ("no-caption", "clips.csv: no caption column (expected caption or name; found videoid, text)"),
    ("suffix", "clips.txt: unknown caption table format '.txt'"),
    ("not-json", "clips.jsonl: line 1 is not JSON"),
    ("empty-jsonl", "clips.jsonl: empty caption table"),
    ("max-size", "--max-size must be at least 2, got 1"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, case, message):
    videos = tmp_path / "videos"
    videos.mkdir()
    table = tmp_path / "clips.csv"
    extra = []
    if case == "no-folder":
        videos = tmp_path / "nope"
    elif case == "no-table":
        table = tmp_path / "nope.csv"
    elif case in ("no-id", "no-caption"):
        write_csv(table, ["clip" if case == "no-id" else "videoid", "text"], [("a", "b")])
    elif case == "suffix":
        table = tmp_path / "clips.txt"
        table.write_text("a b\n")
    elif case in ("not-json", "empty-jsonl"):
        table = tmp_path / "clips.jsonl"
        table.write_text("id,caption\n" if case == "not-json" else "\n")
    else:
        write_csv(table, ["id", "caption"], [("a", "b")])
        extra = ["--max-size", "1"]
    out = tmp_path / "out"
    assert main(["data", "videos", "--videos", str(videos), "--captions", str(table), "--out", str(out),
                 *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and message in error
    assert not out.exists()


def test_size_rule_and_keys():
    assert fit_size(1920, 1080, 512, even=True) == (512, 288)
    assert fit_size(1080, 1920, 512, even=True) == (288, 512)
    assert fit_size(41, 31, 512, even=True) == (40, 30)  # never upscaled, even for yuv420p
    assert fit_size(1000, 3, 511, even=True) == (510, 2)
    assert fit_size(41, 31, 512) == (41, 31) and fit_size(100, 60, 50) == (50, 30)
    assert sample_key("00012.clip/v1 é") == "00012_clip_v1__"


def test_entry_point_script(media, tmp_path):
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, str(ROOT / "data" / "webvid.py"), "--videos", str(media["videos"]),
                             "--captions", str(media["jsonl"]), "--out", str(out), "--workers", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 videos" in result.stdout and "skipped 6" in result.stdout
    assert Manifest.read(out).samples == 3
