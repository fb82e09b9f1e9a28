import numpy as np
import pytest
import torch

from cascade.eval.clipsim import CLIPSim, build_tiny_clip, is_tiny_clip, load_clip

CAPTIONS = ["a red circle moving left on a black background", "a blue square", "a green star spinning"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def clipsim(tiny_clip):
    return CLIPSim(tiny_clip, batch_size=5)  # 5 frames a forward: chunks straddle videos


def _videos(b: int = 3, t: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)


def _embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def _reference_cosines(folder, videos: np.ndarray, captions: list[str]) -> np.ndarray:
    """(B, T) cosines straight from transformers: processor -> features -> L2-normalise -> dot."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    b, t = videos.shape[:2]
    pixels = processor(images=[frame for video in videos for frame in video], return_tensors="pt")["pixel_values"]
    image = _embedding(model.get_image_features(pixel_values=pixels))
    tokens = processor(text=captions, return_tensors="pt", padding=True)
    text = _embedding(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image.reshape(b, t, -1) * text[:, None]).sum(-1).double().numpy()


def test_tiny_clip_loads_as_real_checkpoint(tiny_clip):
    from transformers import AutoProcessor, CLIPModel, CLIPProcessor

    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in tiny_clip.iterdir()}
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert type(AutoProcessor.from_pretrained(tiny_clip)).__name__ == "CLIPProcessor"
    model = CLIPModel.from_pretrained(tiny_clip)
    ids = processor.tokenizer(["a red circle"])["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert max(ids) < model.config.text_config.vocab_size
    assert is_tiny_clip(tiny_clip)


def test_matches_hand_computation(tiny_clip, clipsim):
    videos = _videos()
    ref = _reference_cosines(tiny_clip, videos, CAPTIONS)
    result = clipsim.score(videos, CAPTIONS)
    np.testing.assert_allclose(result["per_video"], ref.mean(1), atol=1e-5)
    assert result["cosine"] == pytest.approx(ref.mean(1).mean(), abs=1e-5)
    assert result["score"] == pytest.approx(100 * result["cosine"], rel=1e-12)
    assert result["torchmetrics_score"] == pytest.approx(max(100 * ref.mean(), 0.0), abs=1e-3)
    assert result["videos"] == 3 and result["frames"] == 12
    assert result["tiny_random"] and result["model"] == clipsim.model_name
    assert clipsim.model_name.startswith("tiny random CLIP")


def test_torchmetrics_convention_matches_clipscore(tiny_clip, clipsim):
    """Plain torchmetrics CLIPScore, given our loader (a local folder is refused by name) and feature adapter,
    over every frame with its caption: the same value as our `torchmetrics_score`."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    videos = _videos(seed=1)
    metric = CLIPScore(model_name_or_path=lambda: load_clip(tiny_clip))
    frames = torch.from_numpy(videos).permute(0, 1, 4, 2, 3).reshape(-1, 3, 32, 32)
    metric.update(frames, [c for c in CAPTIONS for _ in range(videos.shape[1])])
    expected = float(metric.compute())
    result = clipsim.score(videos, CAPTIONS)
    assert result["torchmetrics_score"] == pytest.approx(expected, abs=1e-4)
    assert result["torchmetrics_score"] == pytest.approx(max(result["score"], 0.0), abs=1e-4)


def test_mean_over_frames_not_mean_frame(clipsim):
    """A video whose frames differ scores the mean of its frames' scores, not the score of its mean frame."""
    black, white = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)
    caption = [CAPTIONS[0]]
    per_frame = [clipsim.score(f[None, None], caption)["cosine"] for f in (black, white)]
    video = clipsim.score(np.stack([black, white])[None], caption)["cosine"]
    mean_frame = clipsim.score(np.full((1, 1, 32, 32, 3), 128, np.uint8), caption)["cosine"]
    assert video == pytest.approx(np.mean(per_frame), abs=1e-5)
    assert abs(video - mean_frame) > 1e-3


def test_streaming_equals_one_shot(clipsim):
    videos = _videos(b=5, seed=2)
    captions = CAPTIONS + ["a yellow triangle", "a white star bouncing"]
    one_shot = clipsim.score(torch.from_numpy(videos), captions)
    clipsim.reset()
    clipsim.update(videos[:2], captions[:2])
    clipsim.update(videos[2:3], captions[2:3])
    clipsim.update(videos[3:], captions[3:])
    streamed = clipsim.compute()
    np.testing.assert_allclose(streamed["per_video"], one_shot["per_video"], atol=1e-5)
    for key in ("cosine", "score", "torchmetrics_score"):
        assert streamed[key] == pytest.approx(one_shot[key], abs=1e-4)
    assert streamed["videos"] == 5 and streamed["frames"] == 20
    clipsim.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        clipsim.compute()


def test_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*save_pretrained.*clip-vit-base-patch32"):
        CLIPSim(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CLIPSim(tmp_path)


def test_bad_inputs(clipsim):
    videos = _videos(b=2)
    with pytest.raises(ValueError, match="2 videos but 3 captions"):
        clipsim.score(videos, CAPTIONS)
    with pytest.raises(ValueError, match="2 videos but 3 captions"):
        clipsim.update(videos, CAPTIONS)
    with pytest.raises(TypeError, match="uint8"):
        clipsim.score(videos.astype(np.float32) / 255, CAPTIONS[:2])
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        clipsim.score(videos.transpose(0, 1, 4, 2, 3), CAPTIONS[:2])
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        clipsim.score(videos[0], CAPTIONS[:1])
    with pytest.raises(TypeError, match="list of strings"):
        clipsim.score(videos[:1], "a red circle")
