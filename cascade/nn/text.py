"""The frozen T5 text encoder (Imagen: T5-XXL), loaded with `transformers` from a local folder or hub id, and a
tiny randomly initialised T5 in the same folder layout for tests and the demo."""

from __future__ import annotations

import io
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def locate_text_encoder(path: str | Path) -> str:
    """Where the encoder at `path` is read from: "folder" (a `save_pretrained` folder), "cache" (a hub id already in
    the local hub cache) or "hub" (a hub id to download). A path that exists is a folder and must hold config.json;
    one that does not exist is a hub id only if it is written like one (`name` or `org/name`, no file suffix, not
    starting with . or /); anything else is a missing folder. Raises FileNotFoundError naming the path."""
    from huggingface_hub import try_to_load_from_cache

    text = str(path)
    if Path(text).exists():
        if not (Path(text) / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {text} has no config.json (expected the layout "
                                    f"`save_pretrained` writes)")
        return "folder"
    if not re.fullmatch(r"[A-Za-z0-9][\w-]*(/[\w.-]+)?", text) or Path(text).suffix:
        raise FileNotFoundError(f"text encoder folder {text} does not exist")
    return "cache" if isinstance(try_to_load_from_cache(text, "config.json"), str) else "hub"


class FrozenT5(nn.Module):
    """Tokenizer + `T5EncoderModel`, frozen, in eval mode. `encode` returns token embeddings and mask."""

    def __init__(self, tokenizer, encoder, max_tokens: int) -> None:
        super().__init__()
        self.tokenizer, self.encoder, self.max_tokens = tokenizer, encoder.eval().requires_grad_(False), max_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, max_tokens: int, dtype: str = "float32",
                        device: str | torch.device = "cpu") -> FrozenT5:
        """`path` is a folder in the `save_pretrained` layout or a hub id; a folder, or a hub id already in the
        local hub cache, is read offline."""
        from transformers import AutoTokenizer, T5EncoderModel

        local = locate_text_encoder(path) != "hub"
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local)
        encoder = T5EncoderModel.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=local)
        return cls(tokenizer, encoder.to(device), max_tokens)

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def lengths(self, captions: list[str]) -> Tensor:
        """-> (B,) int64: real tokens of each caption (end of sequence included) after truncation to max_tokens,
        i.e. `encode(captions)[1].sum(1)` without running the encoder."""
        batch = self.tokenizer(list(captions), max_length=self.max_tokens, truncation=True)
        return torch.tensor([len(ids) for ids in batch["input_ids"]], dtype=torch.int64)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, L, dim) float32 and mask (B, L) bool (True = real token), L = max_tokens."""
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                               return_tensors="pt").to(self.encoder.device)
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.bool()
        return hidden.float() * mask[..., None], mask


def train_sentencepiece(captions: Iterable[str], vocab_size: int = 256, seed: int = 0) -> bytes:
    """A unigram sentencepiece model with T5's conventions (pad 0, eos 1, unk 2, no bos, NFKC normalisation),
    trained single-threaded on `captions` in order: the same captions and seed give the same bytes.

    The trainer's own seed pieces come from maximal repeats, which in templated captions ("a red circle moving
    left on a ...") cross word boundaries and are dropped, leaving a ~50-piece character-level vocabulary; we seed
    it with every in-word substring instead (scored frequency x length, as sentencepiece does), so whole words
    become pieces as they would in a real T5 vocabulary."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, as transformers' spiece conversion does

    captions = list(captions)
    words = Counter(w for c in captions for w in unicodedata.normalize("NFKC", c).split())
    pieces = Counter()
    for word, count in words.items():
        word = "\u2581" + word
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + 16) + 1):
                pieces[word[i:j]] += count
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds.tsv"
        seeds.write_text("".join(f"{p}\t{n * len(p)}\n" for p, n in sorted(pieces.items(), key=lambda x: x[0])),
                         encoding="utf-8")
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small caption set may support fewer pieces: take what it supports
            seed_sentencepieces_file=str(seeds), pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
            normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2)
    # the model records its training options; drop the temporary seed file's path so the bytes are reproducible
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    proto.trainer_spec.ClearField("seed_sentencepieces_file")
    return proto.SerializeToString(deterministic=True)


def build_tiny_t5(folder: str | Path, captions: Iterable[str], dim: int = 64, layers: int = 2,
                  heads: int = 4, vocab_size: int = 256, seed: int = 0) -> Path:
    """A randomly initialised tiny T5 (v1.1 layout: gated-GELU) whose sentencepiece tokenizer is trained on
    `captions` (a dataset's, or `cascade.data.synthetic.all_captions()`), saved like a real checkpoint: config.json,
    model.safetensors, spiece.model, tokenizer.json, tokenizer_config.json. `FrozenT5.from_pretrained` and
    `AutoTokenizer` load it offline as the real `T5Tokenizer`. vocab_size bounds the sentencepiece pieces; the
    model's embedding table also holds T5's 100 sentinel ids."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    captions = [str(c) for c in captions]
    if not captions:
        raise ValueError("no captions to train the tokenizer on")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(captions, vocab_size, seed)
    with tempfile.TemporaryDirectory() as tmp:  # alone, so a tokenizer.json left in `folder` cannot shadow it
        (Path(tmp) / "spiece.model").write_bytes(model)
        # from_pretrained converts spiece.model; `T5Tokenizer(vocab_file=...)` would silently keep a 104-token vocab
        tokenizer = T5Tokenizer.from_pretrained(tmp, model_max_length=512)
    (folder / "spiece.model").write_bytes(model)
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=2 * dim, num_layers=layers,
                      num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
