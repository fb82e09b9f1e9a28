"""Built-in recipes: the packaged files, their descriptions, finding one by name from any folder, `cascade recipes`
and `cascade recipes cp` (and their errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.cli import main
from cascade.recipe import RecipeError, load_recipe
from cascade.recipe.builtin import builtin_recipes, describe, recipes_folder, resolve_recipe_path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_every_shipped_recipe_is_built_in_and_packaged():
    recipes = builtin_recipes()
    assert list(recipes) == SHIPPED and {"tiny", "imagen-video"} <= set(recipes)
    for name, path in recipes.items():
        assert path.parent == recipes_folder() and path.name == f"{name}.yaml"
        assert path.read_bytes() == (ROOT / "recipes" / f"{name}.yaml").read_bytes()
    assert (recipes_folder() / "recipe.schema.json").is_file()


@pytest.mark.parametrize("name", SHIPPED)
def test_description_is_one_sentence_of_the_leading_comment(name):
    text = describe(builtin_recipes()[name])
    assert text and "\n" not in text and text.endswith(".") and "(" not in text and "yaml-language-server" not in text
    assert len(text) < 120, text


def test_description_drops_parentheses_and_stops_at_the_first_sentence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# yaml-language-server: $schema=./recipe.schema.json\n# A cascade (Ho et al. 2022) for a\n"
                    "# test (see (nested) notes), e.g. 2.5 s. Second sentence.\n# More.\nname: r\n# not this\n")
    assert describe(path) == "A cascade for a test, e.g. 2.5 s."
    path.write_text("name: r\n")
    assert describe(path) == ""


def test_resolve_prefers_an_existing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "recipes" / "tiny.yaml"
    mine.parent.mkdir()
    mine.write_text("name: mine\n")
    assert resolve_recipe_path("recipes/tiny.yaml") == Path("recipes/tiny.yaml")
    assert resolve_recipe_path(mine) == mine


@pytest.mark.parametrize("given", ["tiny", "tiny.yaml", "recipes/tiny.yaml", "elsewhere/tiny.yaml"])
def test_resolve_falls_back_to_the_built_in_recipe_by_file_name(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    assert resolve_recipe_path(given) == builtin_recipes()["tiny"]
    assert load_recipe(given).name == "tiny"


def test_neither_a_file_nor_a_built_in_name_is_a_recipe_error_naming_both(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = ", ".join(SHIPPED)
    with pytest.raises(FileNotFoundError, match=rf"'tinny' is not a built-in recipe \(built-in: {names};"):
        resolve_recipe_path("recipes/tinny.yaml")
    with pytest.raises(RecipeError) as error:
        load_recipe("recipes/tinny.yaml")
    message = str(error.value)
    assert message.startswith("recipes/tinny.yaml: cannot read the recipe: no such file") and "\n" not in message
    assert f"built-in: {names};" in message
    assert main(["validate", "recipes/tinny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipes/tinny.yaml: ") and err.count("\n") == 1 and "tiny" in err


def test_validate_a_built_in_recipe_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "tiny"]) == 0
    assert "tiny: tiny, 7 stages" in capsys.readouterr().out


def test_recipes_lists_one_line_per_built_in_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert "7 stages -> 32x64x64@16" in tiny and describe(builtin_recipes()["tiny"]) in tiny
    imagen = next(line for line in lines if line.startswith("imagen-video "))
    assert "7 stages -> 128x1280x768@24" in imagen and "Imagen Video" in imagen


def test_recipes_cp_copies_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "cp", "tiny", "my.yaml"]) == 0
    assert Path("my.yaml").read_bytes() == builtin_recipes()["tiny"].read_bytes()
    assert "wrote my.yaml" in capsys.readouterr().out
    assert main(["validate", "my.yaml", "name=mine"]) == 0
    capsys.readouterr()

    Path("my.yaml").write_text("name: edited\n")
    assert main(["recipes", "cp", "tiny", "my.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: my.yaml exists; pass --force to overwrite it\n"
    assert Path("my.yaml").read_text() == "name: edited\n"  # untouched
    assert main(["recipes", "cp", "imagen-video.yaml", "my.yaml", "--force"]) == 0
    assert Path("my.yaml").read_bytes() == builtin_recipes()["imagen-video"].read_bytes()

    Path("mine").mkdir()
    assert main(["recipes", "cp", "tiny", "mine"]) == 0  # a folder: FOLDER/NAME.yaml
    assert Path("mine/tiny.yaml").is_file()
    assert main(["recipes", "cp", "tiny", "new/sub/t.yaml"]) == 0  # missing folders are made
    assert Path("new/sub/t.yaml").is_file()


def test_recipes_cp_of_an_unknown_name_exits_2_naming_the_built_in_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["recipes", "cp", "tinny", "my.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: no built-in recipe 'tinny'; built-in recipes: {', '.join(SHIPPED)}\n"
    assert not Path("my.yaml").exists()
