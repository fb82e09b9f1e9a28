"""The run report (RUN/report.md): what the job graph produced, with the figures that say whether it learned.

Reads RUN/graph.json (wall time per node), RUN/eval/{teachers,distilled}/eval.json, RUN/tools/tools.json (the video
tools' figures, `cascade.eval.tools`), samples a few held-out captions
through both cascades (gifs under RUN/report/) and writes one markdown file that links the plots and the gifs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cascade.recipe import Recipe

__all__ = ["write_report", "final_scores", "report_captions"]

FIELDS = ("color", "shape", "direction", "background")
QUALITY = {  # cascade.eval.quality's measures: the column and what it means
    "psnr_db": "psnr_db: PSNR against the ground truth clip, dB (higher is better)",
    "ssim": "ssim: SSIM against it (higher is better, 1 at most)",
    "background": "background: mean |pixel - the caption's background colour| over the pixels that are background "
                  "in both the video and its ground truth, uint8 levels (lower is better; the ground truth's own is "
                  "its codec's)",
}


def final_scores(report: dict, stage: str) -> dict | None:
    """The recipe-setting row of `stage` with generated inputs (the whole cascade), or text-only for a base."""
    for row in report["rows"]:
        if row["stage"] == stage and row["mode"] in ("cascade", "text") and len(row["axes"]) == 3:
            return row
    return None


def report_captions(recipe: Recipe, count: int) -> list[str]:
    """Captions for the report's samples: one per held-out combination (synthetic data), in a fixed order."""
    if recipe.data.kind != "synthetic":
        return []
    from cascade.data.synthetic import HELD_OUT, sample_scene

    found: dict[tuple, str] = {}
    rng = np.random.default_rng(12345)
    while len(found) < min(count, len(HELD_OUT)):
        scene = sample_scene(rng, "heldout")
        found.setdefault(scene.combo, scene.caption)
    return [found[c] for c in HELD_OUT if c in found][:count]


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.1f} %"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _relative(path: str, run: Path) -> str:
    p = Path(path).resolve()
    return p.relative_to(run.resolve()).as_posix() if p.is_relative_to(run.resolve()) else str(path)


def _tools_section(tools: dict, run: Path) -> list[str]:
    from cascade.eval.tools import check_table

    seconds = ", ".join(f"{k} {v:.0f}" for k, v in tools.get("seconds", {}).items())
    lines = ["## Video tools", "", f"The distilled cascade's tools on {tools['videos']} held-out synthetic videos each "
             f"(details: [tools/tools.md](tools/tools.md); seconds: {seconds}).", "", *check_table(tools["checks"]), ""]
    lines += [f"![video tools]({_relative(p, run)})" for p in tools.get("plots", [])]
    examples = tools.get("examples", {})
    if examples:
        lines += ["", "| " + " | ".join(examples) + " |", "|" + "---|" * len(examples),
                  "| " + " | ".join(f"![{k}]({_relative(p, run)})" for k, p in examples.items()) + " |"]
    return lines + [""]


def nfe_section(nfe: dict, run: Path) -> list[str]:
    """The report's part of `cascade eval-nfe`'s result: the whole-cascade table, the best student cascade within
    the budget against its targets, and the plot (the per-stage tables stay in eval/nfe/nfe.md)."""
    from cascade.eval.nfe import markdown

    text = markdown(nfe)
    start = text.find("## The whole cascade")
    body = text[start:].splitlines()[1:] if start >= 0 else ["No whole-cascade rows (eval-nfe ran with --no-cascade)."]
    lines = ["## Quality against network evaluations", "",
             f"`cascade eval-nfe` on {nfe['videos']} held-out videos per row (per stage: "
             f"[eval/nfe/nfe.md](eval/nfe/nfe.md)).", *body]
    lines += [f"![quality against network evaluations]({_relative(p, run)})" for p in nfe.get("plots", [])]
    return lines + [""]


def _tools_summary(tools: dict) -> dict:
    """report.json's tools entry: the checks, seconds and example paths (tools.json keeps the per-video rows)."""
    return dict(checks=tools["checks"], seconds=tools.get("seconds", {}), examples=tools.get("examples", {}),
                plots=tools.get("plots", []),
                passed=all(c["passed"] is not False for c in tools["checks"]))


