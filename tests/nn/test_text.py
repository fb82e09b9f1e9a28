"""The frozen T5 wrapper, loaded through `from_pretrained` from a local folder."""

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
