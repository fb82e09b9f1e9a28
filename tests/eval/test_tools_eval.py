"""cascade.eval.tools: the metric helpers on exact synthetic videos, and one small end-to-end run."""

import json
import math

import numpy as np
import pytest

from cascade.data.synthetic import Scene, render
from cascade.eval.tools import baseline_upscale, centroids, heldout_scenes, psnr, seam_jumps


def test_psnr_of_identical_frames_is_inf_and_falls_with_the_error():
    a = render(Scene("red", "circle", "right", "black", 0.3, 0.4, 0.5, 0.2), 4, 16, 16, 4.0)
    assert psnr(a, a) == math.inf
    b = a.astype(np.int16) + 1
    assert psnr(a, np.clip(b, 0, 255).astype(np.uint8)) > 40
    assert psnr(a, 255 - a) < 10


@pytest.mark.parametrize("shape,color,background", [("circle", "red", "black"), ("square", "cyan", "gray"),
                                                    ("triangle", "yellow", "gray")])
def test_centroid_recovers_the_rendered_centre(shape, color, background):
    scene = Scene(color, shape, "right", background, 0.3, 0.3, 0.45, 0.2)
    fps, frames = 16.0, 32
    video = render(scene, frames, 64, 64, fps)
    x, y = scene.center(np.arange(frames) / fps)
    if shape == "triangle":  # the area centroid lies r/3 below the bounding box's centre
        y = y + scene.size / 2 / 3
    found = centroids(video)
    assert np.abs(found[:, 0] - 64 * x).max() < 0.5 and np.abs(found[:, 1] - 64 * y).max() < 0.5


def test_centroid_of_an_empty_frame_is_nan():
    video = np.zeros((2, 16, 16, 3), np.uint8)
    assert np.isnan(centroids(video)).all()


def test_seam_jump_passes_on_a_continuous_video_and_fails_on_a_jump():
    scene = Scene("green", "square", "right", "black", 0.3, 0.25, 0.5, 0.2)
    video = render(scene, 32, 64, 64, 16.0)
    assert all(seam_jumps(centroids(video), [12, 20])["passed"])
    jumped = video.copy()
    jumped[20:] = render(Scene("green", "square", "right", "black", 0.3, 0.25, 0.2, 0.2), 12, 64, 64, 16.0,
                         t0=20 / 16)
    result = seam_jumps(centroids(jumped), [12, 20])
    assert result["passed"] == [True, False] and result["seam_jumps"][1] > 15


def test_baseline_shapes_and_a_constant_video_exactly():
    video = render(Scene("blue", "circle", "up", "gray", 0.3, 0.5, 0.6, 0.1), 4, 8, 8, 2.0)
    out = baseline_upscale(video, 2.0, 32, 64, 64, 16.0)
    assert out.shape == (32, 64, 64, 3) and out.dtype == np.uint8
    constant = np.full((4, 8, 8, 3), 77, np.uint8)
    assert np.array_equal(baseline_upscale(constant, 2.0, 16, 32, 32, 8.0), np.full((16, 32, 32, 3), 77, np.uint8))
    # Time only: every 2nd output frame at 2x fps is an input frame; those between are the mean of their neighbours.
    same = baseline_upscale(video, 2.0, 8, 8, 8, 4.0)
    assert np.array_equal(same[0:8:2], video)
    mid = (video[0].astype(np.float64) + video[1]) / 2
    assert np.abs(same[1] - mid).max() <= 0.5


def test_heldout_scenes_cover_distinct_combinations():
    scenes = heldout_scenes(8, 2.0, 0)
    assert len({s.combo for s in scenes}) == 8 and heldout_scenes(8, 2.0, 0) == scenes


@pytest.mark.parametrize("flag", ["--videos", "--stories"])
def test_eval_tools_refuses_a_count_below_one(tmp_path, capsys, flag):
    from cascade.cli import main

    assert main(["eval-tools", "tiny", "--checkpoints", str(tmp_path), flag, "0"]) == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_tools_end_to_end_on_a_random_tiny_cascade(tmp_path):
    pytest.importorskip("cascade.tools")
    from cascade.eval.tools import STORY_DIRECTIONS, evaluate_tools
    from cascade.nn.text import build_tiny_t5
    from cascade.recipe import load_recipe
    from cascade.data.synthetic import all_captions

    t5 = tmp_path / "t5"
    overrides = [f"text_encoder.path={t5}", f"run_dir={tmp_path / 'run'}"]
    overrides += [f"stages.{s}.sampler.steps=1" for s in ("base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3")]
    recipe = load_recipe("tiny", overrides)
    build_tiny_t5(t5, all_captions(), dim=recipe.text_encoder.dim)
    result = evaluate_tools(recipe, None, tmp_path / "tools", videos=1, device="cpu", progress=False, stories=2,
                            sweep_videos=1, strengths=(0.5, 0.9))
    saved = json.loads((tmp_path / "tools" / "tools.json").read_text())
    assert saved.get("errors") is None, saved["errors"]
    assert set(saved) >= {"image_to_video", "story", "edit", "upscale", "checks", "seconds", "examples", "plots"}
    assert set(saved["seconds"]) == {"load", "image_to_video", "story", "edit", "upscale"}
    assert saved["upscale"]["psnr_db"].keys() == {"tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"}
    assert [r["strength"] for r in saved["edit"]["sweep"]] == [0.5, 0.9]
    stories = saved["story"]["rows"]  # each story: another caption combination, another direction sequence
    assert saved["story"]["stories"] == 2 and stories[0]["prompts"][0] != stories[1]["prompts"][0]
    assert [[p.split(" moving ")[1].split()[0] for p in r["prompts"]] for r in stories] == [
        list(d) for d in STORY_DIRECTIONS[:2]]
    assert all((tmp_path / "tools" / "examples" / f"{k}.gif").stat().st_size > 0 for k in saved["examples"])
    assert (tmp_path / "tools" / "tools.md").read_text().startswith("# Video tools")
    assert result["checks"] == saved["checks"]


def test_report_has_a_video_tools_section(tmp_path):
    from cascade.eval.tools import checks
    from cascade.recipe import load_recipe
    from cascade.report import write_report

    run = tmp_path / "run"
    (run / "tools" / "examples").mkdir(parents=True)
    tools = dict(videos=2, seconds=dict(load=1.0, edit=3.0), plots=[str(run / "tools" / "tools.png")],
                 examples=dict(edit=str(run / "tools" / "examples" / "edit.gif")),
                 edit=dict(new_color=1.0, within_2px=0.5, mean_px=1.5), errors={"story": "AttributeError: x"})
    tools["checks"] = checks(tools)
    (run / "tools" / "tools.json").write_text(json.dumps(tools))
    recipe = load_recipe("tiny", [f"run_dir={run}", f"text_encoder.path={tmp_path / 't5'}"])
    text = write_report(recipe, run).read_text()
    assert "## Video tools" in text and "![edit](tools/examples/edit.gif)" in text
    assert "| edit | new_color | 100.0 % | >= 0.9 | pass |" in text
    assert "| edit | within_2px | 50.0 % | >= 0.9 | FAIL |" in text
    assert "| story | error: AttributeError: x | – | runs | FAIL |" in text
    summary = json.loads((run / "report.json").read_text())["tools"]
    assert summary["passed"] is False and len(summary["checks"]) == 4
