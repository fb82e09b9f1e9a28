"""The tiny T5 (sentencepiece tokenizer trained on a dataset's captions) and the T5 embedding cache."""

import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade.cli import main
from cascade.data import embed
from cascade.data.embed import (CacheEntryError, CacheError, EmbeddingCache, EmbeddingCacheWarning, TextSource,
                                embed_shards, encoder_factory, encoder_fingerprint)
from cascade.data.shards import ShardSink, caption_key
from cascade.nn.text import FrozenT5, train_sentencepiece

MAX_TOKENS = 16
LONG = " ".join(["a tiny red circle and a big blue square"] * 4)  # more than MAX_TOKENS tokens: truncated
CAPTIONS = [  # 9 samples, 2 per shard -> 5 shards; 3 duplicates (within a shard and across shards)
    "a red circle moving left on a black background",
    "a red circle moving left on a black background",
    "a blue square moving up on a white background",
    "un cercle rouge qui bouge à gauche — 猫",
    "a green triangle bouncing on a gray background",
    "a blue square moving up on a white background",
    LONG,
    "a red circle moving left on a black background",
    "hi",
]
UNIQUE = list(dict.fromkeys(CAPTIONS))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    with ShardSink(folder, samples_per_shard=2) as sink:
        for i, caption in enumerate(CAPTIONS):
            image = i % 3 == 0
            meta = dict(kind="image" if image else "video", fps=8.0, frames=1 if image else 4, duration=0.5,
                        width=8, height=8)
            sink.write(f"{i:06d}", b"\0" * 16, "png" if image else "mp4", caption, meta)
    return folder


