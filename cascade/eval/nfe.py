"""`cascade eval-nfe`: quality against network evaluations per video, for the teacher and every distilled student
of a run (Imagen Video distils 256 -> 8 steps; how few does a pixel cascade need?).

Per stage, alone on ground-truth input (`cascade eval --modes gt`; the base from text): the teacher at the recipe's
steps and at each student's step count (the undistilled baseline at the same cost), and every student the run
holds (RUN/STAGE/distill/ROUND/student.safetensors: guidance-distilled, progressive at each halving, consistency),
with the stage's probes, PSNR / SSIM against the ground truth, network evaluations and seconds per video.

For the whole cascade (`--modes cascade`, the final stage's probes, quality and FVD against held-out ground truth):
the teachers, and the base's final student followed by every super-resolution stage at one (method, steps) that
all of them have. The best of those within `--budget` evaluations per video is checked against the teachers: each
final-stage probe at least 95 % of the teacher's, FVD at most 10 % above it.

Every evaluation is one `cascade.eval.runner.evaluate` over a folder of links to the weights it combines (under
OUT/weights), so it samples from the same noise as every other (paired comparisons). Writes OUT/nfe.json, nfe.md and
nfe.png.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cascade.errors import UserError
from cascade.recipe import Recipe, load_recipe

__all__ = ["Candidate", "candidates", "cascade_combinations", "evaluate_nfe", "best_within", "markdown", "plot",
           "eval_nfe_command"]

PROBES = ("color", "shape", "direction", "background")
PROBE_SHARE = 0.95  # each final-stage probe of the best student cascade: at least this share of the teacher's
FVD_RATIO = 1.10  # its FVD: at most this multiple of the teacher's
CONSISTENCY_STEPS = (1, 2, 4)  # the step counts a one-step consistency student is sampled at


@dataclass(frozen=True)
class Candidate:
    """One stage's weights to evaluate: the teacher, or a student with the method and steps it was distilled to."""

    stage: str
    method: str  # teacher, guidance, progressive or consistency
    steps: int  # the student's steps; the teacher's recipe steps
    path: Path
    sampler: str = "ddim"  # the student's sampler ("consistency": any step count)
    sample_steps: int | None = None  # sampled at this many steps instead (a one-step consistency student)

    @property
    def label(self) -> str:
        name = "teacher" if self.method == "teacher" else f"{self.method}-{self.steps}"
        return name if self.sample_steps in (None, self.steps) else f"{name}@{self.sample_steps}"


def candidates(recipe: Recipe) -> dict[str, list[Candidate]]:
    """Per stage, the teacher (RUN/teachers/STAGE.safetensors) then every student its distillation left
    (RUN/STAGE/distill/*/student.safetensors), fewest steps last within a method. UserError naming the file when a
    stage has no teacher."""
    from cascade.weights import read_info

    run = recipe.run_folder()
    out: dict[str, list[Candidate]] = {}
    for stage in recipe.stages:
        teacher = run / "teachers" / f"{stage.name}.safetensors"
        if not teacher.is_file():
            raise UserError(f"{teacher}: no trained weights for stage {stage.name}; train it first (`cascade run "
                            f"RECIPE` or `cascade train RECIPE --stage {stage.name}` and `cascade export`)")
        found = [Candidate(stage.name, "teacher", stage.sampler.steps, teacher)]
        students = []
        for path in sorted((recipe.run_folder(stage.name) / "distill").glob("*/student.safetensors")):
            info = read_info(path)
            students.append(Candidate(stage.name, info.method or "progressive", int(info.steps), path,
                                      info.sampler or "ddim"))
        out[stage.name] = found + sorted(students, key=lambda c: (c.method, -c.steps))
    return out


