"""One stage's training run from a recipe (Lightning glue), and its EMA weights as safetensors.

The stage's run folder (`recipe.run_folder(STAGE)`) holds the resolved recipe, the git commit and the environment,
checkpoints (every N steps, atomic, the last K plus last.ckpt), CSV logs, a step journal, sample videos, train.log
(Lightning's messages and library warnings, kept off the screen) and, while a process trains in it, run.lock.
Training again resumes from the newest checkpoint that loads (cascade.lit.runfolder). `fit` is shared by training
and every distillation round.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from cascade.recipe import Recipe
from cascade.recipe.schema import Stage


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import lightning

    return dict(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
                lightning=lightning.__version__, cuda=torch.version.cuda, threads=torch.get_num_threads(),
                slurm_job=os.environ.get("SLURM_JOB_ID"), argv=sys.argv)


def write_run_info(folder: Path, recipe: Recipe, stage: Stage, resume=None) -> None:
    """The resolved recipe, the git commit and the environment; on resume, a changed recipe is reported field by
    field with the step the run resumes from (`resume`: cascade.lit.runfolder.Resume). Written by rank 0 only."""
    from cascade.files import process_rank
    from cascade.lit.runfolder import changed_fields, format_changes

    folder.mkdir(parents=True, exist_ok=True)
    if process_rank() != 0:
        return
    resolved = recipe.model_dump(mode="json")
    path = folder / "recipe.yaml"
    if path.is_file():
        previous = yaml.safe_load(path.read_text()) or {}
        old = next((s for s in previous.get("stages", []) if s.get("name") == stage.name), None)
        changes = [] if old is None else changed_fields(old, stage.model_dump(mode="json"), f"stages.{stage.name}.")
        for part in ("data", "text_encoder"):  # what the stage reads
            changes += changed_fields(previous.get(part), resolved.get(part), f"{part}.")
        if changes:
            where = (f"resuming from step {resume.step} ({resume.path})" if resume is not None and resume.path
                     else "starting from step 0")
            print(f"warning: the recipe of stage {stage.name} changed since {path} was written: "
                  f"{format_changes(changes)}; {where} with the new one (the old one is kept as "
                  f"recipe.previous.yaml)", file=sys.stderr, flush=True)
            path.replace(folder / "recipe.previous.yaml")
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    (folder / "run.json").write_text(json.dumps(dict(stage=stage.name, git_commit=git_commit(),
                                                     environment=environment()), indent=2))


def ensure_dataset(recipe: Recipe) -> None:
    """Write the synthetic dataset when the recipe asks for it and it is not there yet."""
    from cascade.data.shards import MANIFEST

    if recipe.data.kind != "synthetic" or (Path(recipe.data.root) / MANIFEST).is_file():
        return
    from cascade.data.synthetic import write_synthetic

    last = recipe.stages[-1]
    print(f"writing the synthetic dataset to {recipe.data.root}", flush=True)
    write_synthetic(recipe.data.root, count=recipe.data.count, seed=recipe.data.seed, images=recipe.data.images,
                    width=last.width, height=last.height, fps=last.fps, seconds=last.frames / last.fps)


def build_module(recipe: Recipe, stage: Stage, journal: Path | None = None):
    from cascade.lit.module import StageModule
    from cascade.recipe.build import build_augmentation, build_known_frames, build_schedule, build_unet

    torch.manual_seed(stage.train.seed)
    t = stage.train
    return StageModule(
        build_unet(stage, recipe), schedule=build_schedule(stage), parameterization=stage.diffusion.parameterization,
        weighting=stage.diffusion.loss_weighting, augmentation=build_augmentation(stage),
        known_frames=build_known_frames(stage), text_drop_prob=stage.guidance.text_drop_prob, lr=t.lr, optimizer=t.optimizer.name, betas=tuple(t.optimizer.betas),
        weight_decay=t.optimizer.weight_decay, eps=t.optimizer.eps, lr_schedule=t.lr_schedule.kind,
        warmup_steps=t.lr_schedule.warmup_steps, min_lr_ratio=t.lr_schedule.min_lr_ratio, max_steps=t.max_steps,
        ema_decay=t.ema_decay, seed=t.seed, max_nonfinite=t.max_nonfinite, journal=journal,
        recipe_json=json.dumps(dict(recipe=recipe.name, text_encoder=recipe.text_encoder.model_dump(mode="json"),
                                    stage=stage.model_dump(mode="json"))),
    )


def resume_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a run in `folder` resumes from: the newest that loads (cascade.lit.runfolder.find_resume):
    last.ckpt (written at a preemption, at the end, and every `train.checkpoint_every`), else the newest intact
    step-*.ckpt; a file, or under `launch.strategy: fsdp` a folder of shards. None without checkpoints; UserError
    when there are some and none loads."""
    from cascade.lit.runfolder import find_resume

    return find_resume(folder).path


