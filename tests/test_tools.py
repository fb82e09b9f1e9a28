"""The video tools (image-to-video, story, edit, upscale) on the tiny recipe with random networks and few steps:
through the `cascade` command line (written files, reports, errors) and as Python functions (exact checks)."""

import dataclasses
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cascade import tools
from cascade.cli import main
from cascade.data.video import encode_image, read_video, write_video
from cascade.inference import Cascade
from cascade.recipe import load_recipe

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
STAGES = ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"]
FAST = [f"stages.{s}.sampler.steps=2" for s in STAGES]


@pytest.fixture(scope="module")
def cascade(tiny_t5):
    return Cascade.from_recipe(load_recipe(TINY, [f"text_encoder.path={tiny_t5}", *FAST]), device="cpu")


def _video(path: Path, frames: int = 20, fps: float = 8.0, size=(24, 36), seed: int = 0) -> np.ndarray:
    video = np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    write_video(path, video, fps)
    return video


def _run(tmp_path, tiny_t5, *args) -> int:
    return main([*args[:2], str(TINY), *args[2:], f"text_encoder.path={tiny_t5}", *FAST])


def _fake_sample_stage(calls):
    """Cascade.sample_stage recording its arguments and returning zeros of the stage's shape (spec.frames when
    windowed), one network evaluation."""
    def sample_stage(self, name, text, text_mask, previous, seed, indices, setting=None, progress=False, *,
                     spec=None, stream=None, **extra):
        stage = self.recipe.stage(name)
        calls.append(dict(name=name, previous=previous, indices=list(indices), setting=setting, spec=spec, **extra))
        frames = stage.frames if spec is None else spec.frames
        return torch.zeros(text.shape[0], 3, frames, stage.height, stage.width), 1
    return sample_stage


# --- image-to-video --------------------------------------------------------------------------------------------
def test_sample_image_writes_video_and_report(tmp_path, tiny_t5):
    image = tmp_path / "image.png"
    image.write_bytes(encode_image(np.full((10, 30, 3), 200, np.uint8)))
    out = tmp_path / "i2v.mp4"
    code = main(["sample", str(TINY), f"text_encoder.path={tiny_t5}", *FAST, "--image", str(image), "--prompt",
                 "a red circle moving right", "--prompt", "a blue square", "--up-to", "base", "--out", str(out)])
    assert code == 0
    base = load_recipe(TINY).stage("base")
    for index in range(2):
        frames, fps = read_video(tmp_path / f"i2v_{index:03d}.mp4")
        assert frames.shape == (base.frames, base.height, base.width, 3) and abs(fps - base.fps) < 0.1
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tool"] == "image_to_video" and report["tool_settings"]["image"] == str(image)
    assert report["tool_settings"]["image_size"] == [30, 10] and report["per_stage"]["base"]["nfe_per_video"] == 4


def test_image_is_the_known_first_frame_at_every_stage(cascade, monkeypatch):
    calls = []
    monkeypatch.setattr(Cascade, "sample_stage", _fake_sample_stage(calls))
    image = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    result = tools.image_to_video(cascade, image, ["a", "b", "c"], batch_size=2, up_to="ssr1", reconstruction=2.5,
                                  progress=False)
    assert [c["name"] for c in calls] == ["base", "tsr1", "ssr1"] * 2
    assert [c["indices"] for c in calls[::3]] == [[0, 1], [2]]  # prompt k is video k
    for call in calls:
        stage = cascade.recipe.stage(call["name"])
        fitted = tools._to_tensor(tools.fit_frames(image[None], stage.width, stage.height))[:, :, 0]
        known, mask = call["known"], call["known_mask"]
        assert known.shape[2:] == (stage.frames, stage.height, stage.width)
        assert torch.equal(known[:, :, 0], fitted.expand(len(known), -1, -1, -1))
        assert mask[:, 0].all() and not mask[:, 1:].any() and call["setting"] == {"reconstruction": 2.5}
    assert result.videos["ssr1"].shape == (3, 3, 8, 16, 16)


