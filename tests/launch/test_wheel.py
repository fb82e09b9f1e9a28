"""A wheel of the repository in a fresh virtual environment outside the checkout: the built-in recipes and the sbatch
template ship inside it, and `cascade recipes`, `cascade recipes cp`, `cascade demo` and `cascade slurm submit
recipes/imagen-video.yaml --dry-run` work from a folder that holds no recipes (as after `pip install cascade`).
About 25 s on two cores, half of it `cascade demo`: part of the default run (mark it slow past a minute)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "cascade", "recipes", "slurm"]  # what the wheel is built from


def _run(argv: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(map(str, argv))} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel installed into tmp/venv, which sees this environment's dependencies through a .pth line (the
    editable install of cascade here is a finder that such a line does not run). -> paths and the environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: the build writes build/ and egg-info into its source folder
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
          source], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("cascade-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # Install first: with this environment visible, pip would find the editable cascade already installed.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).stdout.strip())
    here = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "zz-dependencies.pth").write_text("".join(f"{path}\n" for path in here))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    work = tmp / "work"  # outside the checkout, no recipes/ in it
    work.mkdir()
    return dict(python=python, cascade=venv / "bin" / "cascade", site=site, venv=venv, env=env, work=work)


def _cascade(installed: dict, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return _run([installed["cascade"], *argv], cwd=installed["work"], env=installed["env"], timeout=timeout)


def test_cascade_comes_from_the_wheel_with_its_package_data(installed):
    out = _run([installed["python"], "-c", "import cascade, torch; print(cascade.__file__)"], cwd=installed["work"],
               env=installed["env"]).stdout.strip()
    assert Path(out).is_relative_to(installed["venv"]), out
    package = installed["site"] / "cascade"
    for name in ("recipes/tiny.yaml", "recipes/imagen-video.yaml", "recipes/recipe.schema.json", "launch/job.sbatch"):
        assert (package / name).is_file() and not (package / name).is_symlink(), name
    assert (package / "launch" / "job.sbatch").read_bytes() == (ROOT / "slurm" / "job.sbatch").read_bytes()


def test_recipes_list_and_copy(installed):
    lines = _cascade(installed, "recipes").stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    _cascade(installed, "recipes", "cp", "tiny", "my.yaml")
    copy = installed["work"] / "my.yaml"
    assert copy.read_bytes() == (ROOT / "recipes" / "tiny.yaml").read_bytes()
    assert "my.yaml: tiny, 7 stages" in _cascade(installed, "validate", "my.yaml").stdout


def test_slurm_dry_run_references_the_packaged_recipe(installed):
    out = _cascade(installed, "slurm", "submit", "recipes/imagen-video.yaml", "--dry-run").stdout
    packaged = str((installed["site"] / "cascade" / "recipes" / "imagen-video.yaml").resolve())
    steps = [shlex.split(line.removesuffix(" &")) for line in out.splitlines() if line.startswith("srun ")]
    assert len(steps) == 19  # data, embed, 7 x train, 7 x distill, 2 x eval, report
    for argv in steps:
        assert argv[argv.index("step") - 1] == str(installed["cascade"])  # the jobs run this installation
        assert argv[argv.index("step") + 1] == packaged
    assert not (installed["work"] / "runs").exists()


def test_demo(installed):
    out = installed["work"] / "demo"
    _cascade(installed, "demo", "--out", str(out), timeout=600)
    assert (out / "sample_000.mp4").stat().st_size > 0 and (out / "sample.json").stat().st_size > 0
