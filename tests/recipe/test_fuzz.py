"""A recipe fuzzer: hundreds of generated bad recipes, each refused by `cascade validate` with exit 2 and one
`error:` message naming the file and the field (or the file and the problem), no traceback, within 5 s and 500 MB.

Cases are generated from a seed chosen per run (set CASCADE_FUZZ_SEED to replay one; the seed is printed and is in
every failure message): YAML bombs, deep nesting of brackets and mappings, absurd, negative, huge, NaN, infinite and
wrongly typed numbers in every numeric field of tiny.yaml, bad `extends`, unknown keys, binary garbage, empty files,
huge strings, bad command-line overrides. Most run in-process through `cascade.cli.main`; the nastiest run as real
`python -m cascade.cli validate` processes under an address-space limit and a timeout.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cascade.cli import main
from cascade.recipe.build import _numel, build_unet, count_parameters
from cascade.recipe.load import MAX_DEPTH, MAX_RECIPE_BYTES, load_recipe
from cascade.recipe.schema import FVD_MIN_FRAMES

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
TINY_TEXT = TINY.read_text()
TINY_DATA = yaml.safe_load(TINY_TEXT)
SEED = int(os.environ.get("CASCADE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
SECONDS = 5.0
BYTES = 500 * 2**20
PLACEHOLDER = "__FUZZ_VALUE__"


@dataclass
class Case:
    """One bad recipe: `files` ({name: text or bytes}) written to a folder, `recipe.yaml` validated (with
    `overrides`). The message must name `source` (default: recipe.yaml) and, one of, `field` ("PATH: " in a line)
    or `problem` (a substring); `anything` when only the file can be predicted (random garbage)."""
    name: str
    files: dict[str, str | bytes]
    field: str | None = None
    problem: str | None = None
    source: str = "recipe.yaml"
    overrides: tuple[str, ...] = ()
    anything: bool = False


def dump(data) -> str:
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, width=10**9)


def stage(data: dict, name: str) -> dict:
    return next(s for s in data["stages"] if s["name"] == name)


def numeric_leaves(node, path=()) -> list[tuple]:
    """Paths (keys and list indices) of every number in tiny.yaml (bools are not numbers here)."""
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in numeric_leaves(value, (*path, key))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in numeric_leaves(value, (*path, i))]
    return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


def dotted(path: tuple, data: dict) -> str:
    """('stages', 0, 'unet', 'num_res_blocks', 1) -> 'stages.base.unet.num_res_blocks[1]', as messages name it."""
    out, node = "", data
    for i, item in enumerate(path):
        if isinstance(item, int):
            out += f".{node[item]['name']}" if i == 1 and path[0] == "stages" else f"[{item}]"
        else:
            out += f".{item}" if out else item
        node = node[item]
    return out


def with_value(path: tuple, raw: str) -> str:
    """tiny.yaml with the value at `path` replaced by the raw YAML text `raw`."""
    data = copy.deepcopy(TINY_DATA)
    node = data
    for item in path[:-1]:
        node = node[item]
    node[path[-1]] = PLACEHOLDER
    return dump(data).replace(PLACEHOLDER, raw, 1)


# Values that no numeric field accepts: not finite, beyond every bound, below every bound, or not a number.
BAD_NUMBERS = [".nan", ".inf", "-.inf", "1e308", "-1e308", str(10**30), str(-10**30), str(2**63), str(-2**63),
               "0x" + "f" * 3000, "1e23", '"12"', "'0.5'", "[1, 2]", "{a: 1}", "true", "false", "abc", "2001-01-01",
               "!!binary aGVsbG8=", "0.1.2", "12abc", "''"]


def number_cases(rng: random.Random, count: int) -> list[Case]:
    leaves = numeric_leaves(TINY_DATA)
    cases = []
    for i in range(count):
        path = rng.choice(leaves)
        raw = rng.choice(BAD_NUMBERS)
        cases.append(Case(f"number-{i}-{dotted(path, TINY_DATA)}={raw[:20]}", {"recipe.yaml": with_value(path, raw)},
                          field=dotted(path, TINY_DATA)))
    # An integer Python will not even build from its digits: refused while reading, with its line.
    path = rng.choice(leaves)
    cases.append(Case("number-5000-digits", {"recipe.yaml": with_value(path, "9" * 5000)},
                      problem="an integer of 5000 characters"))
    return cases


def unet_cases() -> list[Case]:
    """The values that hung or overflowed while building U-Nets, in every stage."""
    cases = []
    for s, st in enumerate(TINY_DATA["stages"]):
        name, levels = st["name"], len(st["unet"]["channel_mults"])
        for key, raw in [("channels", "1000000000000"), ("head_dim", "1000000000"), ("context_dim", "1000000000000"),
                         ("num_res_blocks", "[" + ", ".join(["1"] * (levels - 1) + ["10000000"]) + "]"),
                         ("channel_mults", "[" + ", ".join(["1"] * (levels - 1) + ["1000000"]) + "]")]:
            path = ("stages", s, "unet", key)
            where = f"stages.{name}.unet.{key}" + (f"[{levels - 1}]" if raw.startswith("[") else "")
            cases.append(Case(f"unet-{name}-{key}", {"recipe.yaml": with_value(path, raw)}, field=where,
                              problem="which can only be a mistake"))
    return cases


def bomb(levels: int, fanout: int, at: str = "stages") -> str:
    """A billion laughs: `levels` anchors, each a list of `fanout` aliases of the previous one."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "name: tiny\n" + "\n".join(lines) + f"\n{at}: *a{levels - 1}\n"


