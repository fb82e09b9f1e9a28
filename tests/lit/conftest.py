"""A prepared tiny dataset for training tests: synthetic shards, a tiny T5 trained on their captions, and the
embedding cache, built once per session through the CLI."""

from pathlib import Path

import pytest

from cascade.cli import main

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prepared")
    data, t5 = root / "data", root / "t5"
    assert main(["data", "synth", "--out", str(data), "--count", "48", "--images", "12", "--seed", "0",
                 "--width", "64", "--height", "64", "--fps", "16", "--seconds", "2"]) == 0
    assert main(["data", "tiny-t5", "--shards", str(data), "--out", str(t5)]) == 0
    assert main(["data", "embed", "--shards", str(data), "--encoder", str(t5), "--max-tokens", "16"]) == 0
    return dict(data=data, t5=t5)


@pytest.fixture
def overrides(prepared, tmp_path) -> list[str]:
    """Overrides that point tiny.yaml at the prepared data and a fresh run folder, with fast logging."""
    return [f"data.root={prepared['data']}", f"text_encoder.path={prepared['t5']}", f"run_dir={tmp_path / 'runs'}",
            "data.num_workers=0", "logging.every_n_steps=1", "logging.sample_every=null"]
