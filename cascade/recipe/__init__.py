"""Whole-cascade recipes: the typed schema, loading with extends and overrides, and builders."""

from cascade.recipe.load import RecipeError, load_recipe
from cascade.recipe.schema import Recipe, Stage

__all__ = ["Recipe", "RecipeError", "Stage", "load_recipe"]
