"""README.md's "Train on your own videos", run as written: the section's ```bash blocks, command by command, in a
folder laid out as the section says (videos/ and captions.csv), on small real videos this test makes with PyAV."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Train on your own videos"

# The videos of the section's layout: (id, caption, width, height, fps, seconds, colour, audio). Different sizes,
# frame rates and aspect ratios; one with an AAC audio stream; each at least the tiny recipe's 2 s at 16+ fps.
VIDEOS = [
    ("red", "a red square moving right", 96, 64, 24, 3.0, (230, 30, 30), False),
    ("green", "a green square moving right", 64, 64, 30, 2.5, (30, 230, 30), True),
    ("blue", "a blue square moving right", 80, 48, 25, 3.0, (30, 30, 230), False),
]
BROKEN = ("broken", "a file that is not a video")  # listed in the table, skipped by the build


def section(text: str) -> str:
    """The lines after HEADING up to the next heading (lines inside code fences are not headings)."""
    lines = text.splitlines()
    start = lines.index(HEADING) + 1
    fenced = False
    for end in range(start, len(lines)):
        if lines[end].startswith("```"):
            fenced = not fenced
        elif not fenced and lines[end].startswith("#"):
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands as bash reads them: a line ending in a backslash joins the next, a here-document
    (`<<'WORD'`) runs to its WORD line; blank and comment lines are left out. The text is not changed."""
    out, lines, i = [], block.splitlines(), 0
    while i < len(lines):
        command = lines[i]
        i += 1
        if not command.strip() or command.lstrip().startswith("#"):
            continue
        while command.endswith("\\") and i < len(lines):
            command += "\n" + lines[i]
            i += 1
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", command)
        if heredoc:
            while i < len(lines):
                command += "\n" + lines[i]
                i += 1
                if lines[i - 1].strip() == heredoc.group(1):
                    break
        out.append(command)
    return out


