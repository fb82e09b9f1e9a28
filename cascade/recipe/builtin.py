"""The recipes that ship inside the package (`cascade recipes`): where they are, what each is, finding one by name.

They are package data: `cascade/recipes` links to the repository's `recipes/`, and a wheel holds them as files, so
`cascade validate tiny` or `cascade slurm submit recipes/imagen-video.yaml` work from any folder after any install.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import cascade

__all__ = ["builtin_recipes", "describe", "recipes_folder", "resolve_recipe_path"]


def recipes_folder() -> Path:
    """The packaged recipes folder (`cascade/recipes`: the repository's recipes/ in a checkout)."""
    return Path(cascade.__file__).parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """{name: packaged file} of every built-in recipe, by file name: {"imagen-video": .../imagen-video.yaml, ...}."""
    return {path.stem: path for path in sorted(recipes_folder().glob("*.yaml"))}


def describe(path: Path) -> str:
    """A recipe's one-line description: the first sentence of its leading comment, parentheses left out."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("yaml-language-server:"):
            lines.append(text)
    text = " ".join(lines)
    while (shorter := re.sub(r"\s*\([^()]*\)", "", text)) != text:  # innermost first: nested parentheses too
        text = shorter
    sentence = re.match(r"(.+?\.)(?=\s+[A-Z]|$)", text)
    return sentence.group(1) if sentence else text


def resolve_recipe_path(path: str | Path) -> Path:
    """`path` when it exists; else the built-in recipe its file name names, with or without `.yaml` (`tiny`,
    `recipes/tiny.yaml` from any folder). Raises FileNotFoundError naming the built-in recipes otherwise."""
    path = Path(path)
    if path.exists():
        return path
    name = path.name.removesuffix(".yaml")
    recipes = builtin_recipes()
    if name in recipes:
        if str(path) != name:  # written as a file path: say which file is read instead
            print(f"note: {path} does not exist; using the built-in recipe {name} ({recipes[name]})", file=sys.stderr)
        return recipes[name]
    raise FileNotFoundError(f"no such file, and {name!r} is not a built-in recipe (built-in: {', '.join(recipes)}; "
                            f"`cascade recipes` lists them)")
