"""Where a stage trains: `--device` of train and distill sets the stage's launch.accelerator; on a machine with
CUDA (the `gpu` marker) a stage trains there in bf16, plain and sharded."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from cascade.cli import _stage_of

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def test_device_sets_the_stage_accelerator():
    args = argparse.Namespace(recipe=TINY, overrides=[], stage="tsr1", train_device="cpu")
    recipe, stage = _stage_of(args)
    assert stage.launch.accelerator == "cpu" and recipe.stage("base").launch.accelerator == "auto"
    recipe, stage = _stage_of(argparse.Namespace(recipe=TINY, overrides=[], stage="tsr1", train_device=None))
    assert stage.launch.accelerator == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(capsys):
    from cascade.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", str(TINY), "--stage", "base", "--device", "cuda"])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gpus", [1, 2])
def test_trains_on_cuda_in_bf16(overrides, tmp_path, gpus):
    """Three steps of the tiny base on CUDA under bf16-mixed (two GPUs: sharded); finite losses, a checkpoint."""
    if gpus > torch.cuda.device_count():
        pytest.skip(f"needs {gpus} GPUs")
    import json
    import subprocess
    import sys

    s = "stages.base"
    command = [sys.executable, "-c", "import sys; from cascade.cli import main; sys.exit(main())", "train",
               str(TINY), "--stage", "base", "--device", "cuda", *overrides, f"{s}.train.max_steps=3",
               f"{s}.train.precision=bf16-mixed", f"{s}.launch.gpus_per_node={gpus}",
               f"{s}.launch.strategy={'fsdp' if gpus > 1 else 'ddp'}"]
    # a process of its own: Lightning starts the second rank by running the same command again
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "runs" / "base"
    losses = [json.loads(line)["loss"] for line in (folder / "train_steps.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (folder / "checkpoints" / "last.ckpt").exists()