def wandb_run_id(folder: Path, recipe: Recipe, stage: Stage) -> str:
    """One wandb run per run folder: a resumed run continues it, a new folder with the same recipe name starts anew."""
    import hashlib

    return f"{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]}-{recipe.name}-{stage.name}"


def build_trainer(recipe: Recipe, stage: Stage, folder: Path, module, extra_callbacks=(), max_steps: int | None = None,
                  samples: bool = True):
    """The stage's Trainer. A given `max_steps` (a distillation round's) replaces train.max_steps and caps the
    checkpoint cadence; `samples` adds the periodic EMA samples of `logging.sample_every`."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from cascade.lit.callbacks import (AtomicCheckpointIO, Preemption, ResumableCSVLogger, SampleVideos,
                                       StepCheckpoint, StepProgressBar)
    from cascade.recipe.build import build_stage_spec

    t, launch = stage.train, stage.launch
    every = t.checkpoint_every if max_steps is None else min(t.checkpoint_every, max_steps)
    max_steps = t.max_steps if max_steps is None else max_steps
    checkpoints = StepCheckpoint(dirpath=folder / "checkpoints", filename="step-{step:07d}",
                                 every_n_train_steps=every, save_top_k=t.keep_checkpoints,
                                 monitor="global_step", mode="max", save_last=True, auto_insert_metric_name=False,
                                 enable_version_counter=False)
    # SIGUSR1 and SIGTERM: save last.ckpt at a step boundary and stop. Requeueing belongs to the batch script alone
    # (slurm/README.md, "Preemption, time limits, requeue loops").
    preemption = Preemption(folder / "checkpoints" / "last.ckpt")
    callbacks = [checkpoints, preemption, StepProgressBar(), *extra_callbacks]
    if samples and recipe.logging.sample_every is not None:
        crop = t.crop
        size = dict(width=crop.width, height=crop.height) if crop else {}
        if t.crop_frames is not None:
            size["frames"] = t.crop_frames

        def make_spec(net):  # periodic samples: fewer steps, at the training crop
            return build_stage_spec(stage, net, steps=recipe.logging.sample_steps, **size)
        callbacks.append(SampleVideos(folder / "samples", recipe.logging.sample_every, make_spec,
                                      recipe.logging.sample_count))
    loggers = [ResumableCSVLogger(folder, name="logs", version=0)]
    if recipe.logging.wandb is not None:
        import wandb

        if recipe.logging.wandb.mode == "online" and not wandb.login(prompt=False, verify=False):
            from cascade.errors import UserError

            raise UserError("logging.wandb.mode is online but wandb has no API key here: run `wandb login` or set "
                            "WANDB_API_KEY (logging.wandb.mode=offline needs none; `wandb sync` uploads later)")

        from cascade.lit.callbacks import StepWandbLogger

        w = recipe.logging.wandb
        loggers.append(StepWandbLogger(project=w.project, entity=w.entity, offline=w.mode == "offline",
                                       save_dir=str(folder), name=f"{recipe.name}-{stage.name}",
                                       id=wandb_run_id(folder, recipe, stage), resume="allow",
                                       settings=wandb.Settings(silent=True)))
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # Lightning's default would install its own SIGUSR1 requeue handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
    accelerator = launch.accelerator if launch.accelerator != "gpu" else "cuda"
    world = launch.gpus_per_node * launch.nodes
    strategy = launch.strategy if world > 1 else "auto"
    if strategy == "fsdp":  # FSDP2 through ModelParallelStrategy (Lightning's FSDPStrategy is FSDP1 and GPU-only)
        from cascade.lit.sharding import strategy as sharded_strategy

        strategy = sharded_strategy(world)
        plugins = [p for p in plugins if not isinstance(p, AtomicCheckpointIO)]  # its checkpoints are folders
    return L.Trainer(
        accelerator=accelerator, devices=launch.gpus_per_node, num_nodes=launch.nodes, strategy=strategy,
        precision=t.precision, max_steps=max_steps, gradient_clip_val=t.grad_clip,
        accumulate_grad_batches=t.accumulate_grad_batches, callbacks=callbacks, logger=loggers,
        default_root_dir=folder, deterministic=t.deterministic or None,
        log_every_n_steps=recipe.logging.every_n_steps, use_distributed_sampler=False, limit_val_batches=0,
        num_sanity_val_steps=0, enable_model_summary=False, plugins=plugins, max_epochs=-1,
    )


def fit(recipe: Recipe, stage: Stage, folder: Path, module, extra_callbacks=(), label: str | None = None,
        max_steps: int | None = None, samples: bool = True):
    """Fit `module` on the stage's data in `folder`, resuming from its newest checkpoint that loads; returns the
    trainer. Shared by training and every distillation round (which sets its own `max_steps`, without samples);
    `stage.train` sets the checkpoint cadence and precision. Library warnings and Lightning's messages go to
    FOLDER/train.log, not to the screen; the bad-sample counts are printed at the end."""
    from cascade.lit.data import StageDataModule
    from cascade.lit.runfolder import describe_skipped, find_resume
    from cascade.recipe.build import build_stage_loader, build_text_source

    resume = find_resume(folder)
    write_run_info(folder, recipe, stage, resume)
    if stage.train.deterministic:
        torch.use_deterministic_algorithms(True)
    text = build_text_source(recipe)
    data = StageDataModule(lambda rank, world: build_stage_loader(stage, recipe, rank, world, text_source=text))
    with library_messages_to(folder / "train.log") as diverted:
        trainer = build_trainer(recipe, stage, folder, module, extra_callbacks, max_steps, samples)
        if trainer.is_global_zero:
            for path, why in resume.skipped:
                print(describe_skipped(path, why), flush=True)
            if resume.path is not None:
                print(f"resuming {label or stage.name} from {resume.path} (step {resume.step})", flush=True)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume.path, weights_only=True)
        finally:  # end this run's wandb run: the next fit() in this process would otherwise log into it
            from lightning.pytorch.loggers import WandbLogger

            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                    logger.experiment.finish()
    if trainer.is_global_zero:
        print(data.report(), flush=True)
        if diverted.count:
            print(f"{diverted.count} library warnings are in {folder / 'train.log'}", flush=True)
    return trainer


class _Diverted:
    count = 0


@contextmanager
def library_messages_to(log: Path):
    """Python warnings and Lightning's log messages of this block go to `log` (appended), not to the screen: the
    screen keeps the bar and what cascade itself says. Yields an object whose `count` is the warnings written."""
    import logging
    import warnings

    log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    # cascade.data: one line per skipped sample (its shard, key and reason); the screen gets the counts at the end
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "cascade.data")]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    diverted = _Diverted()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        diverted.count += 1
        handler.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning {category.__name__} "
                             f"({filename}:{lineno}): {message}\n")
        handler.stream.flush()

    for logger in loggers:
        logger.handlers, logger.propagate = [handler], False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield diverted
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


def check_text_encoder(recipe: Recipe) -> None:
    """Fail before any work when the recipe's text encoder cannot be loaded here (FileNotFoundError), or its
    width (config.json's d_model) or the embedding cache's is not text_encoder.dim (UserError)."""
    from cascade.errors import UserError
    from cascade.nn.text import locate_text_encoder
    from cascade.recipe.build import dataset_folder, embeddings_folder

    te = recipe.text_encoder
    try:
        where = locate_text_encoder(te.path)
    except FileNotFoundError as error:
        hint = (f"; build it with `cascade data tiny-t5 --shards {dataset_folder(recipe)} --out {te.path}` "
                f"(--tokenizer FILE to use an existing sentencepiece tokenizer)" if te.build_tiny else "")
        raise FileNotFoundError(f"text_encoder.path: {error}{hint}") from None
    if where == "folder":  # the width the U-Nets' cross-attention is built for must be the encoder's
        config = Path(te.path) / "config.json"
        try:
            d_model = json.loads(config.read_text()).get("d_model")
        except (OSError, ValueError, AttributeError) as error:
            raise UserError(f"{config}: not a readable T5 config ({type(error).__name__}: {error})") from None
        if d_model is not None and d_model != te.dim:
            raise UserError(f"text_encoder.dim is {te.dim}, but the T5 at {te.path} has d_model {d_model} "
                            f"({config}): set text_encoder.dim={d_model}")
    parts = sorted(Path(embeddings_folder(recipe)).glob("part-*-of-*.safetensors"))
    if parts:  # the cached embeddings' width too (their max_tokens is checked when the loader opens them)
        from cascade.loading import safetensors_metadata

        dim = safetensors_metadata(parts[0], "embedding cache part").get("dim")
        if dim is not None and str(dim) != str(te.dim):
            raise UserError(f"{parts[0]}: embedding cache of width {dim}, but text_encoder.dim is {te.dim}: it was "
                            f"built with another encoder; rebuild it with `cascade data embed --shards "
                            f"{dataset_folder(recipe)} --encoder {te.path} --max-tokens {te.max_tokens}`")


def train(recipe: Recipe, stage_name: str, extra_callbacks=(), module_hook=None) -> Path:
    """Train (or resume) one stage. Returns the run folder. The folder is locked first (a second process is
    refused), and SIGTERM or SIGUSR1 before the first step stops the run cleanly (UserError, exit 128 + signal)."""
    from cascade.lit.runfolder import StartupInterrupted, interruptible_startup, locked, startup_error

    stage = recipe.stage(stage_name)
    folder = recipe.run_folder(stage.name)
    try:
        with interruptible_startup(), locked(folder):
            ensure_dataset(recipe)
            check_text_encoder(recipe)
            module = build_module(recipe, stage, journal=folder / "train_steps.jsonl")
            if module_hook is not None:
                module_hook(module)
            fit(recipe, stage, folder, module, extra_callbacks)
    except StartupInterrupted as error:
        raise startup_error(error, f"stage {stage.name}", f"rerun `cascade train` to start (or resume) {folder}"
                            ) from None
    return folder


def ema_weights(checkpoint: str | Path) -> tuple[dict, dict]:
    """(EMA weights, the rest of the checkpoint) of a training checkpoint, a file or a sharded folder (assembled
    in this process); tensors only: nothing is unpickled."""
    from cascade.errors import UserError
    from cascade.loading import load_torch

    prefix = "ema.module."
    if Path(checkpoint).is_dir():
        from cascade.lit.sharding import read_tensors

        index = sharded_index(checkpoint)
        keys = [k for k in index if k.startswith("state_dict." + prefix)]
        weights = {k[len("state_dict." + prefix):]: v for k, v in read_tensors(checkpoint, keys, index).items()}
        state = sharded_meta(checkpoint)
    else:
        state = load_torch(checkpoint, "training checkpoint")
        found = state.get("state_dict")
        weights = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)} if isinstance(
            found, dict) else {}
    if not weights:
        raise UserError(f"{checkpoint}: no EMA weights (keys 'ema.module.*') in this checkpoint: not a training "
                        f"checkpoint of cascade train")
    return weights, state


def sharded_meta(checkpoint: str | Path) -> dict:
    """Lightning's metadata of a sharded checkpoint folder, or UserError naming the folder and what is missing."""
    from cascade.errors import UserError
    from cascade.lit.sharding import META, checkpoint_complete
    from cascade.loading import load_torch

    if not checkpoint_complete(Path(checkpoint)):
        raise UserError(f"{checkpoint}: a folder, but not a complete sharded checkpoint (it needs .metadata and {META})")
    return load_torch(Path(checkpoint) / META, "checkpoint")


def sharded_index(checkpoint: str | Path) -> dict:
    """The tensor index of a sharded checkpoint folder, or UserError when its .metadata does not read."""
    from cascade.errors import UserError, short_repr
    from cascade.lit.sharding import tensor_index

    sharded_meta(checkpoint)
    try:
        return tensor_index(checkpoint)
    except Exception as error:  # noqa: BLE001 - a damaged index is that folder's fault
        raise UserError(f"{checkpoint}: the sharded checkpoint's .metadata does not read: {type(error).__name__}: "
                        f"{short_repr(str(error).splitlines()[0] if str(error) else '', 160)}") from None


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """EMA weights of a training checkpoint as safetensors, the resolved stage recipe in the metadata. From a
    sharded checkpoint folder the EMA is gathered one block at a time (cascade.lit.sharding.ema_groups). `out`
    must end in .safetensors (UserError otherwise: a .pt name would promise another format)."""
    from cascade.errors import UserError
    from cascade.weights import WeightsInfo, save_weights, save_weights_streaming

    if Path(out).suffix != ".safetensors":
        raise UserError(f"--out {out}: export writes safetensors; name the file STAGE.safetensors (e.g. "
                        f"{Path(out).with_suffix('.safetensors').name})")

    def described(state: dict) -> dict:
        info = json.loads(state.get("cascade", {}).get("recipe", "{}"))
        return {"cascade.stage": json.dumps(info.get("stage", {})), "cascade.recipe": str(info.get("recipe", "")),
                "cascade.text_encoder": json.dumps(info.get("text_encoder", {})),
                "cascade.global_step": str(state.get("global_step", ""))}

    if Path(checkpoint).is_dir():
        from cascade.lit.sharding import ema_groups, read_tensors

        full = "state_dict.ema.module."
        index = sharded_index(checkpoint)
        groups = ema_groups(index, full)
        if not groups:
            raise UserError(f"{checkpoint}: no EMA weights (keys 'ema.module.*') in this checkpoint")

        def loader(keys):
            return lambda: {k[len(full):]: v for k, v in read_tensors(checkpoint, keys, index).items()}
        return save_weights_streaming(
            out, {k[len(full):]: index[k] for group in groups for k in group},
            [([k[len(full):] for k in keys], loader(keys)) for keys in groups], WeightsInfo(kind="ema"),
            described(sharded_meta(checkpoint)))
    weights, state = ema_weights(checkpoint)
    return save_weights(out, weights, WeightsInfo(kind="ema"), described(state))
