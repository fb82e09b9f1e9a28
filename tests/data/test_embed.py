"""The tiny T5 (sentencepiece tokenizer trained on a dataset's captions) and the T5 embedding cache."""

import functools
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

    fails(["data", "embed", "--shards", str(tmp_path / "none"), "--encoder", str(t5)], "not a dataset")
    fails(["data", "embed", "--shards", str(shards), "--encoder", str(t5), "--part", "2", "--parts", "2"],
          "--part 2 --parts 2")
    fails(["data", "embed", "--shards", str(shards), "--encoder", str(tmp_path / "no-t5")], "does not exist")
    (tmp_path / "empty-t5").mkdir()
    fails(["data", "embed", "--shards", str(shards), "--encoder", str(tmp_path / "empty-t5")],
          "has no config.json")
    fails(["data", "tiny-t5", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "t")], "not a dataset")
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


# --- damaged shards, unsafe member names, a cache for another max_tokens, what tokenization loses, --tokenizer


def _copy_dataset(shards, folder):
    return shutil.copytree(shards, folder, ignore=shutil.ignore_patterns("embeddings"))


def warnings_of(err: str) -> list[str]:
    """The warning lines of stderr (transformers and tqdm write progress bars there too)."""
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_embed_reads_the_complete_samples_of_a_truncated_shard_and_names_it(shards, t5, tmp_path, capsys):
    """A cut tar is a warning naming the shard (its complete samples' captions are embedded, as the loader reads
    them), not a tarfile.ReadError traceback."""
    import tarfile

    dataset = _copy_dataset(shards, tmp_path / "cut")
    shard = dataset / "shard-000001.tar"  # CAPTIONS[2] and CAPTIONS[3]
    with tarfile.open(shard) as tar:
        second = next(m.offset for m in tar if m.name.startswith("000003."))
    shard.write_bytes(shard.read_bytes()[:second + 100])  # the second sample's first header, cut
    (dataset / "shard-000002.tar").write_bytes(b"not a tar at all")  # CAPTIONS[4] and CAPTIONS[5]
    capsys.readouterr()
    assert main(["data", "embed", "--shards", str(dataset), "--encoder", str(t5), "--max-tokens", str(MAX_TOKENS),
                 "--out", str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "ReadError" not in out + err
    lines = warnings_of(err)
    assert len(lines) == 3, err  # the two shards, then the truncation note (LONG)
    assert lines[0].startswith("warning: shard-000001.tar: truncated or corrupt tar (") and \
        lines[0].endswith("read the captions of its 1 complete samples"), lines[0]
    assert lines[1].startswith("warning: shard-000002.tar: unreadable tar (") and "its 0 complete" in lines[1]
    cache = EmbeddingCache(tmp_path / "cache")
    read = CAPTIONS[:3] + CAPTIONS[6:]
    assert {c for c in UNIQUE if c in cache} == set(read) and len(cache) == len(set(read))
    assert " samples (skipped: damaged_shard 2), " in out, out


def test_embed_skips_and_counts_unsafe_member_names(shards, t5, tmp_path, capsys):
    import io
    import json
    import tarfile

    dataset = _copy_dataset(shards, tmp_path / "evil")
    with tarfile.open(dataset / "shard-000009.tar", "w") as tar:
        for name, caption in [("../../evil", "climbs out"), ("/etc/evil", "absolute"), ("ok", "a safe caption")]:
            for ext, data in (("png", b"\0" * 16), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"].append(dict(path="shard-000009.tar", samples=3))
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["data", "embed", "--shards", str(dataset), "--encoder", str(t5), "--max-tokens", str(MAX_TOKENS),
                 "--out", str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert " samples (skipped: unsafe_member_name 2), " in out, out
    assert "warning: shard-000009.tar: left out 2 samples (unsafe_member_name 2; first: '../../evil.png')" in err
    cache = EmbeddingCache(tmp_path / "cache")
    assert "a safe caption" in cache and "climbs out" not in cache and "absolute" not in cache


def test_a_cache_built_for_another_max_tokens_is_one_line(shards, cache_dir, t5, tmp_path):
    """In the loader (DataLoader workers included) and at the command line: the part file, both max_tokens and
    the command that rebuilds it, in one line raised in the main process."""
    from cascade.data.clips import ClipSpec
    from cascade.data.loader import LoaderConfig, StageDataset, StageLoader
    from cascade.errors import UserError

    source = functools.partial(TextSource, cache_dir, encoder_factory(t5, 32), 32)
    dataset = StageDataset(shards, ClipSpec(frames=1, width=8, height=8, fps=8), LoaderConfig(batch_size=1),
                           text_source=source)
    with pytest.raises(CacheError) as caught:
        next(iter(StageLoader(dataset, num_workers=2)))
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and caught.value.code == 2
    assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    assert message == (f"{cache_dir / 'part-00000-of-00001.safetensors'}: embedding cache built with max_tokens "
                       f"{MAX_TOKENS}, but text_encoder.max_tokens is 32 (truncation changes every embedding); "
                       f"rebuild it: `cascade data embed --shards {shards} --encoder {t5} --max-tokens 32 --out "
                       f"{cache_dir}`")
    with pytest.raises(CacheError, match="but asked for 8"):
        EmbeddingCache(cache_dir).batch(["hi"], max_tokens=8)


@pytest.fixture(scope="module")
def ascii_spiece(tmp_path_factory):
    """A sentencepiece model trained on lowercase ASCII captions only: other characters are unknown to it."""
    path = tmp_path_factory.mktemp("spm") / "ascii.model"
    training = ["a red circle moving left", "a blue square moving up on a white background",
                "the green triangle bounces", "cats and dogs run quickly over the lazy fox"] * 3
    path.write_bytes(train_sentencepiece(training, vocab_size=64, seed=0))
    return path, {ch for c in training for ch in c if not ch.isspace()}


def test_tiny_t5_takes_an_existing_tokenizer(ascii_spiece, t5, tmp_path, capsys):
    from transformers import AutoTokenizer, T5Tokenizer

    model, _ = ascii_spiece
    texts = ["a red circle moving left", "un chat — 猫", "zebras graze at dawn", LONG]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model, bare / "spiece.model")
    given = T5Tokenizer.from_pretrained(bare)
    assert main(["data", "tiny-t5", "--tokenizer", str(model), "--out", str(tmp_path / "a"), "--dim", "32",
                 "--heads", "2"]) == 0
    assert f"tokenizer {model}" in capsys.readouterr().out
    built = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    assert built(texts).input_ids == given(texts).input_ids
    encoder = FrozenT5.from_pretrained(tmp_path / "a", max_tokens=8)
    assert encoder.dim == 32 and encoder.encoder.config.vocab_size == len(given)
    assert encoder.encode(texts)[0].shape == (len(texts), 8, 32)

    # a folder (the tiny T5 trained on the test captions): its tokenizer, not one trained anew
    assert main(["data", "tiny-t5", "--tokenizer", str(t5), "--out", str(tmp_path / "b")]) == 0
    original = AutoTokenizer.from_pretrained(t5, local_files_only=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "b", local_files_only=True)(texts).input_ids == \
        original(texts).input_ids

    def fails(argv, message):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err

    (tmp_path / "junk.model").write_bytes(b"\x00not a model")
    fails(["data", "tiny-t5", "--tokenizer", str(tmp_path / "junk.model"), "--out", str(tmp_path / "c")],
          "junk.model: not a sentencepiece model")
    fails(["data", "tiny-t5", "--tokenizer", str(model), "--vocab-size", "99", "--out", str(tmp_path / "c")],
          "--vocab-size sizes a tokenizer trained on --shards")
    fails(["data", "tiny-t5", "--out", str(tmp_path / "c")], "give --shards")


def test_embed_counts_truncated_captions_and_unknown_characters(ascii_spiece, tmp_path, capsys):
    from transformers import AutoTokenizer

    model, known = ascii_spiece
    captions = ["a red circle moving left", "un cercle rouge à gauche", "cats 猫 and dogs 犬 and more 猫",
                "naïve café circle", "a red circle", LONG, LONG + " and more", "a red circle", "le chat 猫"]
    dataset = tmp_path / "d"
    with ShardSink(dataset, samples_per_shard=3) as sink:
        for i, caption in enumerate(captions):
            sink.write(f"{i:04d}", b"\0" * 16, "png", caption, dict(kind="image", fps=0, frames=1, duration=0))
    assert main(["data", "tiny-t5", "--tokenizer", str(model), "--shards", str(dataset), "--out",
                 str(tmp_path / "t5")]) == 0
    unique = list(dict.fromkeys(captions))
    unknown = [c for c in unique if set(c) - known - {" "}]
    assert f"warning: {len(unknown)} of {len(unique)} captions of {dataset} hold characters the tokenizer does " \
        f"not know: '猫' in 2, 'à' in 1, '犬' in 1, 'ï' in 1, 'é' in 1" in capsys.readouterr().err

    max_tokens = 8
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t5", local_files_only=True)
    full = [len(tokenizer(c, verbose=False).input_ids) for c in unique]
    cut = sum(n > max_tokens for n in full)
    assert main(["data", "embed", "--shards", str(dataset), "--encoder", str(tmp_path / "t5"), "--max-tokens",
                 str(max_tokens), "--out", str(tmp_path / "cache")]) == 0
    err = warnings_of(capsys.readouterr().err)
    assert len(err) == 2 and 0 < cut < len(unique) and len(unknown) == 4
    assert err[0] == (f"warning: {cut} of {len(unique)} captions are longer than --max-tokens {max_tokens} and were "
                      f"cut (the longest has {max(full)} tokens); a larger text_encoder.max_tokens (and "
                      f"--max-tokens) keeps them whole")
    assert err[1] == (f"warning: {len(unknown)} of {len(unique)} captions hold characters the tokenizer does not "
                      f"know (encoded as its unknown token): '猫' in 2, 'à' in 1, '犬' in 1, 'ï' in 1, 'é' in 1; "
                      f"a tokenizer trained on these captions (`cascade data tiny-t5`) would know them")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cache" / "part-00000-of-00001.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (int(meta["truncated"]), int(meta["longest_tokens"]), int(meta["unknown_captions"])) == \
        (cut, max(full), len(unknown))
