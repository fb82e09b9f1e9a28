"""`cascade plan`: the fake-tensor prediction of a step's peak memory against a real CPU step, the paper recipe's base
planned without allocating, the table and JSON, and `cascade slurm submit` refusing a stage that does not fit."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cascade.cli import main
from cascade.launch import slurm
from cascade.plan import GIB, fake_step, loss_and_backward, plan_stage, promote_norms, synthetic_batch, with_checkpointing
from cascade.recipe import load_recipe
from cascade.recipe.build import build_unet

ROOT = Path(__file__).resolve().parents[1]
TINY, IMAGEN = ROOT / "recipes" / "tiny.yaml", ROOT / "recipes" / "imagen-video.yaml"


def measured_peak(stage, recipe, batch_size: int, precision: str, checkpointing: bool) -> int:
    """Peak bytes the CPU allocator held during one real forward and backward, above what was allocated before:
    every allocation and free the profiler saw (c10's allocator reports, not the dispatcher the prediction uses)."""
    torch.manual_seed(0)
    net = promote_norms(build_unet(with_checkpointing(stage, checkpointing), recipe))
    net.train()
    batch = synthetic_batch(stage, recipe, batch_size)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_and_backward(net, stage, batch, precision)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = top = 0
    for _, change in events:
        live += change
        top = max(top, live)
    return top


@pytest.mark.parametrize("name, precision, batch_size", [("base", "bf16-mixed", 4), ("tsr1", "bf16-mixed", 4)])
def test_predicted_peak_is_within_15_percent_of_a_real_step(name, precision, batch_size):
    """Tiny base (temporal attention) and tsr1 (a super-resolution input, temporal convolutions) in the paper
    recipe's precision, with and without checkpointing: the fake-tensor peak against the real step's allocator peak.
    (In fp32 with checkpointing tsr1 reads 18 % low: CPU's Conv3d backward allocates a column buffer that is no
    tensor; on a GPU such workspaces fall under the plan's fixed allowance.)"""
    recipe = load_recipe(TINY)
    stage = recipe.stage(name)
    predicted = {}
    for checkpointing in (False, True):
        fake = fake_step(stage, recipe, batch_size, precision, checkpointing)
        real = measured_peak(stage, recipe, batch_size, precision, checkpointing)
        assert abs(fake.step_bytes - real) <= 0.15 * real, (name, checkpointing, fake.step_bytes, real)
        assert fake.activation_bytes <= fake.step_bytes  # the parameters' gradients are left out of activations
        predicted[checkpointing] = fake
    assert predicted[True].activation_bytes < 0.7 * predicted[False].activation_bytes  # checkpointing helps
    assert predicted[True].flops > predicted[False].flops  # and costs a recomputed forward


def test_paper_base_is_planned_without_allocating_and_fits():
    recipe = load_recipe(IMAGEN)
    stage = recipe.stage("base")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row = plan_stage(stage, recipe, gpus_per_node=8, gpu_memory_gib=80)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1024**2, f"planning grew the process by {grown / 1024:.0f} MiB"  # 5.6B fp32 would be 21 GiB
    assert 5.0e9 < row.parameters < 6.2e9 and row.strategy == "fsdp" and row.world == 128
    assert row.fits and row.total_gib < 80
    assert row.weights_gib == pytest.approx(row.parameters * 4 / 128 / GIB)  # sharded over the world
    assert row.activations_gib < row.activations_no_ckpt_gib
    assert row.tflop_per_step > 0 and row.gpu_hours == pytest.approx(
        row.seconds_per_step * stage.train.max_steps * 128 / 3600)


def test_plan_command_table_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(TINY), "--stages", "base,tsr1", "--gpus-per-node", "4", "--json", str(out),
                 "stages.tsr1.launch.strategy=fsdp"]) == 0
    text = capsys.readouterr().out
    assert "base" in text and "tsr1" in text and "fsdp" in text and "GiB per rank of 80 GiB" in text
    rows = json.loads(out.read_text())["stages"]
    assert [r["stage"] for r in rows] == ["base", "tsr1"] and all(r["fits"] and r["world"] == 4 for r in rows)
    assert rows[1]["gathered_gib"] > 0 and rows[0]["gathered_gib"] == 0  # ddp holds nothing gathered
    assert rows[0]["grads_gib"] == pytest.approx(2 * rows[0]["weights_gib"])  # fp32 grads and DDP's bucket copy
    assert main(["plan", str(TINY), "--stages", "base", "--gpu-memory", "1"]) == 1  # 3 GiB of CUDA context alone
    assert "error: stage base does not fit" in capsys.readouterr().out


def test_submit_refuses_a_stage_that_does_not_fit(tmp_path, monkeypatch, capsys):
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}"]
    submitted = []
    monkeypatch.setattr(slurm, "sbatch", lambda script, after: submitted.append(Path(script).stem) or str(len(submitted)))
    monkeypatch.setattr(slurm, "job_state", lambda job_id: None)
    assert main(["slurm", "submit", str(TINY), "--stages", "base", "--gpu-memory", "2", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: stage base does not fit: ")
    assert "GiB short" in err and not submitted
    assert main(["slurm", "submit", str(TINY), "--stages", "base", "--gpu-memory", "2", "--force", *overrides]) == 0
    assert "warning: stage base does not fit" in capsys.readouterr().out and "train-base" in submitted
