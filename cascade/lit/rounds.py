"""A stage's distillation as Lightning runs: the rounds the recipe describes (`recipe.build.build_distillation_rounds`),
each a `DistillModule` fitted in its own run folder (RUN/STAGE/distill/ROUND, with checkpoints and exact resume), each
student saved with what it is (`cascade.weights.WeightsInfo`) and its lineage."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cascade.files import file_sha256, process_rank, wait_for
from cascade.recipe import Recipe
from cascade.recipe.schema import Stage
from cascade.weights import WeightsInfo, save_weights


def teacher_weights(recipe: Recipe, stage: Stage, teacher: str | Path | None) -> tuple[dict, Path, dict]:
    """The trained stage's EMA weights, their file and its metadata: a safetensors file, or the EMA part of the
    stage's last checkpoint (read through cascade.loading: a file that is not one is a one-line UserError)."""
    from cascade.lit.sharding import checkpoint_complete
    from cascade.lit.train import ema_weights
    from cascade.weights import read_weights

    path = Path(teacher) if teacher is not None else recipe.run_folder(stage.name) / "checkpoints" / "last.ckpt"
    if not checkpoint_complete(path):
        raise FileNotFoundError(f"{path}: no trained weights for stage {stage.name}; train it first "
                                f"(`cascade train RECIPE --stage {stage.name}`) or pass --teacher FILE")
    if path.suffix == ".safetensors":
        tensors, metadata = read_weights(path, f"teacher weights file of stage {stage.name}")
        return tensors, path, metadata
    return ema_weights(path)[0], path, {}


def check_fits(net: nn.Module, state: dict, path: Path, metadata: dict, recipe: Recipe, stage: Stage) -> None:
    """UserError naming the file and the recipe fields it was trained with otherwise when `state` does not fit
    `net` (cascade.weights.explain_mismatch), instead of load_state_dict's size-mismatch traceback."""
    from cascade.errors import UserError
    from cascade.weights import explain_mismatch, meaning_mismatch, tensor_mismatch

    problem = tensor_mismatch(net.state_dict(), state)
    if problem is not None:
        raise UserError(explain_mismatch(path, stage.name, metadata, stage.model_dump(mode="json"),
                                         recipe.text_encoder.model_dump(mode="json"), problem))
    problem = meaning_mismatch(path, stage.name, metadata, stage.model_dump(mode="json"))
    if problem is not None:
        raise UserError(problem)


def full_weights(net: nn.Module) -> dict:
    """The network's whole weights on CPU; a sharded one's gathered (all ranks call this; rank 0 gets them)."""
    from cascade.lit.sharding import is_sharded

    if not is_sharded(net):
        return net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_student(weights: dict, path: Path, recipe: Recipe, stage: Stage, info: WeightsInfo, lineage: list) -> Path:
    """The student's weights with its description, the resolved stage recipe and its lineage."""
    return save_weights(path, weights, info, {
        "cascade.stage": json.dumps(stage.model_dump(mode="json")), "cascade.recipe": recipe.name,
        "cascade.text_encoder": json.dumps(recipe.text_encoder.model_dump(mode="json")),
        "cascade.lineage": json.dumps(lineage)})


def distill(recipe: Recipe, stage_name: str, teacher: str | Path | None = None, extra_callbacks=()) -> Path:
    """Run the stage's distillation rounds in order; a finished round (its student.safetensors exists) is skipped,
    so rerunning continues after a crash. Each round's student starts from its teacher (the previous student).
    The final student is copied to RUN/distilled/STAGE.safetensors. RUN/STAGE/distill is locked for the whole
    distillation, and a signal before a round's first step stops it cleanly (as `cascade.lit.train.train`)."""
    from cascade.lit.runfolder import StartupInterrupted, interruptible_startup, locked, startup_error

    stage = recipe.stage(stage_name)
    folder = recipe.run_folder(stage.name) / "distill"
    try:
        with interruptible_startup(), locked(folder, "distillation folder"):
            return _distill(recipe, stage, teacher, extra_callbacks)
    except StartupInterrupted as error:
        raise startup_error(error, f"distillation of stage {stage.name}", f"rerun `cascade distill` to continue "
                            f"{folder}") from None


def _distill(recipe: Recipe, stage: Stage, teacher: str | Path | None, extra_callbacks) -> Path:
    from safetensors.torch import load_file

    from cascade.lit.distill import DistillModule
    from cascade.lit.train import check_text_encoder, ensure_dataset, fit
    from cascade.recipe.build import build_augmentation, build_distillation_rounds, build_known_frames, build_unet

    ensure_dataset(recipe)
    check_text_encoder(recipe)
    rounds = build_distillation_rounds(stage)
    state, source, metadata = teacher_weights(recipe, stage, teacher)
    lineage = [dict(kind="teacher", path=str(source), sha256=file_sha256(source),
                    steps=stage.distill.progressive.start_steps)]
    teacher_guided = False
    for r in rounds:
        method = r.method
        folder = recipe.run_folder(stage.name) / "distill" / r.name
        student_file = folder / "student.safetensors"
        if not student_file.is_file():
            torch.manual_seed(stage.train.seed)
            teacher_net = build_unet(stage, recipe, guidance_conditioning=teacher_guided)
            check_fits(teacher_net, state, source, metadata, recipe, stage)
            teacher_net.load_state_dict(state)
            student_net = build_unet(stage, recipe, guidance_conditioning=method.guidance_input)
            missing = student_net.load_state_dict(state, strict=False).missing_keys  # new: the w embedding only
            if any(not k.startswith("guidance_emb.") for k in missing):
                raise ValueError(f"stage {stage.name}: the teacher's weights do not fit the student: missing "
                                 f"{missing[:5]}")
            module = DistillModule(student_net, teacher_net, method, parameterization=stage.diffusion.parameterization,
                                   augmentation=build_augmentation(stage), text_drop_prob=stage.guidance.text_drop_prob,
                                   lr=r.lr, max_steps=r.max_steps, seed=stage.train.seed,
                                   journal=folder / "train_steps.jsonl", lineage=dict(rounds=lineage),
                                   known_frames=build_known_frames(stage))
            w = method.w_range
            print(f"== distilling {stage.name}: {method.name} to {method.student_steps} steps"
                  + (f", w in [{w[0]:g}, {w[1]:g}]" if w else ""), flush=True)
            trainer = fit(recipe, stage, folder, module, extra_callbacks, label=str(folder), max_steps=r.max_steps,
                          samples=False)
            if trainer.global_step < r.max_steps:  # stopped by a signal: the round is not finished
                raise SystemExit(0)
            weights = full_weights(module.student)  # collective when sharded: every rank takes part
            if trainer.is_global_zero:  # one writer; the other ranks read what it wrote
                info = WeightsInfo(kind="distilled", method=method.name, steps=method.student_steps,
                                   sampler=method.sampler, guidance_input=method.guidance_input,
                                   w_range=w)
                save_student(weights, student_file, recipe, stage, info, lineage)
            else:
                wait_for(student_file)
        state = load_file(str(student_file))
        teacher_guided = method.guidance_input
        lineage = [*lineage, dict(kind=method.name, path=str(student_file), sha256=file_sha256(student_file),
                                  steps=method.student_steps)]
    final = recipe.run_folder() / "distilled" / f"{stage.name}.safetensors"
    if process_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(Path(lineage[-1]["path"]).read_bytes())
        tmp.replace(final)
    return final
