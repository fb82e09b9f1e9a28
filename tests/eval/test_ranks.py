"""`cascade eval` and `cascade sample --prompts` on 2 gloo ranks (torchrun, CPU) give what one process gives: the
same FVD (from statistics merged by all-reduce), probe and CLIPSIM scores, sample videos; each rank did a part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cascade.cli import main
from cascade.data.video import read_video
from cascade.recipe import load_recipe
from cascade.recipe.build import build_unet

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# I3D at 224 x 224 takes ~7 s a video on a CPU core: the features here are a fixed projection of each video's
# protocol frames (deterministic, batch-independent, float64), so the test checks the merging, not Kinetics.
FAKE_I3D = """
import numpy as np, torch
from cascade.eval import fvd as _fvd

def _features(self, videos, protocol=None):
    x = _fvd.select_frames(torch.as_tensor(np.asarray(videos)), protocol or self.protocol).double()
    pooled = x.mean(dim=(2, 3)).flatten(1).numpy()  # (B, frames * 3)
    projection = np.random.default_rng(0).standard_normal((pooled.shape[1], 400))
    return np.tanh(pooled @ projection / 255.0)
"""
DRIVER = FAKE_I3D + """
_fvd.I3DFeatures.features = _features
import sys
from cascade.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-init weights of the stages the runs use, exported like trained ones."""
    folder = tmp_path_factory.mktemp("rank-weights")
    recipe = load_recipe(TINY)
    for name in ("base", "tsr1", "ssr1", "ssr2", "tsr2"):
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in build_unet(recipe.stage(name), recipe).state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))
    return folder


def _one_process(monkeypatch, argv: list[str]) -> None:
    """`cascade ARGV` in this process with one thread, as each rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _two_ranks(argv: list[str], driver: Path | None = None) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [*TORCHRUN, *([str(driver)] if driver else ["-m", "cascade.cli"]), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def test_eval_on_two_ranks_matches_one_process(weights, tiny_t5, tmp_path, monkeypatch):
    from cascade.eval.clipsim import build_tiny_clip

    from cascade.eval.fvd import I3DFeatures

    namespace: dict = {}
    exec(FAKE_I3D, namespace)
    monkeypatch.setattr(I3DFeatures, "features", namespace["_features"])  # the same features in this process
    clip = build_tiny_clip(tmp_path / "clip")
    common = [str(TINY), "--checkpoints", str(weights), "--num-videos", "5", "--batch-size", "2", "--steps", "",
              "--guidance", "", "--aug", "", "--metrics", "probes,fvd,clipsim", "--stages", "base,tsr2",
              "--modes", "gt", f"text_encoder.path={tiny_t5}", f"data.root={tmp_path / 'data'}",
              f"eval.clip_path={clip}", "stages.base.sampler.steps=2", "stages.tsr2.sampler.steps=2",
              "eval.fvd_stages=[tsr2]"]
    _one_process(monkeypatch, ["eval", *common, "--out", str(tmp_path / "one")])
    (tmp_path / "driver.py").write_text(DRIVER)
    log = _two_ranks(["eval", *common, "--out", str(tmp_path / "two")], tmp_path / "driver.py")
    # 3 batches of 2, 2, 1 videos: rank 0 samples the first two, rank 1 the last.
    assert "rank 0/2: 4 of 5 videos (0-3)" in log and "rank 1/2: 1 of 5 videos (4-4)" in log
    one, two = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "two"))
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert one["ground_truth"] == two["ground_truth"]
    assert [(r["stage"], r["mode"]) for r in one["rows"]] == [(r["stage"], r["mode"]) for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert a["probes"] == b["probes"] and a["nfe_per_video"] == b["nfe_per_video"]
        # CLIP's cosines are float32 (a sample may differ from one process's by float32 rounding): float32 level
        assert abs(a["clipsim"]["cosine"] - b["clipsim"]["cosine"]) <= 1e-6 * abs(a["clipsim"]["cosine"])
    fvds = [(a["fvd"], b["fvd"]) for a, b in zip(one["rows"], two["rows"]) if "fvd" in a]
    assert fvds and all(abs(a - b) <= 1e-9 * abs(a) for a, b in fvds), fvds
    gifs = sorted(p.name for p in (tmp_path / "one" / "samples").iterdir())
    assert gifs == sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) and len(gifs) == 4
    for name in gifs:
        assert (tmp_path / "one" / "samples" / name).read_bytes() == (tmp_path / "two" / "samples" / name).read_bytes()


def test_sample_prompts_on_two_ranks_matches_one_process(weights, tiny_t5, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\na blue square moving up on a gray "
                       "background\na green circle moving right on a white background\n")
    common = ["sample", str(TINY), "--checkpoints", str(weights), f"text_encoder.path={tiny_t5}", "--up-to", "ssr1",
              "--prompts", str(prompts), "--batch-size", "1", "--seed", "5", "--device", "cpu",
              *[f"stages.{s}.sampler.steps=2" for s in ("base", "tsr1", "ssr1")]]
    _one_process(monkeypatch, [*common, "--out", str(tmp_path / "one" / "v.mp4")])
    log = _two_ranks([*common, "--out", str(tmp_path / "two" / "v.mp4")])
    assert "rank 0/2: 2 of 3 videos (0-1)" in log and "rank 1/2: 1 of 3 videos (2-2)" in log
    one, two = (json.loads((tmp_path / name / "v.json").read_text()) for name in ("one", "two"))
    assert two["environment"]["videos_per_rank"] == [2, 1] and [o["prompt"] for o in one["outputs"]] == \
        [o["prompt"] for o in two["outputs"]]
    for a, b in zip(one["outputs"], two["outputs"]):
        for x, y in [(a["video"], b["video"]), *zip(a["stages"].values(), b["stages"].values())]:
            assert np.array_equal(read_video(x)[0], read_video(y)[0]), (x, y)
            assert Path(x).read_bytes() == Path(y).read_bytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_and_sample_on_cuda(weights, tiny_t5, tmp_path):
    """The default device is CUDA when present: the real I3D and the U-Nets run there (bfloat16 U-Nets)."""
    from cascade.eval.i3d import find_i3d_weights

    find_i3d_weights()
    out = tmp_path / "v.mp4"
    assert main(["sample", str(TINY), "--checkpoints", str(weights), f"text_encoder.path={tiny_t5}", "--up-to",
                 "tsr1", "--prompt", "a red circle moving left on a black background", "--out", str(out),
                 "--dtype", "bfloat16", "stages.base.sampler.steps=2", "stages.tsr1.sampler.steps=2"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["environment"]["device"].startswith("cuda")
    assert main(["eval", str(TINY), "--checkpoints", str(weights), "--num-videos", "2", "--batch-size", "2",
                 "--steps", "", "--guidance", "", "--aug", "", "--metrics", "probes,fvd", "--stages", "tsr2",
                 "--modes", "gt", f"text_encoder.path={tiny_t5}", f"data.root={tmp_path / 'data'}",
                 "stages.tsr2.sampler.steps=2", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"]
    assert np.isfinite(rows[0]["fvd"])
