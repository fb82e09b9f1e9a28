"""The frozen T5 text encoder (Imagen: T5-XXL), loaded with `transformers` from a local folder or hub id."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FrozenT5(nn.Module):
    """Tokenizer + `T5EncoderModel`, frozen, in eval mode. `encode` returns token embeddings and mask."""

    def __init__(self, tokenizer, encoder, max_tokens: int) -> None:
        super().__init__()
        self.tokenizer, self.encoder, self.max_tokens = tokenizer, encoder.eval().requires_grad_(False), max_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, max_tokens: int, dtype: str = "float32",
                        device: str | torch.device = "cpu") -> FrozenT5:
        """`path` is a folder in the `save_pretrained` layout or a hub id; a folder is read offline."""
        from transformers import AutoTokenizer, T5EncoderModel

        local = Path(path).is_dir()
        if not local and (str(path).startswith((".", "/")) or Path(path).suffix):
            raise FileNotFoundError(f"text encoder folder {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local)
        encoder = T5EncoderModel.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=local)
        return cls(tokenizer, encoder.to(device), max_tokens)

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, L, dim) float32 and mask (B, L) bool (True = real token), L = max_tokens."""
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                               return_tensors="pt").to(self.encoder.device)
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.bool()
        return hidden.float() * mask[..., None], mask


def build_tiny_t5(folder: str | Path, dim: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A randomly initialised tiny T5 encoder saved in the same layout as a real checkpoint, with the
    byte-level ByT5 tokenizer (needs no vocabulary file), so tests and the demo use the real loading path."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=2 * dim, num_layers=layers,
                      num_heads=heads)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