def test_fit_frames_covers_and_centre_crops():
    frames = np.zeros((1, 16, 48, 3), np.uint8)
    frames[:, :, 16:32] = 255  # the middle third is white
    fitted = tools.fit_frames(frames, 8, 8)  # cover: 24x8 (area, factor 2), then the centre 8 columns
    assert fitted.shape == (1, 8, 8, 3) and fitted.min() == 255


def test_image_to_video_through_a_stage_with_reconstruction_guidance(cascade):
    image = np.full((8, 8, 3), 255, np.uint8)
    result = tools.image_to_video(cascade, image, ["a"], up_to="tsr1", progress=False)
    assert result.videos["tsr1"].shape == (1, 3, 8, 8, 8)
    # the replacement method: the known frame is the prediction's, so the sampler ends on it
    assert torch.allclose(result.videos["tsr1"][:, :, 0], torch.ones(1, 3, 8, 8), atol=1e-5)


# --- story -----------------------------------------------------------------------------------------------------
def test_sample_story_one_long_video(tmp_path, tiny_t5):
    out = tmp_path / "story.mp4"
    code = main(["sample", str(TINY), f"text_encoder.path={tiny_t5}", *FAST, "--story", "--prompt", "a red circle",
                 "--prompt", "a blue square", "--prompt", "a green circle", "--up-to", "tsr1", "--out", str(out)])
    assert code == 0
    recipe = load_recipe(TINY)
    base, tsr1 = recipe.stage("base"), recipe.stage("tsr1")
    long_base = base.frames + 2 * (base.frames - 1)  # F + (n - 1)(F - k), k = 1
    report = json.loads(out.with_suffix(".json").read_text())
    assert read_video(report["outputs"][0]["stages"]["base"])[0].shape[0] == long_base
    frames, fps = read_video(out)
    assert frames.shape == (long_base * 2, tsr1.height, tsr1.width, 3) and abs(fps - tsr1.fps) < 0.1
    assert report["tool"] == "story" and report["tool_settings"]["context_frames"] == 1
    assert len(report["outputs"]) == 1 and report["per_stage"]["tsr1"]["windows"] > 1


