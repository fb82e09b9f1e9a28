"""Loading a recipe: YAML (duplicate keys rejected), one level of `extends:`, dotted command-line
overrides, validation, and errors that name the file, the field path and the problem.

A recipe file is bounded before anything is built from it: its size, its nesting and the number of values its
aliases expand to (a YAML "billion laughs" file would otherwise hang validation and fill the memory), and every
message is cut to a bounded length.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cascade.errors import one_line, shown
from cascade.recipe.builtin import resolve_recipe_path
from cascade.recipe.checks import cascade_problems
from cascade.recipe.schema import Recipe


MAX_RECIPE_BYTES = 256 * 1024  # imagen-video.yaml, the largest shipped recipe, is 16 KB
MAX_DEPTH = 32  # levels of mappings, lists and values; a recipe has 7 (the file, stages, a stage, ..., betas, a beta)
MAX_VALUES = 100_000  # values (mappings, lists, scalars) after aliases are expanded; imagen-video.yaml has ~1,000
MAX_PROBLEMS = 20  # problems listed in one message; the rest are counted
MAX_PROBLEM_CHARS = 500  # characters of one problem's line


class RecipeError(ValueError):
    """A recipe that cannot be used. `str(error)` is the whole message for the user, one line per problem (at most
    MAX_PROBLEMS lines of at most MAX_PROBLEM_CHARS characters each, however large the recipe)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source, self.problems = source, problems
        lines = [one_line(f"{source}: {path}: {problem}" if path else f"{source}: {problem}", MAX_PROBLEM_CHARS)
                 for path, problem in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            lines.append(one_line(f"{source}: and {len(problems) - MAX_PROBLEMS} more problems", MAX_PROBLEM_CHARS))
        super().__init__("\n".join(lines))


class _Refused(yaml.MarkedYAMLError):
    """A YAML document this loader will not build: too deep, too large once its aliases are expanded."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently), nesting deeper than
    MAX_DEPTH, aliases that expand to more than MAX_VALUES values or refer to themselves, and scalars Python cannot
    build (an integer of 5,000 digits, the date 2001-13-45) - each as a YAML error with its line."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per level: 100,000 nested brackets would end in a RecursionError.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nesting deeper than {MAX_DEPTH} levels of mappings and lists; a recipe "
                               f"nests 7", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as error:  # e.g. int() of 5,000 digits, a timestamp with month 13
            problem = (f"an integer of {len(node.value)} characters, beyond any field's range"
                       if node.tag == "tag:yaml.org,2002:int" else one_line(error, 200))
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {shown(node.value)}: {problem}", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # e.g. a list as key: the base class reports it as a YAML error
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 3e-4 as a string; recipes mean the number, as YAML 1.2 does.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
# YAML 1.1 also reads 48:00:00 as the base-60 integer 172800; a recipe means the string (a SLURM time), as in 1.2.
for _resolvers in _UniqueKeyLoader.yaml_implicit_resolvers.values():
    _resolvers[:] = [(tag, regexp) for tag, regexp in _resolvers if tag != "tag:yaml.org,2002:int"]
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand it beyond MAX_VALUES values or MAX_DEPTH levels, or that contains
    itself; counted once per distinct node (memoized), so a billion-laughs file costs no more than its own size."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values once expanded, levels)
    active: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            size, height = sizes[key]
        elif key in active:
            raise _Refused(None, None, "an alias refers to the value that contains it (a recursive recipe)",
                           node.start_mark)
        else:
            if depth > MAX_DEPTH:
                raise _Refused(None, None, f"aliases nest values deeper than {MAX_DEPTH} levels; a recipe nests 7",
                               node.start_mark)
            active.add(key)
            children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            size, height = 1, 1
            for child in children:
                child_size, child_height = walk(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_VALUES:
                    raise _Refused(None, None, f"aliases expand this value to more than {MAX_VALUES:,} values (a "
                                   f"'billion laughs' file?); a recipe has about a thousand", node.start_mark)
            active.discard(key)
            sizes[key] = size, height
        if depth + height - 1 > MAX_DEPTH:
            raise _Refused(None, None, f"aliases nest values deeper than {MAX_DEPTH} levels; a recipe nests 7",
                           node.start_mark)
        return size, height

    walk(root, 1)


def read_yaml(path: Path) -> dict:
    source = str(path)
    try:
        with open(path, "rb") as file:  # at most one byte past the limit: /dev/zero or a huge file never fills memory
            raw = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(source, [("", f"cannot read the recipe: {error.strerror or error}")]) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [("", f"the file is larger than {MAX_RECIPE_BYTES // 1024} KiB, which no recipe "
                                        f"comes near (imagen-video.yaml is 16 KB): is it the right file?")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(source, [("", f"cannot read the recipe: not UTF-8 text ({error.reason} at byte "
                                        f"{error.start})")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise RecipeError(source, [("", _yaml_message(error))]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, [("", f"a recipe is a mapping of sections, got {type(data).__name__}")])
    return data


def merge(base: Any, override: Any) -> Any:
    """Deep-merge `override` into `base`. Mappings merge key by key; the `stages` list merges by stage
    name (a stage in the override updates the base's stage of that name, new names are appended);
    any other value replaces the base's."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if key == "stages" and isinstance(value, list) and isinstance(base.get(key), list):
                out[key] = _merge_stages(base[key], value)
            else:
                out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def _merge_stages(base: list, override: list) -> list:
    stages = [copy.deepcopy(s) for s in base]
    index = {s.get("name"): i for i, s in enumerate(stages) if isinstance(s, dict)}
    for stage in override:
        name = stage.get("name") if isinstance(stage, dict) else None
        if name in index:
            stages[index[name]] = merge(stages[index[name]], stage)
        else:
            stages.append(copy.deepcopy(stage))
    return stages


def parse_override(text: str) -> tuple[list[str], Any]:
    """'stages.base.train.lr=3e-4' -> (['stages', 'base', 'train', 'lr'], 0.0003); the value is YAML."""
    if "=" not in text:
        raise RecipeError("command line", [("", f"override {text!r} is not KEY.PATH=VALUE")])
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise RecipeError("command line", [("", f"override {text!r} has an empty key segment")])
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except _Refused as error:
        raise RecipeError("command line", [(key, f"value {shown(raw)}: {_yaml_problem(error)}")]) from None
    except yaml.YAMLError as error:
        raise RecipeError("command line", [(key, f"value {shown(raw)} is not valid YAML: {_yaml_problem(error)}")]
                          ) from None
    return path, value


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The problem of a YAML error on one line (str(error) spans several, with the position)."""
    return one_line(getattr(error, "problem", None) or str(error), MAX_PROBLEM_CHARS)


def _yaml_message(error: yaml.YAMLError) -> str:
    """'line L, column C: invalid YAML: PROBLEM' (or without 'invalid YAML' for a document refused as too large)."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{'' if isinstance(error, _Refused) else 'invalid YAML: '}{_yaml_problem(error)}"


def _plain(value: Any) -> str:
    """A string as it is (cut to 200 characters), anything else as `shown`."""
    return one_line(value, 200) if isinstance(value, str) else shown(value)


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set a dotted path in the raw recipe; under `stages` the next segment is a stage name (or index)."""
    node: Any = data
    for depth, segment in enumerate(path[:-1]):
        dotted = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if path[:depth] != ["stages"]:
                raise RecipeError("command line", [(dotted, _list_hint(path[:depth]))])
            node = _stage_by_name(node, segment, dotted)
            continue
        if not isinstance(node, dict):
            raise RecipeError("command line", [(dotted, f"cannot set a key inside a {type(node).__name__}")])
        if node.get(segment) is None:
            node[segment] = {}
        node = node[segment]
    last = path[-1]
    if isinstance(node, list):
        problem = ("name a field of the stage, not the stage itself" if path[:-1] == ["stages"]
                   else _list_hint(path[:-1]))
        raise RecipeError("command line", [(".".join(path), problem)])
    if not isinstance(node, dict):
        raise RecipeError("command line", [(".".join(path), f"cannot set a key inside a {type(node).__name__}")])
    node[last] = value


def _list_hint(path: list[str]) -> str:
    return f"{'.'.join(path)} is a list: set it whole, e.g. {'.'.join(path)}=[...]"


def _stage_by_name(stages: list, segment: str, dotted: str) -> dict:
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    if segment.isdigit() and int(segment) < len(stages):
        return stages[int(segment)]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == segment:
            return stage
    hint = difflib.get_close_matches(segment, [n for n in names if isinstance(n, str)], n=1)
    raise RecipeError("command line", [(dotted, f"no stage named {segment!r}"
                                        + (f"; did you mean {hint[0]!r}?" if hint else f"; stages: {names}"))])


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe: a file, or a built-in one by name (`tiny`, or a path such as
    recipes/tiny.yaml that does not exist here). Raises RecipeError with every problem found."""
    try:
        path = resolve_recipe_path(path)
    except FileNotFoundError as error:
        raise RecipeError(str(path), [("", f"cannot read the recipe: {error}")]) from None
    except (OSError, ValueError) as error:  # a name too long for the file system, a NUL byte
        cause = getattr(error, "strerror", None) or error
        raise RecipeError(_plain(str(path)), [("", f"cannot read the recipe: {cause}")]) from None
    data = read_yaml(path)
    parent = data.get("extends")
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(str(path), [("extends", f"must be a path to a recipe file (got {shown(parent)})")])
        try:
            parent_path = (path.parent / parent).resolve()
            found = parent_path.is_file()
        except (OSError, ValueError) as error:  # a name too long for the file system, a NUL byte
            raise RecipeError(str(path), [("extends", f"{shown(parent)} is not a usable path: {one_line(error, 200)}")]
                              ) from None
        if not found:
            raise RecipeError(str(path), [("extends", f"{shown(parent)} is not a file (looked for {parent_path})")])
        base = read_yaml(parent_path)
        if "extends" in base:
            raise RecipeError(str(path), [("extends", f"{parent} itself extends {_plain(base['extends'])}: at most one "
                                           f"level of extends is allowed; merge them into one file")])
        data = merge(base, {k: v for k, v in data.items() if k != "extends"})
        data["extends"] = str(parent_path)
    for text in overrides:
        try:
            keys, value = parse_override(text)
            if keys[0] == "extends":  # resolved above, from the file: an override would be ignored
                raise RecipeError("command line", [(
                    "extends", "cannot be set on the command line (the file's extends is resolved before overrides); "
                               "write `extends: FILE` in the recipe, or pass the other recipe as RECIPE")])
            apply_override(data, keys, value)
        except RecipeError as error:  # name the recipe and the override, not just "command line"
            raise RecipeError(f"{path} (override {shown(text)})", error.problems) from None
    source = str(path) + (" (with command-line overrides)" if overrides else "")
    recipe = validate_data(data, source)
    recipe.record_overrides([_named_path(parse_override(text)[0], data) for text in overrides])
    return recipe


def _named_path(path: list[str], data: dict) -> str:
    """An override's dotted path with the stage given by name (`stages.0.x` -> `stages.base.x`)."""
    if len(path) > 1 and path[0] == "stages" and path[1].isdigit() and int(path[1]) < len(data.get("stages", [])):
        path = ["stages", str(data["stages"][int(path[1])].get("name")), *path[2:]]
    return ".".join(path)


def validate_data(data: dict, source: str) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(source, [_describe(e, data) for e in error.errors()]) from None
    problems = cascade_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _describe(error: dict, data: dict) -> tuple[str, str]:
    loc = list(error["loc"])
    path = _render_path(loc, data)
    if error["type"] == "extra_forbidden":
        known = _fields_at(Recipe, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        suffix = f"; did you mean {hint[0]!r}?" if hint else (f"; allowed: {', '.join(known)}" if known else "")
        return path, f"unknown key {shown(loc[-1])}{suffix}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("missing",):
        message = "required field is missing"
    got = error.get("input")
    if error["type"].endswith("_type") or error["type"] in ("literal_error", "enum"):
        message += f" (got {shown(got)})"
    return path, message


def _render_path(loc: list, data: dict) -> str:
    """('stages', 2, 'unet', 'channels') -> 'stages.ssr1.unet.channels' using the stage's name when it has one."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if isinstance(node, list) and item < len(node) and isinstance(
                node[item], dict) else None
            named = isinstance(name, str) and len(name) <= 64 and parts and parts[-1] == "stages"
            parts.append(name if named else f"[{item}]")  # a stage name too long to be valid: its index
        else:
            text = str(item)
            parts.append(text if len(text) <= 64 else text[:61] + "...")  # a huge unknown key
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts).replace(".[", "[")


def _fields_at(model: type[BaseModel], loc: list) -> list[str]:
    """Field names of the model found by walking `loc` from the Recipe root (list indices skipped)."""
    current: Any = model
    for item in loc:
        if isinstance(item, int):
            continue
        current = _model_in(current.model_fields[item].annotation) if item in current.model_fields else None
        if current is None:
            return []
    return list(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
