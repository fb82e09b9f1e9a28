"""The command line a new user meets: --version, a help text and the default for every argument, the resolved
recipe (`cascade validate --print`), export's suffix checked before any work."""

import argparse
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import cascade
from cascade.cli import build_parser, main
from cascade.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("cascade",)):
    """(command path, action) of every argument of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        else:
            yield path, action


def test_version_prints_the_package_and_torch_versions(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"cascade {cascade.__version__}" in out and f"torch {version('torch')}" in out
    assert torch.__version__ in out


def test_every_argument_of_every_command_has_a_help_text():
    """Walks the whole parser, so a new argument without help fails here."""
    actions = list(_walk(build_parser()))
    assert len({path for path, _ in actions}) > 20  # every subcommand was reached (data, slurm, recipes included)
    missing = [f"{' '.join(path)} {action.dest}" for path, action in actions if not (action.help or "").strip()]
    assert not missing, f"arguments without help: {missing}"


def test_help_shows_the_defaults(capsys):
    formatter = build_parser().formatter_class
    shown = []
    for path, action in _walk(build_parser()):
        text = formatter("cascade")._get_help_string(action)
        if not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) and action.default != []:
            shown.append(f"{' '.join(path)} {action.dest}")
            assert "default" in text, f"{' '.join(path)} {action.dest}: default {action.default!r} not shown"
    assert "cascade sample seed" in shown and "cascade eval seed" in shown
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0)" in help_text and "--batch-size BATCH_SIZE prompts sampled together" in help_text
    assert "(default: float32)" in help_text and "default: None" not in help_text


def test_validate_print_is_the_resolved_recipe_and_validates_back(tmp_path, capsys):
    """The printed recipe has the parent (extends) and the overrides merged in, and `cascade validate` reads it
    back into the same recipe."""
    child = tmp_path / "mine.yaml"
    child.write_text(f"extends: {TINY}\nname: mine\neval: {{num_videos: 6}}\n")
    overrides = ["stages.base.train.lr=3e-4", "stages.tsr1.sampler.steps=12"]
    assert main(["validate", str(child), *overrides, "--print"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# mine: resolved from") and "extends" not in printed.split("\n", 1)[1]
    copy = tmp_path / "resolved.yaml"
    copy.write_text(printed)
    assert main(["validate", str(copy)]) == 0
    assert "7 stages" in capsys.readouterr().out
    original, again = load_recipe(child, overrides), load_recipe(copy)
    assert again.extends is None
    assert again.model_dump(exclude={"extends"}) == original.model_dump(exclude={"extends"})
    assert again.stage("base").train.lr == 3e-4 and again.stage("tsr1").sampler.steps == 12
    assert again.eval.num_videos == 6 and again.name == "mine"


def test_export_refuses_a_suffix_other_than_safetensors_before_any_work(tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"  # not even there: the suffix is checked first
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "base.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "base.safetensors" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "base.pt").exists()
