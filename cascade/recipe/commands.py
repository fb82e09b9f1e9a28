"""`cascade recipes` (list the built-in recipes) and `cascade recipes cp NAME FILE` (copy one to edit)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cascade.recipe.builtin import builtin_recipes, describe
from cascade.recipe.load import load_recipe

__all__ = ["list_command", "cp_command"]


def list_command(args) -> int:
    """One line per built-in recipe: name, stages (count and final output), description."""
    recipes = builtin_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        recipe = load_recipe(path)
        last = recipe.stages[-1]
        stages = f"{len(recipe.stages)} stages -> {last.frames}x{last.width}x{last.height}@{last.fps:g}"
        print(f"{name:<{width}}  {stages:<26}  {describe(path)}")
    return 0


def cp_command(args) -> int:
    """Copy the built-in recipe `args.name` to `args.file` (into it, as NAME.yaml, when it is a folder)."""
    recipes = builtin_recipes()
    name = args.name.removesuffix(".yaml")
    if name not in recipes:
        print(f"error: no built-in recipe {args.name!r}; built-in recipes: {', '.join(recipes)}", file=sys.stderr)
        return 2
    target = Path(args.file) / f"{name}.yaml" if Path(args.file).is_dir() else Path(args.file)
    if target.exists() and not args.force:
        print(f"error: {target} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipes[name], target)
    print(f"wrote {target} (the built-in recipe {name}); edit it, then `cascade validate {target}`")
    return 0
