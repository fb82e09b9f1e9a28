"""Every stage of recipes/tiny.yaml loads its own clips from the same synthetic shards."""

from pathlib import Path

import pytest
import torch

from cascade.data.synthetic import write_synthetic
from cascade.recipe import load_recipe
from cascade.recipe.build import build_stage_loader

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic(folder, count=8, seed=0, images=4, width=64, height=64, fps=16.0, seconds=2.0,
                    samples_per_shard=5)
    return load_recipe(TINY, [f"data.root={folder}", "data.num_workers=0"])


@pytest.mark.parametrize("name", ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"])
def test_stage_batch_shapes(recipe, name):
    stage = recipe.stage(name)
    batch = next(iter(build_stage_loader(stage, recipe)))
    crop = stage.train.crop
    width, height = (crop.width, crop.height) if crop else (stage.width, stage.height)
    frames = stage.train.crop_frames or stage.frames  # frame windows (SR stages with temporal convolutions)
    assert batch["video"].shape == (stage.train.batch_size, 3, frames, height, width)
    assert batch["video"].dtype == torch.uint8
    if stage.input:
        source = recipe.stage(stage.input)
        fx, fy = stage.width // source.width, stage.height // source.height
        ft = stage.frames // source.frames
        assert batch["cond"].shape == (stage.train.batch_size, 3, frames // ft, height // fy, width // fx)
    assert all(c.startswith("a ") for c in batch["captions"])


def test_recipe_decode_cache_reaches_the_loader_and_keeps_its_batches(recipe):
    """`data.decode_cache_mb` (512 in the tiny recipe) sizes each worker's cache; with it, two epochs of the largest
    stage give the same batches as with 0 (decode every time)."""
    stage = recipe.stage("ssr3")
    cached = build_stage_loader(stage, recipe)
    assert recipe.data.decode_cache_mb == 512 and cached.dataset.config.decode_cache_bytes == 512 * 2**20
    plain_recipe = recipe.model_copy(deep=True)
    plain_recipe.data.decode_cache_mb = 0
    plain = build_stage_loader(plain_recipe.stage("ssr3"), plain_recipe)
    assert plain.dataset.config.decode_cache_bytes == 0
    for a, b in zip([b for _, b in zip(range(4), plain)], [b for _, b in zip(range(4), cached)], strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["video"], b["video"]) and torch.equal(a["cond"], b["cond"])


def test_base_stage_mixes_stills(recipe):
    """A stage with image_fraction > 0 trains on a share of stills (joint image-video training); stages with 0 (the
    tiny recipe's SR stages, and its base, which spends its budget on videos) on videos only."""
    mixed = recipe.model_copy(deep=True)
    mixed.stage("base").train.image_fraction = 0.25
    stills = sum(int(b["is_image"].sum()) for _, b in zip(range(6), build_stage_loader(mixed.stage("base"), mixed)))
    assert stills > 0
    videos_only = [b for _, b in zip(range(3), build_stage_loader(recipe.stage("tsr1"), recipe))]
    assert not any(b["is_image"].any() for b in videos_only)


@pytest.fixture(scope="module")
def with_text(recipe, tmp_path_factory):
    """The tiny T5 trained on the dataset's captions, and the dataset's embedding cache, through the CLI."""
    from cascade.cli import main

    folder = Path(recipe.data.root)
    t5 = tmp_path_factory.mktemp("t5") / "t5"
    assert main(["data", "tiny-t5", "--shards", str(folder), "--out", str(t5)]) == 0
    assert main(["data", "embed", "--shards", str(folder), "--encoder", str(t5), "--max-tokens",
                 str(recipe.text_encoder.max_tokens)]) == 0
    return load_recipe(TINY, [f"data.root={folder}", "data.num_workers=0", f"text_encoder.path={t5}"])


def first_epoch(recipe, name, **overrides):
    from cascade.recipe.build import build_text_source

    loader = build_stage_loader(recipe.stage(name), recipe, text_source=build_text_source(recipe), epochs=1)
    return list(loader), loader


def test_batches_carry_cached_embeddings_equal_to_on_the_fly(with_text, tmp_path):
    cached, _ = first_epoch(with_text, "base")
    assert cached[0]["text"].shape[:2] == cached[0]["text_mask"].shape
    elsewhere = load_recipe(TINY, [f"data.root={with_text.data.root}", "data.num_workers=0",
                                   f"text_encoder.path={with_text.text_encoder.path}",
                                   f"data.embeddings={tmp_path / 'no-cache'}"])
    with pytest.warns(UserWarning, match="cache"):
        fresh, _ = first_epoch(elsewhere, "base")
    assert [b["keys"] for b in cached] == [b["keys"] for b in fresh]
    for a, b in zip(cached, fresh):
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["text_mask"], b["text_mask"])


def test_a_wrong_size_cached_embedding_is_one_bad_sample(with_text, tmp_path):
    import json
    import shutil
    import tarfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from cascade.data.shards import caption_key

    captions = []
    for shard in json.loads((Path(with_text.data.root) / "manifest.json").read_text())["shards"]:
        with tarfile.open(Path(with_text.data.root) / shard["path"]) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    video_captions = [c for c in captions if "moving" in c]
    cache = tmp_path / "cache"
    shutil.copytree(Path(with_text.data.root) / "embeddings", cache)
    part = next(cache.glob("part-*.safetensors"))
    with safe_open(part, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    keys = [bytes(k.tolist()).hex() for k in tensors["keys"]]
    entry = keys.index(caption_key(video_captions[0]))
    tensors["lengths"][entry] = with_text.text_encoder.max_tokens + 1  # a length the encoder cannot produce
    save_file(tensors, part, metadata=meta)
    videos_with_it = video_captions.count(video_captions[0])
    recipe = load_recipe(TINY, [f"data.root={with_text.data.root}", "data.num_workers=0",
                                f"text_encoder.path={with_text.text_encoder.path}", f"data.embeddings={cache}",
                                "stages.tsr1.train.batch_size=1",
                                "data.max_bad_fraction=0.5"])  # a handful of videos: 1 bad is over 1%
    batches, loader = first_epoch(recipe, "tsr1")  # tsr1 uses videos only
    assert videos_with_it >= 1 and loader.total_bad.get("bad_embedding", 0) == videos_with_it
    assert len(batches) == len(video_captions) - videos_with_it


def _train_stderr(capsys, recipe_overrides: list[str], run_dir) -> tuple[int, str]:
    from cascade.cli import main

    capsys.readouterr()
    code = main(["train", str(TINY), "--stage", "base", f"run_dir={run_dir}", "stages.base.train.max_steps=2",
                 "data.num_workers=1", *recipe_overrides])
    return code, capsys.readouterr().err


def test_train_with_a_cache_for_another_max_tokens_is_one_line(with_text, tmp_path, capsys):
    """`cascade train` whose cache was built for another max_tokens: exit 2 and one line naming the part file, both
    values and the rebuild command, raised from the DataLoader worker without its traceback."""
    wanted = with_text.text_encoder.max_tokens + 8
    code, err = _train_stderr(capsys, [f"data.root={with_text.data.root}",
                                       f"text_encoder.path={with_text.text_encoder.path}",
                                       f"text_encoder.max_tokens={wanted}"], tmp_path / "run")
    part = Path(with_text.data.root) / "embeddings" / "part-00000-of-00001.safetensors"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: {part}: embedding cache built with max_tokens "
                               f"{with_text.text_encoder.max_tokens}, but text_encoder.max_tokens is {wanted}"), err
    assert f"--max-tokens {wanted} --out {part.parent}`" in lines[0]


def test_train_on_mostly_bad_data_stops_with_one_line(with_text, tmp_path, capsys):
    """A short `cascade train` on 62% bad data (20 samples without a caption added to 12 good ones) stops with exit
    1 and the budget's line, not after 1,000 samples and not with a DataLoader worker traceback."""
    import json
    import shutil

    from cascade.data.shards import ShardSink

    folder = shutil.copytree(with_text.data.root, tmp_path / "data")
    with ShardSink(tmp_path / "bad", samples_per_shard=20) as sink:
        for i in range(20):
            sink.write_sample({"__key__": f"bad{i:03d}", "mp4": b"\0" * 16})
    shutil.move(tmp_path / "bad" / "shard-000000.tar", folder / "shard-bad.tar")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"].append(dict(path="shard-bad.tar", samples=20))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, err = _train_stderr(capsys, [f"data.root={folder}", f"text_encoder.path={with_text.text_encoder.path}",
                                       "data.max_bad_fraction=0.5"], tmp_path / "run")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: stage base stopped: {folder}: ") and "data.max_bad_fraction 50.0%" in lines[0]
    assert "counts by reason: missing_caption " in lines[0], lines[0]
