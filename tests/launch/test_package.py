"""The launch package's layout: imports point one way (slurm -> graph -> requeue), the packaged template and recipes
are the repository's files, and a built-in recipe reaches the SLURM scripts as the packaged file's absolute path."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import cascade
from cascade.cli import main
from cascade.launch import slurm
from cascade.recipe.builtin import builtin_recipes

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(cascade.__file__).parent


@pytest.mark.parametrize("module, not_loaded", [
    ("cascade.launch.requeue", ["cascade.launch.graph", "cascade.launch.slurm"]),
    ("cascade.launch.graph", ["cascade.launch.slurm"]),
])
def test_imports_point_one_way(module, not_loaded):
    code = f"import sys, {module}; print([m for m in {not_loaded!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_packaged_template_and_recipes_are_the_repository_files():
    assert slurm.TEMPLATE == PACKAGE / "launch" / "job.sbatch"
    assert slurm.TEMPLATE.read_bytes() == (ROOT / "slurm" / "job.sbatch").read_bytes()
    assert (PACKAGE / "recipes").resolve() == (ROOT / "recipes").resolve()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cascade"]
    packaged = {p for pattern in data for p in PACKAGE.glob(pattern)}
    assert slurm.TEMPLATE in packaged and set(builtin_recipes().values()) <= packaged
    assert PACKAGE / "recipes" / "recipe.schema.json" in packaged


def test_dry_run_from_another_folder_uses_the_packaged_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    assert main(["slurm", "submit", "recipes/imagen-video.yaml", "--dry-run", "--stages", "base"]) == 0
    out = capsys.readouterr().out
    packaged = str(builtin_recipes()["imagen-video"].resolve())
    lines = [shlex.split(line.removesuffix(" &")) for line in out.splitlines() if line.startswith("srun ")]
    assert len(lines) == 4  # data, embed, train/base, distill/base
    assert all(argv[argv.index("step") + 1] == packaged for argv in lines)
    assert f"#SBATCH --chdir={Path.cwd()}" in out and not (tmp_path / "runs").exists()