@pytest.fixture(scope="module")
def t5(shards, tmp_path_factory):
    """The tiny T5 built by `cascade data tiny-t5` on the test dataset's captions."""
    out = tmp_path_factory.mktemp("t5") / "t5"
    assert main(["data", "tiny-t5", "--shards", str(shards), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def encoder(t5):
    return FrozenT5.from_pretrained(t5, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def cache_dir(shards, t5, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    embed_shards(shards, t5, max_tokens=MAX_TOKENS, out=out, batch_size=4, progress=False)
    return out


def test_tiny_t5_wrapper_equals_transformers(t5, encoder):
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(t5, local_files_only=True)
    model = T5EncoderModel.from_pretrained(t5, local_files_only=True).eval()
    batch = tokenizer(UNIQUE, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    emb, mask = encoder.encode(UNIQUE)
    assert torch.equal(mask, batch.attention_mask.bool())
    torch.testing.assert_close(emb[mask], reference[mask], rtol=0, atol=1e-6)
    assert torch.all(emb[~mask] == 0)
    assert mask[UNIQUE.index(LONG)].all()  # truncated to max_tokens


def test_tokenizer_is_t5_sentencepiece_offline_and_deterministic(t5, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(t5, local_files_only=True)
    assert type(tokenizer) is T5Tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token is None
    processor = spm.SentencePieceProcessor(model_file=str(t5 / "spiece.model"))
    for caption in UNIQUE:
        assert tokenizer(caption).input_ids == processor.encode(caption) + [1], caption  # no bos, eos last
    assert tokenizer.tokenize("a red circle")[:3] == ["▁a", "▁red", "▁circle"]  # words are pieces
    assert "<unk>" not in tokenizer.tokenize(UNIQUE[2])  # every character of the captions is covered

    # spiece.model alone (as in older checkpoints) gives the same tokenizer: it is the source of truth
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "spiece.model"):
        shutil.copy(t5 / name, bare / name)
    again = AutoTokenizer.from_pretrained(bare, local_files_only=True)
    assert type(again) is T5Tokenizer and again(UNIQUE).input_ids == tokenizer(UNIQUE).input_ids

    # `cascade data tiny-t5` trained on the shards' captions in shard order with seed 0: the same bytes again
    model = train_sentencepiece(CAPTIONS, vocab_size=256, seed=0)
    assert model == train_sentencepiece(CAPTIONS, vocab_size=256, seed=0) == (t5 / "spiece.model").read_bytes()


def test_rebuilding_into_a_folder_replaces_the_tokenizer(t5, tmp_path):
    from transformers import AutoTokenizer

    from cascade.nn.text import build_tiny_t5

    folder = shutil.copytree(t5, tmp_path / "t5")
    build_tiny_t5(folder, ["zebras graze", "zebras run"], dim=32, layers=1, heads=2)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.tokenize("zebras") == ["▁zebras"] and FrozenT5.from_pretrained(folder, 4).dim == 32


def test_cache_equals_on_the_fly_after_float16_cast(cache_dir, t5, encoder):
    cache = EmbeddingCache(cache_dir)
    assert (cache.dim, cache.max_tokens, cache.fingerprint) == (64, MAX_TOKENS, encoder_fingerprint(t5))
    for caption in UNIQUE:
        emb, mask = encoder.encode([caption])
        length = int(mask.sum())
        stored = cache.get(caption)
        assert caption in cache and stored.dtype == torch.float16
        assert torch.equal(stored, emb[0, :length].half()), caption
    emb, mask = cache.batch(list(reversed(UNIQUE)))
    reference, reference_mask = encoder.encode(list(reversed(UNIQUE)))
    assert emb.dtype == torch.float32 and torch.equal(mask, reference_mask)
    assert torch.equal(emb, reference.half().float())  # padded positions zero, as FrozenT5.encode gives them
    assert "a caption nobody wrote" not in cache and cache.get("a caption nobody wrote") is None
    with pytest.raises(KeyError, match="not in the cache"):
        cache.batch(["a caption nobody wrote"])
    with pytest.raises(ValueError, match="max_tokens 16"):
        cache.batch(UNIQUE, max_tokens=32)
    assert torch.equal(pickle.loads(pickle.dumps(cache)).get(LONG), cache.get(LONG))  # DataLoader workers


def test_part_file_layout_and_duplicates_stored_once(cache_dir):
    path = cache_dir / "part-00000-of-00001.safetensors"
    tensors = load_file(path)
    keys, lengths, offsets, tokens = tensors["keys"], tensors["lengths"], tensors["offsets"], tensors["tokens"]
    assert keys.dtype == torch.uint8 and keys.shape == (len(UNIQUE), 16)
    assert lengths.dtype == torch.int32 and offsets.dtype == torch.int64 and tokens.dtype == torch.float16
    assert tokens.shape == (int(lengths.sum()), 64)  # real tokens only
    assert offsets.tolist() == [0] + torch.cumsum(lengths, 0)[:-1].tolist()
    assert [bytes(k.tolist()).hex() for k in keys] == [caption_key(c) for c in UNIQUE]
    assert lengths[UNIQUE.index(LONG)] == MAX_TOKENS and lengths[UNIQUE.index("hi")] < MAX_TOKENS
    cache = EmbeddingCache(cache_dir)
    meta = cache.metadata[0]
    assert len(cache) == len(UNIQUE) == int(meta["captions"])
    assert (int(meta["samples"]), int(meta["duplicates"])) == (len(CAPTIONS), len(CAPTIONS) - len(UNIQUE))
    assert {meta["max_tokens"], meta["dim"], meta["dtype"], meta["parts"]} == {"16", "64", "float32", "1"}
    assert not list(cache_dir.glob("*.tmp*"))  # written through a temporary file, renamed


def test_parts_give_the_same_entries_and_must_all_be_there(shards, t5, cache_dir, tmp_path):
    whole = EmbeddingCache(cache_dir)
    out = tmp_path / "three"
    for part in range(3):  # shards 0,3 | 1,4 | 2: "a red circle ..." is in parts 0 and 1, stored in each
        embed_shards(shards, t5, max_tokens=MAX_TOKENS, out=out, part=part, parts=3, progress=False)
    split = EmbeddingCache(out)
    assert len(split) == len(whole) and sum(int(m["captions"]) for m in split.metadata) > len(whole)
    for caption in UNIQUE:
        assert torch.equal(split.get(caption), whole.get(caption)), caption

    (out / "part-00001-of-00003.safetensors").unlink()
    with pytest.raises(CacheError, match=r"missing 1 of 3 parts: part-00001-of-00003\.safetensors"):
        EmbeddingCache(out)
    embed_shards(shards, t5, max_tokens=12, out=out, part=1, parts=3, progress=False)
    with pytest.raises(CacheError, match="parts disagree on max_tokens"):
        EmbeddingCache(out)
    shutil.copy(cache_dir / "part-00000-of-00001.safetensors", out)
    with pytest.raises(CacheError, match="different splits"):
        EmbeddingCache(out)
    with pytest.raises(FileNotFoundError, match="cascade data embed"):
        EmbeddingCache(tmp_path / "nothing")

    empty = embed_shards(shards, t5, max_tokens=MAX_TOKENS, out=tmp_path / "six", part=5, parts=6, progress=False)
    tensors = load_file(empty)  # 5 shards, 6 parts: the last part holds nothing
    assert tensors["keys"].shape == (0, 16) and tensors["tokens"].shape == (0, 64)


def _hand_written_part(folder, cache_dir, captions, lengths, offsets, rows, width):
    """A part file written by hand, with a real part's metadata."""
    folder.mkdir()
    meta = EmbeddingCache(cache_dir).metadata[0]
    keys = torch.tensor(np.array([list(bytes.fromhex(caption_key(c))) for c in captions]), dtype=torch.uint8)
    save_file(dict(keys=keys, lengths=torch.tensor(lengths, dtype=torch.int32),
                   offsets=torch.tensor(offsets, dtype=torch.int64),
                   tokens=torch.randn(rows, width).half()), folder / "part-00000-of-00001.safetensors", metadata=meta)
    return EmbeddingCache(folder)


def test_inconsistent_entries_raise_cache_entry_error(cache_dir, tmp_path):
    good, long, outside, empty = "good", "too long", "outside", "empty"
    cache = _hand_written_part(tmp_path / "a", cache_dir, [good, long, outside, empty],
                               lengths=[3, MAX_TOKENS + 1, 4, 0], offsets=[0, 3, 20, 0], rows=22, width=64)
    assert cache.get(good).shape == (3, 64)
    with pytest.raises(CacheEntryError, match="length 17 outside"):
        cache.get(long)
    with pytest.raises(CacheEntryError, match="rows 20..24 outside the 22 stored"):
        cache.get(outside)
    with pytest.raises(CacheEntryError, match="length 0"):
        cache.get(empty)
    with pytest.raises(CacheEntryError):
        cache.batch([good, outside])
    narrow = _hand_written_part(tmp_path / "b", cache_dir, [good], lengths=[3], offsets=[0], rows=3, width=32)
    with pytest.raises(CacheEntryError, match=r"tokens are \(3, 32\)"):
        narrow.get(good)

    broken = tmp_path / "c"
    broken.mkdir()
    (broken / "part-00000-of-00001.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json")
    with pytest.raises(CacheError, match="unreadable"):
        EmbeddingCache(broken)


def test_cli_embed_and_tiny_t5(shards, t5, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "embed", "--shards", str(shards), "--encoder", str(t5), "--max-tokens", "16",
                 "--out", str(out), "--part", "1", "--parts", "2", "--batch-size", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "part-00001-of-00002.safetensors").is_file()

    def fails(argv, message):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err

    fails(["data", "embed", "--shards", str(tmp_path / "none"), "--encoder", str(t5)], "no manifest")
    fails(["data", "embed", "--shards", str(shards), "--encoder", str(t5), "--part", "2", "--parts", "2"],
          "--part 2 --parts 2")
    fails(["data", "embed", "--shards", str(shards), "--encoder", str(tmp_path / "no-t5")], "does not exist")
    (tmp_path / "empty-t5").mkdir()
    fails(["data", "embed", "--shards", str(shards), "--encoder", str(tmp_path / "empty-t5")],
          "has no config.json")
    fails(["data", "tiny-t5", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "t")], "no manifest")
    fails(["data", "tiny-t5", "--shards", str(shards), "--out", str(tmp_path / "t"), "--heads", "5"],
          "not a multiple of heads")


def test_text_source_uses_the_cache_or_encodes_once_warned(cache_dir, t5, encoder, monkeypatch, tmp_path):
    monkeypatch.setattr(embed, "_WARNED", set())
    calls = []

    def factory():
        calls.append(1)
        return FrozenT5.from_pretrained(t5, max_tokens=MAX_TOKENS)

    expected = EmbeddingCache(cache_dir).batch(UNIQUE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache is there: no warning, no encoder
        cached = TextSource(cache_dir, factory, MAX_TOKENS)
        got = cached(UNIQUE)
    assert not calls and all(torch.equal(a, b) for a, b in zip(got, expected))

    with pytest.warns(EmbeddingCacheWarning) as record:
        source = TextSource(tmp_path / "no-cache", factory, MAX_TOKENS)
        first, second = source(UNIQUE[:3]), source(UNIQUE[3:])
        TextSource(None, factory, MAX_TOKENS)(UNIQUE[:1])
    assert len(record) == 1 and "cascade data embed" in str(record[0].message)
    assert len(calls) == 2  # one encoder per source, built on first need
    assert torch.equal(torch.cat([first[0], second[0]]), expected[0])  # rounded through float16 like the cache
    assert torch.equal(torch.cat([first[1], second[1]]), expected[1])

    with pytest.warns(EmbeddingCacheWarning, match="1 of 2 captions are not in the cache"):
        emb, mask = cached(["a caption nobody wrote", UNIQUE[0]])
    assert torch.equal(emb[1], expected[0][0]) and mask[0].any()

    # what the loader's workers get: a picklable source, its encoder built from a picklable factory
    source = pickle.loads(pickle.dumps(TextSource(tmp_path / "no-cache", encoder_factory(t5, MAX_TOKENS),
                                                  MAX_TOKENS)))
    emb, mask = source([UNIQUE[1]])
    assert emb.shape == (1, MAX_TOKENS, 64) and torch.equal(emb[0], expected[0][1])

    with pytest.raises(CacheError, match="max_tokens 16"):
        TextSource(cache_dir, factory, 32)(UNIQUE)
    with pytest.raises(CacheError, match="another text encoder"):
        TextSource(cache_dir, factory, MAX_TOKENS, fingerprint="0" * 32)(UNIQUE)