def cascade_combinations(recipe: Recipe, found: dict[str, list[Candidate]],
                         consistency_steps: tuple[int, ...] = CONSISTENCY_STEPS
                         ) -> list[tuple[str, dict[str, Candidate]]]:
    """(label, stage -> candidate) of the whole-cascade evaluations: the teachers; then the base's final student
    (RUN/distilled/BASE.safetensors when the run has it, else its fewest-steps student) with every super-resolution
    stage at one (method, steps) they all have, most steps first; one-step consistency students also sampled at
    each of `consistency_steps`."""
    names = [s.name for s in recipe.stages]
    base, sr = names[0], names[1:]
    combos = [("teachers", {n: found[n][0] for n in names})]
    students = [c for c in found[base] if c.method != "teacher"]
    if not students:
        return combos
    final = recipe.run_folder() / "distilled" / f"{base}.safetensors"
    chosen = next((c for c in students if final.is_file() and c.path.read_bytes() == final.read_bytes()), None)
    chosen = chosen or min(students, key=lambda c: c.steps)
    shared = None
    for name in sr:
        keys = {(c.method, c.steps) for c in found[name] if c.method not in ("teacher", "guidance")}
        shared = keys if shared is None else shared & keys
    for method, steps in sorted(shared or (), key=lambda k: (k[0], -k[1])):
        pick = {n: next(c for c in found[n] if (c.method, c.steps) == (method, steps)) for n in sr}
        anywhere = all(c.sampler == "consistency" for c in pick.values())
        for k in sorted(set(consistency_steps) - {steps}, reverse=True) if anywhere else ():
            combos.append((f"base {chosen.label} + SR {method}-{steps}@{k}",
                           {base: chosen, **{n: replace(c, sample_steps=k) for n, c in pick.items()}}))
        combos.append((f"base {chosen.label} + SR {method}-{steps}", {base: chosen, **pick}))
    return combos


