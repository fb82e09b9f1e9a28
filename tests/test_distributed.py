"""`cascade.distributed` on real gloo ranks (CPU): who is who, shares of a run, and the collectives `cascade sample`
and `cascade eval` use, with a rank that has nothing to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade import distributed
from cascade.distributed import Ranks, launched, resolve_device, share
from cascade.eval.stats import FeatureStats


def test_launched_reads_torchrun_then_srun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launched() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert launched() == (0, 1, 0)  # the batch script of an allocation, not an srun step
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launched() == (3, 8, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched() == (1, 2, 1)


def test_shares_cover_the_run_in_order_rank_zero_first():
    for n in range(0, 9):
        for world in (1, 2, 3, 5):
            parts = [share(list(range(n)), Ranks(r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert len(parts[0]) == max(len(p) for p in parts)


def test_device_errors_are_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


WORKER = """
import pickle, sys
import numpy as np, torch
from cascade import distributed
from cascade.eval.stats import FeatureStats

torch.set_num_threads(1)
features, bounds, out = np.load(sys.argv[1]), [(0, 7), (7, 7), (7, 11)], sys.argv[2]
ranks = distributed.init("cpu")
a, b = bounds[ranks.rank]
stats = FeatureStats()
for first in range(a, b, 3):  # rank 1 has no features (and then no dimension either)
    stats.update(features[first:min(first + 3, b)])
stats.all_reduce()
total = distributed.all_reduce_sum(torch.tensor([b - a, 1.5]), ranks)
largest = distributed.all_reduce_max(torch.tensor([b - a]), ranks)
gathered = distributed.gather(dict(rank=ranks.rank, items=list(range(a, b))), ranks)
distributed.barrier(ranks)
with open(f"{out}/{ranks.rank}.pkl", "wb") as f:
    pickle.dump((ranks.world, stats.count, stats.mean, stats.covariance, total.tolist(), largest.item(), gathered), f)
"""


def test_three_gloo_ranks_merge_statistics_like_one_process(tmp_path):
    """Three torchrun ranks, one without features: FeatureStats.all_reduce (float64 sums) gives the one-process
    statistics; sums, maxima, a gather to rank 0 and a barrier do not hang."""
    import pickle
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    features = rng.standard_normal((11, 6)) * [1, 10, 100, 1, 0.1, 3] + 50
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    done = subprocess.run([*torchrun, str(tmp_path / "worker.py"), str(tmp_path / "features.npy"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    one = FeatureStats().update(features)
    for rank in range(3):
        world, count, mean, cov, total, largest, gathered = pickle.loads((tmp_path / f"{rank}.pkl").read_bytes())
        assert world == 3 and count == 11
        assert np.abs(mean - one.mean).max() <= 1e-12 * np.abs(one.mean).max()
        assert np.abs(cov - one.covariance).max() <= 1e-12 * np.abs(one.covariance).max()
        assert total == [11.0, 4.5] and largest == 7.0
        if rank == 0:
            assert [g["items"] for g in gathered] == [list(range(7)), [], list(range(7, 11))]
        else:
            assert gathered is None


def test_slurm_eval_node_asks_for_the_gpus_its_ranks_use(tmp_path):
    """One task (rank) per GPU of the last stage's node; `srun` starts them, `cascade.distributed` joins them."""
    from pathlib import Path

    from cascade.launch.graph import job_graph
    from cascade.launch.slurm import resources
    from cascade.recipe import load_recipe

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    recipe = load_recipe(recipes / "imagen-video.yaml", [f"run_dir={tmp_path}"])
    nodes = {n.name: n for n in job_graph(recipe)}
    res = resources(recipe, nodes["eval/distilled"])
    gpus = recipe.stages[-1].launch.gpus_per_node
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == (1, gpus, gpus)
    cpu = load_recipe(recipes / "tiny.yaml", [f"run_dir={tmp_path}", "stages.ssr3.launch.accelerator=cpu",
                                                   "stages.base.launch.accelerator=cpu"])
    res = resources(cpu, {n.name: n for n in job_graph(cpu)}["eval/teachers"])
    assert (res.tasks_per_node, res.gpus_per_node) == (1, 0)