def test_sample_story_from_an_image_starts_with_it(tmp_path, tiny_t5):
    image = tmp_path / "image.png"
    still = np.zeros((16, 16, 3), np.uint8)
    still[4:12, 4:12] = (230, 40, 40)
    image.write_bytes(encode_image(still))
    out = tmp_path / "story.mp4"
    code = main(["sample", str(TINY), f"text_encoder.path={tiny_t5}", *FAST, "--story", "--image", str(image),
                 "--prompt", "a red square moving right", "--prompt", "a red square moving up", "--up-to", "base",
                 "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tool"] == "story" and report["tool_settings"]["image"] == str(image)
    base = load_recipe(TINY).stage("base")
    frames, _ = read_video(out)
    assert frames.shape[0] == 2 * base.frames - 1


def test_story_from_an_image_keeps_it_as_the_first_frame(cascade):
    from cascade.tools import fit_frames, story

    still = np.zeros((16, 16, 3), np.uint8)
    still[4:12, 4:12] = (230, 40, 40)
    result = story(cascade, ["a red square moving right", "a red square moving up"], image=still, up_to="base",
                   progress=False)
    base = cascade.recipe.stage("base")
    fitted = torch.from_numpy(fit_frames(still[None], base.width, base.height)[0]).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(result.videos["base"][0, :, 0], fitted.float())


def test_story_continues_from_context_frames_to_the_last_stage(cascade, monkeypatch):
    calls = []
    monkeypatch.setattr(Cascade, "sample_stage", _fake_sample_stage(calls))
    result = tools.story(cascade, ["a", "b", "c"], context_frames=2, progress=False)
    base = cascade.recipe.stage("base")
    long_base = base.frames + 2 * (base.frames - 2)
    assert result.videos["base"].shape[2] == long_base
    segments = [c for c in calls if c["name"] == "base"]
    assert [c["indices"] for c in segments] == [[0], [1], [2]] and "known" not in segments[0]
    assert all(c["known_mask"][0].tolist() == [True, True, False, False] for c in segments[1:])
    # the final stage: every SR stage multiplies the frames by its ratio (tiny: x8 in time), windowed
    assert result.final.shape == (1, 3, long_base * 8, 64, 64)
    windowed = [c for c in calls if c["name"] == "ssr3"][0]["spec"]
    assert windowed.frames == long_base * 8 and windowed.denoiser.window == cascade.recipe.stage("ssr3").frames
    with pytest.raises(Exception, match="context-frames"):
        tools.story(cascade, ["a", "b"], context_frames=base.frames, progress=False)


def test_story_windows_take_their_segments_text(cascade):
    texts, masks = cascade.encode(["one", "two", "three"])
    seen = []
    inner = tools._WindowText(lambda z, logsnr, text, text_mask, **kw: seen.append(text) or z,
                              [(texts[i:i + 1], masks[i:i + 1]) for i in range(3)])
    for _ in range(2):  # two passes over three windows
        for i in range(3):
            inner(torch.zeros(2, 1), None, text=texts[:1].repeat(2, 1, 1), text_mask=masks[:1].repeat(2, 1))
    assert all(torch.equal(s[0], texts[i % 3]) and s.shape[0] == 2 for i, s in enumerate(seen))


# --- edit ------------------------------------------------------------------------------------------------------
def test_edit_strength_zero_returns_the_resampled_input(cascade):
    video = np.random.default_rng(1).integers(0, 256, (40, 24, 36, 3), dtype=np.uint8)
    result = tools.edit(cascade, video, 16.0, "a red circle", strength=0.0, progress=False)
    assert list(result.videos) == STAGES
    for name, edited in result.videos.items():
        stage = cascade.recipe.stage(name)
        expected = tools.resample_video(video, 16.0, stage.frames, stage.width, stage.height, stage.fps)
        assert torch.equal(edited, expected), name
    # frame times: the base (2 fps) takes every 8th frame of the 16 fps input
    assert tools.frame_times(4, 16.0, 2.0, 40) == [0, 8, 16, 24]


def test_edit_command_writes_stages_and_report(tmp_path, tiny_t5):
    source = tmp_path / "in.mp4"
    _video(source, frames=20, fps=8.0)
    out = tmp_path / "edited.mp4"
    code = main(["edit", str(TINY), str(source), f"text_encoder.path={tiny_t5}", *FAST, "--prompt", "a red circle",
                 "--strength", "0.5", "--up-to", "ssr1", "--out", str(out)])
    assert code == 0
    ssr1 = load_recipe(TINY).stage("ssr1")
    frames, fps = read_video(out)
    assert frames.shape == (ssr1.frames, ssr1.height, ssr1.width, 3) and abs(fps - ssr1.fps) < 0.1
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tool"] == "edit" and list(report["per_stage"]) == ["base", "tsr1", "ssr1"]
    settings = report["tool_settings"]
    assert settings["strength"] == 0.5 and settings["input_frames"] == 20 and settings["input_size"] == [36, 24]
    assert abs(settings["input_fps"] - 8.0) < 0.1 and report["nfe_per_video"] > 0


def test_edit_with_a_source_prompt_inverts_and_samples_back_with_ddim(tmp_path, tiny_t5, monkeypatch):
    from cascade.sampling import cascade as sampling

    inverted = []
    real = sampling.ddim_invert
    monkeypatch.setattr(sampling, "ddim_invert", lambda *a: inverted.append(a[2]) or real(*a))
    source = tmp_path / "in.mp4"
    _video(source, frames=20, fps=8.0)
    out = tmp_path / "edited.mp4"
    code = main(["edit", str(TINY), str(source), f"text_encoder.path={tiny_t5}", *FAST, "--prompt", "a red circle",
                 "--source-prompt", "a blue circle", "--strength", "0.5", "--up-to", "tsr1", "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tool_settings"]["source_prompt"] == "a blue circle" and len(inverted) == 2  # base and tsr1
    assert report["tool_settings"]["region"] is True
    for grid, name in zip(inverted, ("base", "tsr1")):  # the inversion's evaluations count: as many again
        assert report["per_stage"][name]["nfe_per_video"] >= 2 * (len(grid) - 1)


def test_edit_keeps_the_input_structure_unless_told_otherwise(tmp_path, tiny_t5):
    """A flat input has no edge: with --structure input (default) the edit has none either (in a flat window the
    guided filter gives the edit's local mean: smooth colour changes only); with --structure edit the random
    networks draw whatever they draw."""
    source = tmp_path / "flat.mp4"
    write_video(source, np.full((20, 24, 36, 3), (90, 140, 200), np.uint8), 8.0)
    spreads = {}
    for structure in ("input", "edit"):
        out = tmp_path / f"{structure}.mp4"
        code = main(["edit", str(TINY), str(source), f"text_encoder.path={tiny_t5}", *FAST, "--prompt",
                     "a red circle", "--strength", "0.6", "--structure", structure, "--up-to", "ssr1",
                     "--out", str(out)])
        assert code == 0
        assert json.loads(out.with_suffix(".json").read_text())["tool_settings"]["structure"] == structure
        frames, _ = read_video(out)
        frames = frames.astype(np.float64)  # mean step between neighbouring pixels, uint8 levels (codec included)
        spreads[structure] = float(np.abs(np.diff(frames, axis=1)).mean() + np.abs(np.diff(frames, axis=2)).mean())
    assert spreads["input"] < 4 and spreads["edit"] > 10 * spreads["input"], spreads  # measured 1.9 and 93


# --- upscale ---------------------------------------------------------------------------------------------------
def test_upscale_command_keeps_the_duration(tmp_path, tiny_t5):
    source = tmp_path / "in.mp4"
    _video(source, frames=20, fps=8.0)  # 2.5 s: 5 frames at the base's 2 fps
    out = tmp_path / "up.mp4"
    code = main(["upscale", str(TINY), str(source), f"text_encoder.path={tiny_t5}", *FAST, "--from", "tsr1", "--to",
                 "ssr1", "--out", str(out)])
    assert code == 0
    ssr1 = load_recipe(TINY).stage("ssr1")
    frames, fps = read_video(out)
    assert frames.shape == (10, ssr1.height, ssr1.width, 3) and abs(fps - ssr1.fps) < 0.1
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["tool"] == "upscale" and list(report["per_stage"]) == ["tsr1", "ssr1"]
    assert report["per_stage"]["tsr1"]["windows"] == 2 and report["tool_settings"]["from_stage"] == "tsr1"


def test_upscale_constant_video_stays_constant_through_windows_and_padding(cascade, monkeypatch):
    spec = Cascade.spec

    def constant_spec(self, name, setting=None):  # a network that predicts the constant video
        return dataclasses.replace(spec(self, name, setting), denoiser=lambda z, logsnr, **kw: torch.full_like(z, 0.2))
    monkeypatch.setattr(Cascade, "spec", constant_spec)
    video = np.full((40, 12, 12, 3), 153, np.uint8)  # 5 s at 8 fps
    result = tools.upscale(cascade, video, 8.0, from_stage="tsr1", to_stage="ssr2", progress=False)
    assert result.videos["base"].shape[2] == 10 and result.final.shape == (1, 3, 20, 32, 32)
    assert torch.allclose(result.final, torch.full_like(result.final, 0.2), atol=1e-6)
    short = tools.upscale(cascade, video[:3], 8.0, from_stage="tsr1", to_stage="tsr1", progress=False)
    assert short.final.shape[2] == 2  # one input frame, padded to a clip and trimmed back


def test_interpolate_video_is_linear_in_time_and_keeps_constants():
    ramp = torch.linspace(-0.9, 0.3, 4).reshape(1, 1, 4, 1, 1).expand(1, 3, 4, 4, 4)
    up = tools.interpolate_video(ramp, 8, 8, 8)
    assert up.shape == (1, 3, 8, 8, 8)
    expected = torch.tensor([-0.9, -0.7, -0.5, -0.3, -0.1, 0.1, 0.3, 0.3])  # the last one held
    torch.testing.assert_close(up[0, 0, :, 3, 3], expected)
    flat = torch.full((1, 3, 2, 4, 4), 0.25)
    assert torch.allclose(tools.interpolate_video(flat, 4, 16, 16), torch.full((1, 3, 4, 16, 16), 0.25))


@pytest.mark.parametrize("frames", [40, 3])  # windows, and one input frame padded to a clip
def test_upscale_at_low_strength_refines_the_interpolated_input(cascade, monkeypatch, frames):
    """A network that returns its input (z / alpha) leaves the start: the output is the classical interpolation of
    the video to within the noise of t = strength, not the frame-repeated input."""
    spec = Cascade.spec

    def echo_spec(self, name, setting=None):
        def echo(z, logsnr, **kw):
            return z / torch.sigmoid(logsnr).sqrt().reshape(-1, 1, 1, 1, 1)
        return dataclasses.replace(spec(self, name, setting), denoiser=echo)
    monkeypatch.setattr(Cascade, "spec", echo_spec)
    level = np.linspace(40, 200, frames).round().astype(np.uint8)  # brightness ramps over the video
    video = np.broadcast_to(level[:, None, None, None], (frames, 12, 12, 3)).copy()
    result = tools.upscale(cascade, video, 8.0, from_stage="tsr1", to_stage="tsr1", strength=0.01, consistency=0.0,
                           progress=False)
    expected = tools.interpolate_video(result.videos["base"], result.final.shape[2], 8, 8)
    assert (result.final - expected).abs().max() < 0.1
    if frames == 40:  # a ramp: the frames between two input frames are their mean, not a repeat
        assert (result.final[:, :, 1] - result.videos["base"][:, :, 0]).abs().mean() > 0.02


# --- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["upscale", "MISSING", "--from", "tsr1"], "no such video file"),
    (["upscale", "TEXT", "--from", "tsr1"], "not a readable video"),
    (["upscale", "VIDEO", "--from", "base"], "the base stage makes videos from text"),
    (["upscale", "VIDEO", "--from", "nope"], "--from nope: no such stage"),
    (["upscale", "VIDEO", "--from", "ssr2", "--to", "tsr1"], "comes before"),
    (["edit", "SHORT", "--prompt", "x"], "shorter than the base stage's clip"),
    (["edit", "VIDEO", "--prompt", "x", "--strength", "2"], "--strength 2"),
    (["upscale", "VIDEO", "--from", "tsr1", "--strength", "-1"], "--strength -1"),
    (["sample", "--image", "MISSING", "--prompt", "x"], "no such image file"),
])
def test_tool_errors_are_one_line(tmp_path, tiny_t5, capsys, argv, message):
    _video(tmp_path / "video.mp4")
    _video(tmp_path / "short.mp4", frames=3, fps=8.0)
    (tmp_path / "text.mp4").write_text("not a video")
    paths = dict(MISSING=tmp_path / "none.mp4", TEXT=tmp_path / "text.mp4", VIDEO=tmp_path / "video.mp4",
                 SHORT=tmp_path / "short.mp4")
    command, *rest = [str(paths.get(a, a)) for a in argv]
    positional = [rest.pop(0)] if command != "sample" else []
    code = main([command, str(TINY), *positional, f"text_encoder.path={tiny_t5}", *FAST, *rest,
                 "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_tools_refuse_to_run_once_per_rank(tmp_path, tiny_t5, capsys, monkeypatch):
    """Under torchrun every rank would do the same work and write the same files: one line, exit 2, before work."""
    _video(tmp_path / "video.mp4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["upscale", str(TINY), str(tmp_path / "video.mp4"), f"text_encoder.path={tiny_t5}", *FAST, "--from",
                 "tsr1", "--out", str(tmp_path / "up.mp4")])
    assert code == 2 and not (tmp_path / "up.mp4").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs in one process" in err[0] and "started 2" in err[0]


def test_audio_is_dropped_with_a_warning(tmp_path, tiny_t5, capsys):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        audio = container.add_stream("aac", rate=8000)
        for _ in range(8):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(video.encode())
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    frames, fps = tools.read_user_video(path)
    assert frames.shape == (8, 16, 16, 3) and "audio dropped" in capsys.readouterr().err