def _link_folder(folder: Path, picks: dict[str, Candidate]) -> Path:
    """A weights folder of links STAGE.safetensors -> the chosen files (what `cascade eval --checkpoints` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, c in picks.items():
        link = folder / f"{name}.safetensors"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(c.path.resolve())
    return folder


def _for_students(recipe: Recipe, picks: dict[str, Candidate]) -> Recipe:
    """The recipe as a loader of these picks should see it: a student samples with its own steps and sampler, so
    command-line overrides of a student's stage's sampler (meant for its teacher) are not held against it; a pick
    with `sample_steps` samples at that many steps (as stages.NAME.sampler.steps=K on the command line would)."""
    students = [n for n, c in picks.items() if c.method != "teacher"]
    if not students:
        return recipe
    kept = [o for o in recipe._overrides
            if not any(o in ("stages", f"stages.{n}") or o == f"stages.{n}.sampler"
                       or o.startswith(f"stages.{n}.sampler.") for n in students)]
    steps = {n: c.sample_steps for n, c in picks.items() if c.sample_steps is not None}
    stages = [s.model_copy(update={"sampler": s.sampler.model_copy(update={"steps": steps[s.name]})})
              if s.name in steps else s for s in recipe.stages]
    copy = recipe.model_copy(update={"stages": stages})
    copy.record_overrides(kept + [f"stages.{n}.sampler.steps" for n in steps])
    return copy


def _scores(row: dict) -> dict:
    q = row.get("quality") or {}
    return dict(probes=row.get("probes"), psnr_db=q.get("psnr_db"), ssim=q.get("ssim"),
                background=q.get("background"), fvd=row.get("fvd"))


def evaluate_nfe(recipe: Recipe, out: Path, *, num_videos: int | None = None, teacher_steps: list[int] | None = None,
                 budget: int = 10, stages: list[str] | None = None, whole: bool = True, device=None,
                 dtype: str = "float32", batch_size: int | None = None, progress: bool = True,
                 consistency_steps: tuple[int, ...] = CONSISTENCY_STEPS) -> dict:
    """Measure every candidate of every stage (`stages`: a subset) in gt mode and, with `whole`, the cascade
    combinations; write OUT/nfe.json, nfe.md and nfe.png. The teacher is also measured at each student step count
    of the stage and at `teacher_steps`; a one-step consistency student at each of `consistency_steps`. Returns
    what nfe.json holds."""
    from cascade.eval.runner import EvalPlan, evaluate

    started = time.perf_counter()
    found = candidates(recipe)
    names = [s.name for s in recipe.stages]
    chosen = names if stages is None else stages
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise UserError(f"--stages: no stage named {', '.join(unknown)}; stages are {', '.join(names)}")
    plan_kw = dict(num_videos=num_videos, batch_size=batch_size, guidance=[], aug=[])
    metrics = [m for m in recipe.eval.metrics if m in ("probes", "quality")] or ["quality"]
    cache = recipe.run_folder() / "eval" / "cache"  # FVD reference statistics shared with `cascade run`'s evaluations
    result: dict = dict(recipe=recipe.name, run=str(recipe.run_folder()), budget=budget, stages={}, cascade=[])

    for name in chosen:
        stage = recipe.stage(name)
        rows = []
        extra = sorted({c.steps for c in found[name][1:]} | set(teacher_steps or ()), reverse=True)
        if any(c.sampler == "consistency" for c in found[name]):
            extra = sorted(set(extra) | set(consistency_steps), reverse=True)
        for c in found[name]:
            if c.method == "teacher":
                steps = [s for s in extra if s != stage.sampler.steps]
            else:  # a one-step consistency student at several step counts; any other at its own
                steps = [s for s in consistency_steps if s != c.steps] if c.sampler == "consistency" else []
            plan = EvalPlan.from_recipe(recipe, stages=[name], modes=["gt"], metrics=metrics, steps=steps, **plan_kw)
            folder = _link_folder(out / "weights" / f"{name}-{c.label}", {name: c})
            if progress:
                print(f"eval-nfe: {name} {c.label} ({'gt input' if stage.kind != 'base' else 'from text'})",
                      file=sys.stderr, flush=True)
            report = evaluate(_for_students(recipe, {name: c}), folder, out / "stages" / f"{name}-{c.label}", plan,
                              progress=False, device=device, dtype=dtype, cache=cache, samples=False)
            for r in report["rows"]:
                if c.method == "teacher":
                    label = c.label if r["steps"] == stage.sampler.steps else f"teacher-{r['steps']}"
                else:
                    label = replace(c, sample_steps=r["steps"]).label
                rows.append(dict(label=label, method=c.method, steps=r["steps"], nfe_per_video=r["nfe_per_video"],
                                 seconds_per_video=r["seconds"] / report["data"]["videos"], weights=str(c.path),
                                 **_scores(r)))
        result["stages"][name] = dict(mode="text" if stage.kind == "base" else "gt", rows=rows)

    if whole and stages is None:
        last = recipe.stages[-1]
        metrics_c = [m for m in recipe.eval.metrics if m in ("probes", "quality", "fvd")]
        for label, picks in cascade_combinations(recipe, found, consistency_steps):
            plan = EvalPlan.from_recipe(recipe, stages=[last.name], modes=["cascade"], metrics=metrics_c, steps=[],
                                        **plan_kw)
            slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)
            folder = _link_folder(out / "weights" / f"cascade-{slug}", picks)
            if progress:
                print(f"eval-nfe: cascade {label}", file=sys.stderr, flush=True)
            report = evaluate(_for_students(recipe, picks), folder, out / "cascade" / slug, plan, progress=False,
                              device=device, dtype=dtype, cache=cache, samples=False)
            costs = report["cascade_costs"]
            videos = report["data"]["videos"]
            result["cascade"].append(dict(
                label=label, stages={n: picks[n].label for n in names},
                nfe_per_video=sum(c["nfe_per_video"] for c in costs.values()),
                nfe_per_stage={n: c["nfe_per_video"] for n, c in costs.items()},
                seconds_per_video=sum(c["seconds"] for c in costs.values()) / videos, **_scores(report["rows"][0])))
        result["best"] = best_within(result["cascade"], budget)
    result["videos"] = num_videos or recipe.eval.num_videos
    result["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nfe.md").write_text(markdown(result))
    path = plot(result, out / "nfe.png")
    result["plots"] = [str(path)] if path else []
    (out / "nfe.json").write_text(json.dumps(result, indent=2))
    return result


def _ratios(row: dict, teacher: dict) -> dict:
    """Each final-stage probe as a share of the teacher's (1.0 where the teacher scores 0), and FVD / teacher FVD."""
    shares = {}
    for f in PROBES:
        mine, ref = (row.get("probes") or {}).get(f), (teacher.get("probes") or {}).get(f)
        if mine is not None and ref is not None:
            shares[f] = mine / ref if ref > 0 else 1.0
    fvd = row["fvd"] / teacher["fvd"] if row.get("fvd") is not None and teacher.get("fvd") else None
    return dict(probe_share=shares, fvd_ratio=fvd)