def write_video(path: Path, width: int, height: int, fps: int, seconds: float, colour, audio: bool) -> None:
    """A square of `colour` moving left to right over noise, H.264 (and silent AAC audio when `audio`)."""
    rng = np.random.default_rng(len(path.name))
    frames = round(fps * seconds)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("aac", rate=22050) if audio else None
        side = height // 3
        for i in range(frames):
            image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            left = (width - side) * i // (frames - 1)
            image[height // 3:height // 3 + side, left:left + side] = colour
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            for pts in range(0, int(seconds * 22050), 1024):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 22050, pts
                container.mux(sound.encode(frame))
            container.mux(sound.encode())


def make_folder(folder: Path) -> None:
    """videos/ and captions.csv (id, caption, path) as the section lays them out, plus one broken file."""
    (folder / "videos").mkdir(parents=True)
    rows = []
    for id, caption, width, height, fps, seconds, colour, audio in VIDEOS:
        write_video(folder / "videos" / f"{id}.mp4", width, height, fps, seconds, colour, audio)
        rows.append((id, caption, f"{id}.mp4"))
    (folder / "videos" / f"{BROKEN[0]}.mp4").write_bytes(b"this is not a video\n")
    rows.append((*BROKEN, f"{BROKEN[0]}.mp4"))
    with open(folder / "captions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "caption", "path"])
        writer.writerows(rows)


def mp4_frames(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of the first video stream, decoded."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


def run_as_written(lines: list[str], folder: Path) -> list[tuple[float, str]]:
    """Run each command line in `folder` with bash, `cascade` on PATH; check its exit status, that no traceback was
    printed and what CHECKS says it leaves. -> (seconds, command) per line."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    seconds = []
    for line in lines:
        start = time.perf_counter()
        result = subprocess.run(line, shell=True, cwd=folder, env=env, executable="/bin/bash",
                                capture_output=True, text=True, timeout=300)
        output = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"{line}\nexit {result.returncode}\n{output}"
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
        for prefix, check in CHECKS.items():
            if line.startswith(prefix):
                check(folder, result.stdout)
        seconds.append((round(time.perf_counter() - start, 1), line.splitlines()[0][:60]))
    return seconds


def section_commands() -> list[list[str]]:
    """The command lines of each ```bash block of the section, in order."""
    blocks = [commands(block) for block in bash_blocks(section(README.read_text()))]
    assert blocks, f"no ```bash block under {HEADING!r} in {README}"
    return blocks


# What each command of the section must leave behind (the section's prose says so), keyed by how it starts.
def _shards(folder: Path, out: str) -> None:
    manifest = json.loads((folder / "shards/mine/manifest.json").read_text())
    assert manifest["videos"] == len(VIDEOS) and manifest["samples"] == len(VIDEOS)
    assert manifest["skipped_by_reason"] == {"undecodable file": 1}
    assert [s["id"] for s in manifest["skipped"]] == [BROKEN[0]]
    assert all((folder / "shards/mine" / s["path"]).is_file() for s in manifest["shards"])
    # the line the section quotes
    assert "shards/mine: 3 videos (0.00 h) in 1 shards; skipped 1 (undecodable file 1)" in out


def _tiny_t5(folder: Path, out: str) -> None:
    assert (folder / "t5/config.json").is_file() and (folder / "t5/spiece.model").is_file()


def _embed(folder: Path, out: str) -> None:
    from safetensors import safe_open

    parts = sorted((folder / "shards/mine/embeddings").glob("part-*-of-*.safetensors"))
    assert len(parts) == 1
    with safe_open(str(parts[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["captions"] == str(len(VIDEOS)) and meta["max_tokens"] == "16"


def _copy(folder: Path, out: str) -> None:
    assert "name: tiny" in (folder / "tiny.yaml").read_text()


def _my_yaml(folder: Path, out: str) -> None:
    assert (folder / "my.yaml").read_text().startswith("extends: tiny.yaml")


def _validate(folder: Path, out: str) -> None:
    assert re.search(r"^base\s+base\s+noise \+ text\s+4x8x8@2\s", out, flags=re.M), out


def _train(folder: Path, out: str) -> None:
    assert re.search(r"^data: \d+ samples read, none bad$", out, flags=re.M), out
    assert "run folder: runs/mine/base" in out
    run = folder / "runs/mine/base"
    for name in ("checkpoints/last.ckpt", "recipe.yaml", "run.json"):
        assert (run / name).is_file(), name
    assert (run / "logs").is_dir()
    steps = [json.loads(line)["step"] for line in (run / "train_steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    keys = {key for line in (run / "train_steps.jsonl").read_text().splitlines() for key in json.loads(line)["keys"]}
    assert keys <= {id for id, *_ in VIDEOS} and keys  # trained on these videos, not the synthetic set


def _wandb(folder: Path, out: str) -> None:
    run = folder / "runs/mine/base"
    assert re.search(r"^resuming base from runs/mine/base/checkpoints/\S+ \(step 4\)$", out, flags=re.M), out
    steps = [json.loads(line)["step"] for line in (run / "train_steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), offline


def _export(folder: Path, out: str) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "runs/mine/export/base.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["cascade.stage"])["name"] == "base" and meta["cascade.global_step"] == "4"


def _sample(folder: Path, out: str) -> None:
    assert mp4_frames(folder / "samples/first.mp4") == (4, 8, 8)  # the tiny base: 4 frames of 8x8
    assert (folder / "samples/first_stages").is_dir()
    assert json.loads((folder / "samples/first.json").read_text())


CHECKS = {
    "cascade data videos ": _shards,
    "cascade data tiny-t5 ": _tiny_t5,
    "cascade data embed ": _embed,
    "cascade recipes cp tiny tiny.yaml": _copy,
    "cat > my.yaml": _my_yaml,
    "cascade validate my.yaml": _validate,
    "cascade train my.yaml --stage base stages.base.train.max_steps=4": _train,
    "cascade export ": _export,
    "cascade sample my.yaml ": _sample,
    "cascade train my.yaml --stage base stages.base.train.max_steps=6 logging.wandb.project=mine": _wandb,
}


def test_readme_commands_parse():
    """The parser reads backslash continuations and here-documents as bash does."""
    block = "a \\\n  b\n# note\n\ncat > f <<'YAML'\nx: 1\nYAML\nc\n"
    assert commands(block) == ["a \\\n  b", "cat > f <<'YAML'\nx: 1\nYAML", "c"]
    text = f"intro\n{HEADING}\n```bash\none\n```\n```\n# not a heading\n```\n### next\n```bash\ntwo\n```\n"
    assert [commands(b) for b in bash_blocks(section(text))] == [["one"]]


def test_readme_recipe_validates(tmp_path):
    """The section's recipe block as written (copy, my.yaml, validate): the recipe it writes stays valid, in the
    default test run (the whole walk-through is slow)."""
    block = next(b for b in section_commands() if any(line.startswith("cat > my.yaml") for line in b))
    run_as_written(block, tmp_path)


@pytest.mark.slow  # 53 s on two otherwise idle cores; 80 to 145 s with other jobs on them
def test_train_on_your_own_videos(tmp_path):
    """Every command of the section exits 0 in a folder laid out as it says and leaves what it says."""
    make_folder(tmp_path)
    lines = [line for block in section_commands() for line in block]
    seconds = run_as_written(lines, tmp_path)
    steps = [prefix for line in lines for prefix in CHECKS if line.startswith(prefix)]
    assert steps == list(CHECKS), f"steps missing or out of order; the section's commands were {lines}"
    print("seconds per command:", *seconds, sep="\n  ")
