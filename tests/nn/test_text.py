"""The frozen T5 wrapper, loaded through `from_pretrained` from a local folder."""

from pathlib import Path

import pytest
import torch

from cascade.nn.text import FrozenT5


def test_encode_shapes_mask_and_padding(tiny_t5):
    encoder = FrozenT5.from_pretrained(tiny_t5, max_tokens=8)
    assert encoder.dim == 64
    emb, mask = encoder.encode(["a red circle moving left on a black background", "hi"])
    assert emb.shape == (2, 8, 64) and mask.shape == (2, 8) and mask.dtype == torch.bool
    assert mask[0].all()  # 10 tokens (one per word, end of sequence), truncated to max_tokens
    # the tiny T5's vocabulary (sentencepiece on built-in captions) has no "hi": "▁", "h", "i", end of sequence
    assert encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer("hi").input_ids) == ["▁", "h", "i", "</s>"]
    assert mask[1].sum() == 4 and encoder.lengths(["hi"]).tolist() == [4]
    assert torch.all(emb[1, 4:] == 0)  # padding positions are zeroed
    assert not any(p.requires_grad for p in encoder.parameters())
    again, _ = encoder.encode(["hi"])
    torch.testing.assert_close(again[0], emb[1])  # batch composition does not change an embedding


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenT5.from_pretrained(tmp_path / "no-such-t5", max_tokens=8)


def test_where_an_encoder_is_read_from(tiny_t5, tmp_path, monkeypatch):
    """One rule for the loader and the pre-flight check: an existing path is a folder (with config.json); a missing
    one is a hub id only when written like one; anything else is a missing folder, named in the error."""
    from cascade.nn.text import locate_text_encoder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: nothing is found there
    assert locate_text_encoder(tiny_t5) == "folder"
    assert locate_text_encoder("google/t5-v1_1-xxl") == "hub" and locate_text_encoder("t5-small") == "hub"
    for missing in ("runs/tiny/t5", "./t5", str(tmp_path / "t5"), "weights/t5.safetensors"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            locate_text_encoder(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        locate_text_encoder(tmp_path / "empty")


def test_training_checks_the_encoder_before_any_work(tmp_path):
    from cascade.lit.train import check_text_encoder
    from cascade.recipe import load_recipe

    tiny = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml",
                       [f"text_encoder.path={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match=r"text_encoder.path: text encoder folder .*nope does not exist; "
                                                r"build it with `cascade data tiny-t5"):
        check_text_encoder(tiny)