def best_within(rows: list[dict], budget: int) -> dict | None:
    """The student cascade within `budget` evaluations per video that keeps the most of the teachers' quality (the
    passing one with the fewest evaluations; if none passes, the one whose worst probe share is highest), with its
    shares of the teacher's probes, FVD ratio and whether it meets the targets (each probe >= 95 %, FVD <= 110 %)."""
    teacher = next((r for r in rows if r["label"] == "teachers"), None)
    within = [r for r in rows if r["label"] != "teachers" and r["nfe_per_video"] <= budget]
    if teacher is None or not within:
        return None
    judged = []
    for r in within:
        ratios = _ratios(r, teacher)
        probes_ok = bool(ratios["probe_share"]) and all(v >= PROBE_SHARE for v in ratios["probe_share"].values())
        fvd_ok = ratios["fvd_ratio"] is None or ratios["fvd_ratio"] <= FVD_RATIO
        judged.append(dict(label=r["label"], nfe_per_video=r["nfe_per_video"],
                           teacher_nfe_per_video=teacher["nfe_per_video"], seconds_per_video=r["seconds_per_video"],
                           teacher_seconds_per_video=teacher["seconds_per_video"], **ratios,
                           fvd_checked=ratios["fvd_ratio"] is not None, passed=probes_ok and fvd_ok))
    passing = sorted((j for j in judged if j["passed"]), key=lambda j: j["nfe_per_video"])
    if passing:
        return passing[0]
    return max(judged, key=lambda j: (min(j["probe_share"].values(), default=0.0), -(j["fvd_ratio"] or math.inf)))


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def _probe_cells(row: dict) -> list[str]:
    probes = row.get("probes") or {}
    return [_f(probes.get(f)) for f in PROBES]