def write_report(recipe: Recipe, run: Path, samples: int = 4, device=None, dtype: str = "float32") -> Path:
    from cascade.inference import Cascade, write_samples

    last = recipe.stages[-1].name
    graph = json.loads((run / "graph.json").read_text()) if (run / "graph.json").is_file() else {}
    evals = {}
    for which in ("teachers", "distilled"):
        path = run / "eval" / which / "eval.json"
        if path.is_file():
            evals[which] = json.loads(path.read_text())
    lines = [f"# Run report: `{recipe.name}`", ""]
    summary = {}

    # The cascade's final output for held-out captions, teacher against distilled.
    if evals:
        first = next(iter(evals.values()))
        gt = first["ground_truth"].get(last, {}).get("probes", {})
        # the probes that scored something (none on real data): no column of dashes only
        fields = [f for f in FIELDS if gt.get(f) is not None or any(
            (final_scores(r, last) or {}).get("probes", {}).get(f) is not None for r in evals.values())]
        gt_quality = first["ground_truth"].get(last, {}).get("quality", {})
        measures = [m for m in QUALITY if gt_quality.get(m) is not None or any(
            (final_scores(r, last) or {}).get("quality", {}).get(m) is not None for r in evals.values())]
        lines += [f"Final stage `{last}` ({recipe.stages[-1].frames} frames, {recipe.stages[-1].width}x"
                  f"{recipe.stages[-1].height} at {recipe.stages[-1].fps:g} fps), {first['data']['videos']} videos "
                  f"of {first['data']['what']}, every stage fed the previous stage's samples. Probes: share of "
                  f"videos whose attribute read from the pixels is the caption's (higher is better)"
                  + ("; " + "; ".join(QUALITY[m] for m in measures) if measures else "") + ".", "",
                  "| cascade | steps per stage | NFE per video | sampling s per video |"
                  + "".join(f" probe {f} |" for f in fields) + "".join(f" {m} |" for m in measures),
                  "|---|---|---|---|" + "---|" * (len(fields) + len(measures))]
        for which, report in evals.items():
            rows = {r["stage"]: final_scores(report, r["stage"]) for r in report["rows"]}
            chain = [rows.get(s.name) for s in recipe.stages]
            if any(r is None for r in chain):
                continue
            nfe = sum(r["nfe_per_video"] for r in chain)
            seconds = sum(r["seconds"] for r in chain) / report["data"]["videos"]
            probes, quality = chain[-1].get("probes", {}), chain[-1].get("quality", {})
            summary[which] = dict(probes=probes, nfe_per_video=nfe, seconds_per_video=seconds,
                                  steps={r["stage"]: r["steps"] for r in chain},
                                  fvd=chain[-1].get("fvd"), quality=quality)
            steps = ", ".join(str(r["steps"]) for r in chain)
            lines.append(f"| {which} | {steps} | {nfe} | {seconds:.2f} |"
                         + "".join(f" {_fmt(probes.get(f), True)} |" for f in fields)
                         + "".join(f" {_fmt(quality.get(m))} |" for m in measures))
        if (gt and fields) or gt_quality:
            lines.append("| ground truth | – | – | – |" + "".join(f" {_fmt(gt.get(f), True)} |" for f in fields)
                         + "".join(f" {_fmt(gt_quality.get(m))} |" for m in measures))
        if "teachers" in summary and "distilled" in summary:
            t, d = summary["teachers"]["probes"], summary["distilled"]["probes"]
            kept = {f: d[f] / t[f] for f in FIELDS if t.get(f) and d.get(f) is not None}
            summary["distilled_keeps"] = kept
            if kept:
                lines += ["", "Distilled / teacher: " + ", ".join(f"{f} {100 * v:.0f} %" for f, v in kept.items())
                          + "."]
        if any(s.get("fvd") is not None for s in summary.values() if isinstance(s, dict) and "probes" in s):
            lines += ["", "FVD of the final stage: " + ", ".join(
                f"{w} {_fmt(s['fvd'])}" for w, s in summary.items() if isinstance(s, dict) and s.get("fvd") is not None)
                + f" (I3D, {recipe.eval.frames} frames; {next(iter(evals.values()))['data']['videos']} videos "
                "against as many held-out ground-truth clips: with so few videos a coarse figure, for comparing "
                "runs of this recipe)."]
        lines.append("")
        for which in evals:
            lines.append(f"Every stage and setting: [eval/{which}/eval.md](eval/{which}/eval.md).")
            for plot in evals[which].get("plots", []):
                rel = Path(plot).resolve().relative_to(run.resolve()) if Path(plot).resolve().is_relative_to(
                    run.resolve()) else Path(plot)
                lines.append(f"![{which} {rel.stem}]({rel.as_posix()})")
        lines.append("")

    # Samples for held-out captions.
    captions = report_captions(recipe, samples)
    if captions and evals:
        lines += ["## Samples for held-out captions", "", "| caption | " + " | ".join(evals) + " |",
                  "|---|" + "---|" * len(evals)]
        outputs = {}
        for which in evals:
            out = run / "report" / which / "sample.gif"
            cascade = Cascade.from_recipe(recipe, run / which, device=device, dtype=dtype)
            result = write_samples(cascade, captions, out, batch_size=len(captions))
            outputs[which] = [Path(o["video"]) for o in result["outputs"]]
        for i, caption in enumerate(captions):
            cells = [f"![{w}]({outputs[w][i].resolve().relative_to(run.resolve()).as_posix()})" for w in evals]
            lines.append(f"| {caption} | " + " | ".join(cells) + " |")
        summary["samples"] = {w: [str(p) for p in paths] for w, paths in outputs.items()}
        lines.append("")

    # The video tools (synthetic data): every figure against its target, the plot, an example of each tool.
    tools_json = run / "tools" / "tools.json"
    if tools_json.is_file():
        lines += _tools_section(json.loads(tools_json.read_text()), run)
        summary["tools"] = _tools_summary(json.loads(tools_json.read_text()))

    # Quality against network evaluations (`cascade eval-nfe`), when it has been run on this run folder.
    nfe_json = run / "eval" / "nfe" / "nfe.json"
    if nfe_json.is_file():
        nfe = json.loads(nfe_json.read_text())
        lines += nfe_section(nfe, run)
        summary["nfe"] = dict(cascade=nfe.get("cascade", []), best=nfe.get("best"), budget=nfe.get("budget"))

    # Wall time of the graph.
    if graph:
        lines += ["## Wall time per node", "", "| node | seconds |", "|---|---|"]
        lines += [f"| {name} | {entry['seconds']:.0f} |" for name, entry in graph.items()]
        total = sum(e["seconds"] for e in graph.values())
        lines += [f"| **sum** (with --jobs > 1 nodes overlap: the wall time is less) | {total:.0f} |", ""]
        summary["graph_seconds"] = {name: entry["seconds"] for name, entry in graph.items()}
    (run / "report.json").write_text(json.dumps(summary, indent=2))
    path = run / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