def bomb_cases(rng: random.Random) -> list[Case]:
    cases = []
    for i in range(8):
        fanout = rng.randint(4, 12)
        levels = next(n for n in range(2, 40) if fanout ** n > 10**6) + rng.randint(0, 4)
        cases.append(Case(f"bomb-{fanout}x{levels}", {"recipe.yaml": bomb(levels, fanout, rng.choice(
            ["stages", "eval", "zz"]))}, problem="aliases expand this value to more than"))
    # Inside a field of a real recipe, and in the file it extends.
    anchors = "\n".join([f"x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
                        + [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]" for i in range(1, 9)])
    text = with_value(("stages", 0, "unet", "channel_mults"), "*x8")
    cases.append(Case("bomb-in-channel-mults", {"recipe.yaml": anchors + "\n" + text},
                      problem="aliases expand this value to more than"))
    cases.append(Case("bomb-in-extends-parent", {"parent.yaml": bomb(9, 10), "recipe.yaml": "extends: parent.yaml\n"},
                      problem="aliases expand", source="parent.yaml"))
    for i, text in enumerate(["name: tiny\nstages: &s [*s]\n", "name: tiny\nstages: &s [1, [2, [*s]]]\n",
                              "name: tiny\neval: &e {a: *e}\n", "name: tiny\nstages: &s [{a: [*s]}]\n"]):
        cases.append(Case(f"recursive-alias-{i}", {"recipe.yaml": text},
                          problem="refers to the value that contains it"))
    # Aliases that nest deeper than the limit without nesting in the text.
    chain = "name: tiny\n" + "\n".join([f"d0: &d0 [[[[[[1]]]]]]"] + [f"d{i}: &d{i} [[[[[[*d{i - 1}]]]]]]"
                                                                     for i in range(1, 12)]) + "\nstages: *d11\n"
    cases.append(Case("alias-depth", {"recipe.yaml": chain}, problem=f"deeper than {MAX_DEPTH} levels"))
    # Many aliases of one long string: cheap to hold (one object), each error line bounded.
    many = "s: &s " + "y" * 20_000 + "\n" + with_value(("stages", 0, "unet", "num_res_blocks"),
                                                          "[" + ", ".join(["*s"] * 5000) + "]")
    cases.append(Case("alias-long-string", {"recipe.yaml": many}, field="stages.base.unet.num_res_blocks"))
    return cases


def nesting_cases(rng: random.Random) -> list[Case]:
    problem = f"nesting deeper than {MAX_DEPTH} levels"
    cases = []
    for i in range(12):
        depth = rng.choice([MAX_DEPTH + 1, rng.randint(40, 1000), rng.randint(1000, 100_000)])
        kind = rng.choice(["brackets", "mappings", "mixed", "unclosed", "in-field", "block"])
        if kind == "brackets":
            text = "name: " + "[" * depth + "]" * depth + "\n"
        elif kind == "mappings":
            depth = min(depth, 40_000)
            text = "name: " + "{a: " * depth + "1" + "}" * depth + "\n"
        elif kind == "mixed":
            depth = min(depth, 40_000)
            text = "stages: " + "[{k: " * (depth // 2) + "1" + "}]" * (depth // 2) + "\n"
        elif kind == "unclosed":
            text = "name: tiny\nstages: " + "[" * depth
        elif kind == "in-field":
            text = with_value(("stages", 1, "train", "optimizer", "betas"), "[" * depth + "0.9" + "]" * depth)
        else:  # indentation: one space per level
            depth = min(depth, 600)
            text = "".join(f"{' ' * n}k{n}:\n" for n in range(depth)) + " " * depth + "end\n"
        cases.append(Case(f"nesting-{kind}-{depth}", {"recipe.yaml": text}, problem=problem))
    return cases


def extends_cases(rng: random.Random) -> list[Case]:
    child = "extends: {}\nname: child\n"
    return [
        Case("extends-missing", {"recipe.yaml": child.format("nowhere.yaml")}, field="extends", problem="not a file"),
        Case("extends-directory", {"sub/x.yaml": TINY_TEXT, "recipe.yaml": child.format("sub")}, field="extends"),
        Case("extends-number", {"recipe.yaml": child.format("12")}, field="extends"),
        Case("extends-list", {"recipe.yaml": child.format("[a.yaml, b.yaml]")}, field="extends"),
        Case("extends-mapping", {"recipe.yaml": child.format("{a: 1}")}, field="extends"),
        Case("extends-null-byte", {"recipe.yaml": child.format('"a\\0b.yaml"')}, field="extends"),
        Case("extends-name-too-long", {"recipe.yaml": child.format("x" * 5000 + ".yaml")}, field="extends"),
        Case("extends-itself", {"recipe.yaml": child.format("recipe.yaml")}, field="extends"),
        Case("extends-two-levels", {"a.yaml": TINY_TEXT, "b.yaml": "extends: a.yaml\nname: b\n",
                                    "recipe.yaml": child.format("b.yaml")}, field="extends"),
        Case("extends-garbage", {"parent.yaml": bytes(rng.randrange(128, 256) for _ in range(500)),
                                 "recipe.yaml": child.format("parent.yaml")}, source="parent.yaml",
             problem="not UTF-8"),
        Case("extends-empty", {"parent.yaml": "", "recipe.yaml": child.format("parent.yaml")}, source="parent.yaml",
             problem="a recipe is a mapping of sections"),
        Case("extends-deep", {"parent.yaml": "name: " + "[" * 50_000, "recipe.yaml": child.format("parent.yaml")},
             source="parent.yaml", problem="nesting deeper"),
        Case("extends-dev-zero", {"recipe.yaml": child.format("/dev/zero")}, field="extends", problem="not a file"),
        Case("extends-child-bad-number", {"parent.yaml": TINY_TEXT, "recipe.yaml": child.format(
            "parent.yaml") + "data: {seed: -1}\n"}, field="data.seed"),
        Case("extends-override", {"recipe.yaml": TINY_TEXT}, overrides=("extends=other.yaml",), field="extends"),
    ]


SECTIONS = [(), ("text_encoder",), ("stages", 0), ("stages", 3, "unet"), ("stages", 2, "train"),
            ("stages", 0, "train", "optimizer"), ("stages", 6, "distill", "progressive"), ("data",), ("eval",),
            ("cluster",), ("stages", 4, "launch"), ("stages", 1, "diffusion", "schedule")]


def unknown_key_cases(rng: random.Random, count: int) -> list[Case]:
    cases = []
    for i in range(count):
        where = rng.choice(SECTIONS)
        key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(1, 12))) + "_x"
        data = copy.deepcopy(TINY_DATA)
        node = data
        for item in where:
            node = node[item]
        node[key] = rng.choice([1, "v", [1, 2], {"a": 1}, None])
        prefix = dotted(where, TINY_DATA) if where else ""
        cases.append(Case(f"unknown-{prefix or 'top'}-{key}", {"recipe.yaml": dump(data)},
                          field=f"{prefix}.{key}" if prefix else key, problem="unknown key"))
    return cases


def garbage_cases(rng: random.Random) -> list[Case]:
    cases = []
    for i in range(6):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
        cases.append(Case(f"garbage-bytes-{i}", {"recipe.yaml": data}, anything=True))
    for i in range(6):
        text = "".join(rng.choice("{}[]:,-?&*!|>'\"%@`#\t\n abc019.\x00\x07") for _ in range(rng.randint(1, 2000)))
        cases.append(Case(f"garbage-text-{i}", {"recipe.yaml": text}, anything=True))
    # cut within the stages (before the last stage's closing brace): a cut in the trailing comments of the eval
    # section leaves a valid recipe, which is not garbage
    cut = rng.randint(100, TINY_TEXT.index("\ndata:") - 2)
    cases.append(Case("garbage-tiny-truncated", {"recipe.yaml": TINY_TEXT[:cut]}, anything=True))
    cases.append(Case("garbage-nul", {"recipe.yaml": b"\x00" * 1000}, problem="invalid YAML"))
    cases.append(Case("garbage-utf16", {"recipe.yaml": TINY_TEXT.encode("utf-16")}, problem="not UTF-8"))
    cases.append(Case("garbage-python-tag", {"recipe.yaml": "name: !!python/object/apply:os.system [ls]\n"},
                      problem="could not determine a constructor"))
    cases.append(Case("garbage-bad-date", {"recipe.yaml": "name: tiny\nstages: 2001-13-45\n"}, problem="month"))
    return cases


def empty_cases() -> list[Case]:
    mapping = "a recipe is a mapping of sections"
    return [Case(f"empty-{i}", {"recipe.yaml": text}, problem=mapping)
            for i, text in enumerate(["", " ", "\n\n", "---\n", "# only a comment\n", "~\n", "null\n", "[]\n",
                                      "'tiny'\n", "---\n...\n"])] + [
        Case("empty-mapping", {"recipe.yaml": "{}\n"}, field="name", problem="required field is missing")]


def huge_string_cases(rng: random.Random) -> list[Case]:
    n = rng.randint(5_000, 50_000)
    return [
        Case("huge-name", {"recipe.yaml": with_value(("name",), "a" * n)}, field="name"),
        Case("huge-path", {"recipe.yaml": with_value(("text_encoder", "path"), "p" * n)}, field="text_encoder.path"),
        Case("huge-run-dir", {"recipe.yaml": TINY_TEXT + f"run_dir: {'r' * n}\n"}, field="run_dir"),
        Case("huge-stage-name", {"recipe.yaml": with_value(("stages", 6, "name"), "s" * n)}, field="stages[6].name"),
        Case("huge-string-for-int", {"recipe.yaml": with_value(("stages", 0, "frames"), "f" * n)},
             field="stages.base.frames"),
        Case("huge-key", {"recipe.yaml": TINY_TEXT + f"? {'k' * n}\n: 1\n"}, problem="unknown key"),
        Case("huge-time", {"recipe.yaml": with_value(("stages", 2, "launch", "time"), "x" * n)},
             field="stages.ssr1.launch.time"),
        Case("huge-days", {"recipe.yaml": with_value(("stages", 2, "launch", "time"), '"99999999-00:00:00"')},
             field="stages.ssr1.launch"),
        Case("huge-file", {"recipe.yaml": TINY_TEXT + "#" * MAX_RECIPE_BYTES}, problem="larger than 256 KiB"),
        Case("huge-list", {"recipe.yaml": with_value(("eval", "steps"), "[" + ", ".join(["8"] * 5_000) + "]")},
             field="eval.steps"),
        Case("huge-bad-list", {"recipe.yaml": with_value(("stages", 0, "unet", "channel_mults"),
                                                         "[" + ", ".join(["-1"] * 5_000) + "]")},
             field="stages.base.unet.channel_mults"),
    ]


def override_cases(rng: random.Random) -> list[Case]:
    tiny = {"recipe.yaml": TINY_TEXT}
    bomb_value = "[" + ", ".join(["&a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                                                                   for i in range(1, 8)]) + "]"
    return [
        Case("override-seed", tiny, overrides=("stages.base.train.seed=-1",), field="stages.base.train.seed"),
        Case("override-lr", tiny, overrides=("stages.tsr1.train.lr=1e308",), field="stages.tsr1.train.lr"),
        Case("override-workers", tiny, overrides=(f"data.num_workers={2**63}",), field="data.num_workers"),
        Case("override-nan", tiny, overrides=("stages.base.fps=.nan",), field="stages.base.fps"),
        Case("override-bomb", tiny, overrides=(f"eval.steps={bomb_value}",), field="eval.steps",
             problem="aliases expand"),
        Case("override-deep", tiny, overrides=("eval.steps=" + "[" * 10_000,), field="eval.steps",
             problem="nesting deeper"),
        Case("override-fvd-frames", tiny, overrides=("eval.metrics=[fvd]", "eval.frames=8",), field="eval.frames",
             problem=f"needs at least {FVD_MIN_FRAMES} frames"),
        Case("override-fvd-too-long", tiny, overrides=("eval.metrics=[fvd, probes]", "eval.frames=64",),
             field="eval.frames", problem="has 32, so no stage would get an FVD"),
        Case("override-fvd-stage-unknown", tiny, overrides=("eval.fvd_stages=[ssr9]",), field="eval.fvd_stages",
             problem="'ssr9' is not a stage"),
        Case("override-fvd-stage-short", tiny, overrides=("eval.fvd_stages=[ssr2]",), field="eval.fvd_stages",
             problem="ssr2 has 8 frames"),
    ]


def generate(seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = (number_cases(rng, 80) + unet_cases() + bomb_cases(rng) + nesting_cases(rng) + extends_cases(rng)
             + unknown_key_cases(rng, 20) + garbage_cases(rng) + empty_cases() + huge_string_cases(rng)
             + override_cases(rng))
    rng.shuffle(cases)
    return cases


def _write(case: Case, folder: Path) -> Path:
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder / "recipe.yaml"


def _problems(case: Case, code: int, out: str, err: str, source: str) -> list[str]:
    """What is wrong with one case's outcome (empty: a clean refusal)."""
    problems = []
    if code != 2:
        problems.append(f"exit {code}, not 2")
    if out:
        problems.append(f"stdout not empty: {out[:200]!r}")
    if "Traceback" in err:
        problems.append("a traceback")
    if not err.startswith("error: ") or err.count("error:") != 1:
        problems.append("not exactly one 'error:' message")
    lines = err.removeprefix("error: ").splitlines()
    if not lines or not all(line.startswith(source) for line in lines):
        problems.append(f"not every line names {source}")
    if len(err) > 25_000:
        problems.append(f"a message of {len(err)} characters")
    if not case.anything:
        if case.field is not None and not any(f"{case.field}: " in line or f"{case.field}[" in line
                                              for line in lines):
            problems.append(f"no line names the field {case.field}")
        if case.problem is not None and case.problem not in err:
            problems.append(f"the message does not say {case.problem!r}")
    return problems


CHEAP = ("number-", "unknown-", "empty-", "garbage-", "unet-", "extends-", "override-")  # tiny.yaml-sized inputs


def _validate(argv: list[str]) -> int | str:
    try:
        return main(argv)
    except BaseException as error:  # noqa: BLE001 - an exception escaping main is the finding
        return f"{type(error).__name__}: {str(error)[:200]}"


def test_fuzzed_recipes_fail_cleanly(tmp_path, capsys):
    """At least 200 generated bad recipes, each: exit 2, one `error:` message naming the file and the field (or the
    problem), no traceback, under 5 s (wall and CPU) and 500 MB: the process's peak RSS may not pass its level at the
    start by 500 MB in any case, and the cases with large or expanding inputs (bombs, nesting, huge strings) run a
    second time under tracemalloc (4x slower, so not timed) for their own peak of Python allocations."""
    cases = generate(SEED)
    with capsys.disabled():
        print(f"\nrecipe fuzzer: {len(cases)} cases from seed {SEED} (CASCADE_FUZZ_SEED={SEED} replays them)")
    assert len(cases) >= 200
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    failures, slowest, largest = [], (0.0, ""), (0, "")
    for i, case in enumerate(cases):
        folder = tmp_path / f"{i:03d}"
        path = _write(case, folder)
        argv = ["validate", str(path), *case.overrides]
        source = str(path) if case.source == "recipe.yaml" else str((folder / case.source).resolve())
        wall, cpu = time.perf_counter(), time.process_time()
        code = _validate(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start
        out, err = capsys.readouterr()
        problems = _problems(case, code, out, err, source) if isinstance(code, int) else [f"raised {code}"]
        peak = 0
        if not case.name.startswith(CHEAP):
            tracemalloc.start()
            _validate(argv)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            capsys.readouterr()
        if max(wall, cpu) > SECONDS:
            problems.append(f"took {wall:.1f} s ({cpu:.1f} s CPU)")
        if max(peak, rss) > BYTES:
            problems.append(f"used {peak / 2**20:.0f} MB of Python allocations, peak RSS {rss / 2**20:.0f} MB above "
                            f"the start")
        slowest, largest = max(slowest, (wall, case.name)), max(largest, (peak, case.name))
        if problems:
            failures.append(f"{case.name} ({folder}): {'; '.join(problems)}\n    {err[:600]!r}")
    with capsys.disabled():
        print(f"slowest: {slowest[1]} {slowest[0]:.2f} s; most memory: {largest[1]} {largest[0] / 2**20:.1f} MB")
    assert not failures, (f"seed {SEED} (rerun with CASCADE_FUZZ_SEED={SEED}): {len(failures)} of {len(cases)} "
                          f"cases failed:\n" + "\n".join(failures[:20]))


# --- the nastiest, as real processes under an address-space limit ---------------------------------------------

# A small launcher runs the command as its own child and reports that child's rusage: a process forked straight from
# pytest would report pytest's peak RSS as its own (Linux keeps the high-water mark of the memory a process was
# forked with across exec), so its ru_maxrss says nothing about the command.
LAUNCHER = """
import json, os, resource, subprocess, sys
limit, report, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
proc = subprocess.Popen(argv)
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as f:
    json.dump(dict(code=os.waitstatus_to_exitcode(status), cpu=usage.ru_utime + usage.ru_stime,
                   rss=usage.ru_maxrss * 1024), f)
"""


def _run_limited(argv: list[str], folder: Path, limit_bytes: int = 512 * 2**20, timeout: float = 60.0):
    """Run `python -m cascade.cli ARGV` under RLIMIT_AS; return (exit code, stderr, wall s, CPU s, peak RSS bytes)
    of that process alone."""
    report = folder / "usage.json"
    command = [sys.executable, "-c", LAUNCHER, str(limit_bytes), str(report), sys.executable, "-m", "cascade.cli",
               *argv]
    with open(folder / "out", "wb") as out, open(folder / "err", "wb") as err:
        start = time.perf_counter()
        try:
            subprocess.run(command, stdout=out, stderr=err, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cascade {' '.join(argv)} ran past {timeout} s") from None
        wall = time.perf_counter() - start
    usage = json.loads(report.read_text())
    return usage["code"], (folder / "err").read_text(errors="replace"), wall, usage["cpu"], usage["rss"]


NASTY = {
    "billion-laughs": (bomb(9, 10), None, "aliases expand this value to more than"),
    "100000-brackets": ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", None, "nesting deeper than"),
    "channels-1e12": (with_value(("stages", 0, "unet", "channels"), "1000000000000"), "stages.base.unet.channels",
                      "1000000000000 is beyond 65536, which can only be a mistake"),
    "num-res-blocks-1e7": (with_value(("stages", 0, "unet", "num_res_blocks"), "[1, 10000000]"),
                           "stages.base.unet.num_res_blocks[1]", "10000000 is beyond 256"),
    "head-dim-1e9": (with_value(("stages", 0, "unet", "head_dim"), "1000000000"), "stages.base.unet.head_dim",
                     "is beyond 65536"),
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_recipe_in_a_real_process(name, tmp_path):
    """What used to hang, grow to gigabytes or end in a traceback, as `python -m cascade.cli validate` under a
    512 MiB address-space limit: exit 2, one line naming the file (and field), no traceback, under 5 s of CPU."""
    text, field_path, problem = NASTY[name]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, err, wall, cpu, rss = _run_limited(["validate", str(path)], tmp_path)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.startswith(f"error: {path}: " + (f"{field_path}: " if field_path else "")), err
    assert problem in err
    assert cpu < SECONDS and wall < 30, (wall, cpu)  # wall: a loaded machine; CPU time is the process's own
    assert rss < BYTES


# --- train refuses the same values before it trains --------------------------------------------------------------

@pytest.mark.parametrize("override, field_path, problem", [
    ("stages.base.train.seed=-1", "stages.base.train.seed", "greater than or equal to 0"),
    ("stages.base.train.seed=1e23", "stages.base.train.seed", "valid integer"),
    (f"stages.base.train.seed={2**32}", "stages.base.train.seed", "beyond 4294967295"),
    ("stages.base.train.lr=1e308", "stages.base.train.lr", "1e+308 is beyond 1"),
    (f"data.num_workers={2**63}", "data.num_workers", f"{2**63} is beyond 1024"),
    (f"data.seed={2**40}", "data.seed", "which can only be a mistake"),
])
def test_train_refuses_absurd_numbers_with_exit_2(override, field_path, problem, tmp_path, capsys):
    """`cascade train` validates first: the seed that crashed training and the values that passed with exit 0 now
    stop it with exit 2 and one line, before any folder is made."""
    run_dir = tmp_path / "run"
    code = main(["train", str(TINY), "--stage", "base", f"run_dir={run_dir}", override])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.startswith(f"error: {TINY} (with command-line overrides): {field_path}: ")
    assert problem in err
    assert not run_dir.exists()


# --- what the bounds and the counting keep ------------------------------------------------------------------------

def test_largest_shipped_values_are_far_inside_the_bounds():
    """imagen-video.yaml validates, and ten times its largest widths, blocks, frames and steps still do."""
    recipe = load_recipe(ROOT / "recipes" / "imagen-video.yaml")
    last = recipe.stages[-1]
    assert (last.frames, last.width, last.height) == (128, 1280, 768)
    load_recipe(ROOT / "recipes" / "imagen-video.yaml", [
        "stages.base.unet.channels=3840", "stages.base.unet.num_res_blocks=[20, 30, 40, 80]",
        "stages.base.train.max_steps=10000000", "stages.base.sampler.steps=2560", "data.num_workers=80",
        "stages.base.train.batch_size=640", "stages.ssr3.width=12800", "stages.ssr3.height=7680",
        "stages.ssr3.train.crop={width: 3200, height: 1920}"])


@pytest.mark.parametrize("recipe_name", ["tiny", "imagen-video"])
def test_parameter_count_equals_a_full_meta_build(recipe_name):
    """count_parameters (one unit per level, multiplied) equals counting a full meta-device build, per stage."""
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml")
    for stage_ in recipe.stages:
        assert count_parameters(stage_, recipe) == _numel(build_unet(stage_, recipe, device="meta")), stage_.name


def test_parameter_count_costs_the_same_for_256_units_per_level():
    """The count of a U-Net with 256 units on each of 7 levels, at the widest channels the schema allows, takes no
    longer than a small one: nothing loops over units or allocates."""
    unet = ("{channels: 65536, channel_mults: [1, 2, 4, 8, 16, 32, 64], num_res_blocks: [256, 256, 256, 256, 256, "
            "256, 256], spatial_attention: [true, true, true, true, true, true, true], cross_attention: [true, true, "
            "true, true, true, true, true], temporal: [conv, conv, conv, conv, conv, conv, conv], head_dim: 1024}")
    recipe = load_recipe(TINY, [f"stages.ssr3.unet={unet}", "stages.ssr3.train.crop_frames=null"])
    start = time.process_time()
    count = count_parameters(recipe.stage("ssr3"), recipe)
    assert time.process_time() - start < SECONDS
    one = load_recipe(TINY, [f"stages.ssr3.unet={unet.replace('256', '1')}", "stages.ssr3.train.crop_frames=null"])
    single = count_parameters(one.stage("ssr3"), one)
    assert count > 255 * single // 2  # the units are nearly all of the network


def test_fvd_minimum_is_the_protocols():
    """The schema's FVD minimum is the I3D protocol's: one frame fewer is refused by FVDProtocol itself."""
    from cascade.eval.fvd import FVDProtocol

    FVDProtocol(frames=FVD_MIN_FRAMES)
    with pytest.raises(ValueError, match="at least"):
        FVDProtocol(frames=FVD_MIN_FRAMES - 1)


@pytest.mark.parametrize("argument, cause", [("x" * 5000 + ".yaml", "File name too long"),
                                             ("a\0b.yaml", "cannot read the recipe")])
def test_unusable_recipe_path_is_one_line(argument, cause, capsys):
    """A recipe path the file system refuses (too long, a NUL byte) is one line, not an OSError traceback."""
    assert main(["validate", argument]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert cause in err and len(err) < 1000