def markdown(result: dict) -> str:
    lines = [f"# Quality against network evaluations: {result['recipe']}", "",
             f"{result['videos']} held-out videos per row; the same noise for every row. NFE: network evaluations "
             f"per video (a guided teacher step costs two). Probes and SSIM: higher is better; FVD and background "
             f"deviation: lower is better.", ""]
    for name, part in result["stages"].items():
        what = "from text" if part["mode"] == "text" else "alone on ground-truth input"
        lines += [f"## {name} ({what})", "",
                  "| weights | NFE | s / video | color | shape | direction | background | PSNR dB | SSIM |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(part["rows"], key=lambda r: (r["method"] != "teacher", r["method"], -r["nfe_per_video"])):
            lines.append(f"| {r['label']} | {r['nfe_per_video']} | {r['seconds_per_video']:.3f} | "
                         + " | ".join(_probe_cells(r)) + f" | {_f(r['psnr_db'])} | {_f(r['ssim'])} |")
        lines.append("")
    if result["cascade"]:
        lines += ["## The whole cascade (final stage against held-out ground truth)", "",
                  "| cascade | NFE | s / video | color | shape | direction | background | PSNR dB | SSIM | "
                  "background dev. | FVD |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["cascade"]:
            lines.append(f"| {r['label']} | {r['nfe_per_video']} | {r['seconds_per_video']:.3f} | "
                         + " | ".join(_probe_cells(r)) + f" | {_f(r['psnr_db'])} | {_f(r['ssim'])} | "
                         f"{_f(r['background'])} | {_f(r['fvd'], 4)} |")
        lines.append("")
        best = result.get("best")
        if best is None:
            lines.append(f"No student cascade within {result['budget']} evaluations per video.")
        else:
            shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in best["probe_share"].items())
            fvd = "FVD not measured" if best["fvd_ratio"] is None else \
                f"FVD {100 * best['fvd_ratio']:.0f} % of the teacher's"
            verdict = "meets" if best["passed"] else "misses"
            lines.append(f"Best within {result['budget']} evaluations per video: **{best['label']}**, "
                         f"{best['nfe_per_video']} against the teachers' {best['teacher_nfe_per_video']} "
                         f"({best['seconds_per_video']:.3f} against {best['teacher_seconds_per_video']:.3f} s per "
                         f"video); probes {shares} of the teacher's; {fvd}. It {verdict} the targets (each probe "
                         f">= {100 * PROBE_SHARE:.0f} %, FVD <= {100 * FVD_RATIO:.0f} %).")
        lines.append("")
    lines.append(f"Measured in {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """PSNR (gt mode; the base: mean probe accuracy) against NFE per video per stage, a line per method; and the
    cascade's mean final-stage probe accuracy and FVD against its NFE per video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(result["stages"].items())
    count = len(panels) + (2 if result["cascade"] else 0)
    if not count:
        return None
    cols = min(4, count)
    rows_n = math.ceil(count / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.8 * cols, 3.2 * rows_n), squeeze=False)
    flat = list(axes.flat)

    def mean_probe(r):
        values = [v for v in (r.get("probes") or {}).values() if v is not None]
        return sum(values) / len(values) if values else None

    for ax, (name, part) in zip(flat, panels):
        base = part["mode"] == "text"
        for method in dict.fromkeys(r["method"] for r in part["rows"]):
            points = sorted((r["nfe_per_video"], mean_probe(r) if base else r["psnr_db"]) for r in part["rows"]
                            if r["method"] == method)
            points = [p for p in points if p[1] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", linestyle="--" if method == "teacher" else "-", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations per video")
        ax.set_title(f"{name}: {'mean probe accuracy' if base else 'PSNR dB, gt input'} (higher is better)",
                     fontsize=8)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if result["cascade"]:
        cascade_rows = sorted(result["cascade"], key=lambda r: r["nfe_per_video"])
        for ax, (key, title) in zip(flat[len(panels):], ((mean_probe, "cascade: mean final probe (higher is better)"),
                                                          (lambda r: r.get("fvd"), "cascade: FVD (lower is better)"))):
            points = [(r["nfe_per_video"], key(r), r["label"]) for r in cascade_rows if key(r) is not None]
            if not points:  # e.g. no FVD asked for
                ax.axis("off")
                continue
            for x, y, label in points:
                ax.plot([x], [y], marker="s" if label == "teachers" else "o", linestyle="none", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("network evaluations per video")
            ax.set_title(title, fontsize=8)
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=5)
    for ax in flat[count:]:
        ax.axis("off")
    fig.suptitle(f"{result['recipe']}: quality against network evaluations, each point the mean over "
                 f"{result['videos']} held-out videos", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_nfe_command(args) -> int:
    """`cascade eval-nfe RECIPE [--num-videos N] [--budget 10] [--out OUT]`."""
    recipe = load_recipe(args.recipe, args.overrides)
    steps = [int(v) for v in args.teacher_steps.split(",") if v.strip()] if args.teacher_steps else None
    stages = [v.strip() for v in args.stages.split(",") if v.strip()] if args.stages else None
    out = args.out or recipe.run_folder() / "eval" / "nfe"
    result = evaluate_nfe(recipe, out, num_videos=args.num_videos, teacher_steps=steps, budget=args.budget,
                          stages=stages, whole=not args.no_cascade, device=args.device,
                          dtype=args.dtype or recipe.eval.dtype, batch_size=args.batch_size)
    print((out / "nfe.md").read_text())
    print(f"wrote {out / 'nfe.json'}, {out / 'nfe.md'} and {out / 'nfe.png'} ({result['seconds']:.0f} s)")
    return 0

