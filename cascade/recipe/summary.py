"""A recipe's stages as rows and as the table `cascade validate` prints (shapes, parameter counts, samplers)."""

from __future__ import annotations

from pathlib import Path

from cascade.recipe.schema import Recipe


def stage_rows(recipe: Recipe) -> list[dict]:
    """One dict per stage: name, kind, input, input and output shape [frames, width, height, fps], parameters,
    sampler (KIND/STEPS)."""
    from cascade.recipe.build import count_parameters

    rows = []
    for stage in recipe.stages:
        source = recipe.stage(stage.input) if stage.input else None
        rows.append(dict(
            name=stage.name, kind=stage.kind, input=stage.input,
            input_shape=None if source is None else [source.frames, source.width, source.height, source.fps],
            output_shape=[stage.frames, stage.width, stage.height, stage.fps],
            parameters=count_parameters(stage, recipe),
            sampler=f"{stage.sampler.kind}/{stage.sampler.steps}",
        ))
    return rows


def _shape(shape) -> str:
    frames, width, height, fps = shape
    return f"{frames}x{width}x{height}@{fps:g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_stages(recipe: Recipe, source: str | Path) -> str:
    """The table of `cascade validate`: a header line, one row per stage, the total parameter count."""
    rows = stage_rows(recipe)
    header = f"{'stage':<8} {'kind':<5} {'input':<18} {'output':<18} {'params':>9}  sampler"
    lines = [f"{source}: {recipe.name}, {len(rows)} stages, text encoder {recipe.text_encoder.path}", header,
             "-" * len(header)]
    for row in rows:
        inputs = "noise + text" if row["input_shape"] is None else _shape(row["input_shape"])
        lines.append(f"{row['name']:<8} {row['kind']:<5} {inputs:<18} {_shape(row['output_shape']):<18} "
                     f"{_count(row['parameters']):>9}  {row['sampler']}")
    total = sum(r["parameters"] for r in rows)
    lines.append(f"total: {total / 1e9:.2f}B parameters" if total >= 1e9 else f"total: {total / 1e6:.2f}M parameters")
    return "\n".join(lines)
