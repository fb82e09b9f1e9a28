"""The LightningModule of one distillation round: guidance distillation (Meng et al. 2023, stage 1) or one halving
of progressive distillation (Salimans & Ho 2022, Alg. 2). The targets are `cascade.distill`'s pure functions, which
step with the samplers' own `ddim_step` on the samplers' `time_grid`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from cascade.data.loader import to_model_input
from cascade.diffusion import Denoiser, NoiseAugmentation, drop_captions, sample_logsnr_train
from cascade.diffusion.param import append_dims
from cascade.diffusion.schedule import alpha_sigma
from cascade.files import file_sha256, process_rank, wait_for
from cascade.lit.randomness import StepRandomness
from cascade.distill.targets import distillation_loss, guided_target, progressive_target, sample_student_levels
from cascade.sampling.steps import time_grid


class DistillModule(L.LightningModule):
    """`mode="guidance"`: the student (which takes the guidance weight w as input) learns (1+w) x_cond - w x_uncond
    of the teacher, w ~ U[w_min, w_max], at continuous noise levels. `mode="progressive"`: the student learns in one
    DDIM step what its teacher does in two, on the discrete N-step grid; a guidance-distilled teacher gets the same
    w as the student."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mode: str, schedule: Callable[[Tensor], Tensor],
                 parameterization: str = "v", num_steps: int = 8, w_range: tuple[float, float] = (0.0, 4.0),
                 guided: bool = True, weighting: str = "truncated_snr", augmentation: NoiseAugmentation | None = None,
                 text_drop_prob: float = 0.0, lr: float = 1e-4, max_steps: int = 1000, seed: int = 0,
                 journal: str | Path | None = None, lineage: dict | None = None) -> None:
        super().__init__()
        if mode not in ("guidance", "progressive"):
            raise ValueError(f"mode must be 'guidance' or 'progressive', got {mode!r}")
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.student_x = Denoiser(student, parameterization)
        self.teacher_x = Denoiser(teacher, parameterization)
        self.mode, self.schedule, self.num_steps, self.w_range, self.guided = mode, schedule, num_steps, w_range, guided
        self.weighting, self.augmentation, self.text_drop_prob = weighting, augmentation, text_drop_prob
        self.lr, self.max_steps, self.seed = lr, max_steps, seed
        self.journal = None if journal is None else Path(journal)
        self.lineage = lineage or {}
        self.randomness = StepRandomness(seed)
        self._last_time: float | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (dropout off)
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.randomness.restore_global()
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "consumed"):
            datamodule.consumed(batch)
        inputs = to_model_input(batch, self.device)
        x = inputs["video"]  # (B, 3, T, H, W) in [-1, 1]
        batch_size, g = x.shape[0], self.randomness.next(self.device, self.global_rank)
        cond = dict(text=inputs["text"], text_mask=drop_captions(inputs["text_mask"], self.text_drop_prob, g),
                    fps=inputs["fps"], is_image=inputs["is_image"])
        if "cond" in inputs:
            if self.augmentation is not None:
                low, aug = self.augmentation.train(inputs["cond"], generator=g)
            else:
                low, aug = inputs["cond"], torch.full((batch_size,), 20.0, device=self.device)
            cond.update(cond=low, aug_logsnr=aug)
        w_min, w_max = self.w_range
        w = w_min + (w_max - w_min) * torch.rand(batch_size, generator=g, device=self.device)
        noise = torch.randn(x.shape, generator=g, device=self.device, dtype=x.dtype)
        if self.mode == "guidance":
            # Half the samples at continuous levels, half on the N-step grid the first halving's teacher runs on:
            # continuous t alone almost never reaches the top step (SNR ~ 0), the first step of every sampler.
            logsnr = sample_logsnr_train(batch_size, self.schedule, generator=g, device=self.device).float()
            on_grid = torch.rand(batch_size, generator=g, device=self.device) < 0.5
            i = sample_student_levels(batch_size, self.num_steps, generator=g, device=self.device)
            logsnr = torch.where(on_grid, time_grid(self.num_steps, self.schedule).to(self.device)[i].float(), logsnr)
            z = self._noised(x, noise, logsnr)
            uncond = {**cond, "text_mask": torch.zeros_like(cond["text_mask"])}
            target = guided_target(lambda z_, l_: self.teacher_x(z_, l_, **cond),
                                   lambda z_, l_: self.teacher_x(z_, l_, **uncond), z, logsnr, w)
        else:
            i = sample_student_levels(batch_size, self.num_steps, generator=g, device=self.device)
            logsnr = time_grid(self.num_steps, self.schedule).to(self.device)[i].float()
            z = self._noised(x, noise, logsnr)
            teacher_cond = {**cond, "guidance": w} if self.guided else cond
            target, _ = progressive_target(self.teacher_x, z, i, self.num_steps, self.schedule, **teacher_cond)
        student_cond = {**cond, "guidance": w} if self.guided else cond
        x_hat = self.student_x(z, logsnr, **student_cond)
        loss = distillation_loss(x_hat, target, logsnr, self.weighting).mean()
        self.log("distill/loss", loss, prog_bar=True)
        self.log("global_step", float(self.global_step))
        self._journal(loss, batch)
        return loss

    @staticmethod
    def _noised(x: Tensor, noise: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = (append_dims(c, x.ndim) for c in alpha_sigma(logsnr))
        return alpha * x + sigma * noise  # z_t = alpha x + sigma eps

    def _journal(self, loss: Tensor, batch: dict) -> None:
        if self.journal is None or self.global_rank != 0:
            return
        now = time.perf_counter()
        seconds, self._last_time = now - self._last_time, now
        record = dict(step=self.global_step, micro=self.randomness.micro_steps - 1, loss=loss.item(), loss_hex=loss.item().hex(),
                      keys=batch["keys"], videos_per_second=len(batch["keys"]) * self.trainer.world_size / seconds
                      if seconds else None)
        with open(self.journal, "a") as file:
            file.write(json.dumps(record) + "\n")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.student.parameters(), lr=self.lr)
        # learning rate annealed linearly to 0 within each round (PD configs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / self.max_steps))
        return dict(optimizer=optimizer, lr_scheduler=dict(scheduler=scheduler, interval="step"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cascade"] = dict(**self.randomness.state(), lineage=json.dumps(self.lineage))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("cascade", {})
        self.randomness.load(state)


# --- the distillation schedule of one stage: guidance distillation, then the halvings -------------------------------

def teacher_weights(recipe, stage, teacher: str | Path | None) -> tuple[dict, Path]:
    """The trained stage's EMA weights: a safetensors file, or the EMA part of the stage's last checkpoint."""
    from safetensors.torch import load_file

    from cascade.lit.train import run_folder

    if teacher is not None:
        path = Path(teacher)
        if path.suffix == ".safetensors":
            return load_file(str(path)), path
    else:
        path = run_folder(recipe, stage) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained weights for stage {stage.name}; train it first "
                                f"(`cascade train RECIPE --stage {stage.name}`) or pass --teacher FILE")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "ema.module."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path


def save_student(net: nn.Module, path: Path, stage, recipe, *, steps: int, guided: bool, w_range, lineage: list) -> Path:
    from safetensors.torch import save_file

    metadata = {"cascade.stage": json.dumps(stage.model_dump(mode="json")), "cascade.recipe": recipe.name,
                "cascade.text_encoder": json.dumps(recipe.text_encoder.model_dump(mode="json")),
                "cascade.weights": "distilled", "cascade.steps": str(steps),
                "cascade.guidance_distilled": "true" if guided else "false",
                "cascade.w_range": json.dumps(list(w_range)), "cascade.lineage": json.dumps(lineage)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _round(recipe, stage, folder: Path, module: DistillModule, steps: int, lr: float, extra_callbacks=()):
    """One Lightning run with checkpoints and exact resume (rerunning continues a killed round)."""
    from cascade.lit.train import fit

    train = stage.train.model_copy(update=dict(max_steps=steps, lr=lr, checkpoint_every=min(stage.train.checkpoint_every,
                                                                                        steps)))
    round_stage = stage.model_copy(update=dict(train=train))
    round_recipe = recipe.model_copy(update=dict(logging=recipe.logging.model_copy(update=dict(sample_every=None))))
    return fit(round_recipe, round_stage, folder, module, extra_callbacks, label=str(folder))


def distill(recipe, stage_name: str, teacher: str | Path | None = None, extra_callbacks=()) -> Path:
    """Guidance distillation (when `distill.guidance` is set), then progressive halvings from `start_steps` to
    `end_steps`. Every round is its own run folder under RUN/STAGE/distill/; a finished round (its
    student.safetensors exists) is skipped, so the command can be rerun after a crash. The final student is
    written to RUN/distilled/STAGE.safetensors, with its lineage (teacher hashes, steps, w range)."""
    from cascade.lit.train import check_text_encoder, ensure_dataset, run_folder
    from cascade.recipe.build import build_augmentation, build_schedule, build_unet

    stage = recipe.stage(stage_name)
    d = stage.distill
    ensure_dataset(recipe)
    check_text_encoder(recipe)
    root = run_folder(recipe, stage) / "distill"
    state, source = teacher_weights(recipe, stage, teacher)
    lineage = [dict(kind="teacher", path=str(source), sha256=file_sha256(source),
                    steps=d.progressive.start_steps)]
    guided = d.guidance is not None
    w_range = (d.guidance.w_min, d.guidance.w_max) if guided else (0.0, 0.0)
    common = dict(schedule=build_schedule(stage), parameterization=stage.diffusion.parameterization,
                  augmentation=build_augmentation(stage), seed=stage.train.seed, w_range=w_range)

    def networks(teacher_state: dict, student_guided: bool, teacher_guided: bool):
        torch.manual_seed(stage.train.seed)
        teacher_net = build_unet(stage, recipe, guidance_conditioning=teacher_guided)
        teacher_net.load_state_dict(teacher_state)
        student_net = build_unet(stage, recipe, guidance_conditioning=student_guided)
        missing = student_net.load_state_dict(teacher_state, strict=False).missing_keys
        if any(not k.startswith("guidance_emb.") for k in missing):
            raise ValueError(f"stage {stage.name}: the teacher's weights do not fit the student: missing {missing[:5]}")
        return student_net, teacher_net

    rounds = []
    if guided:
        rounds.append(("guidance", d.progressive.start_steps, d.guidance.max_steps, d.guidance.lr))
    steps = d.progressive.start_steps
    while steps > d.progressive.end_steps:
        steps //= 2
        rounds.append(("progressive", steps, d.progressive.steps_per_round, d.progressive.lr))
    teacher_guided = False
    for mode, student_steps, max_steps, lr in rounds:
        folder = root / ("guidance" if mode == "guidance" else f"steps-{student_steps:04d}")
        student_file = folder / "student.safetensors"
        if not student_file.is_file():
            student_net, teacher_net = networks(state, guided, teacher_guided)
            module = DistillModule(student_net, teacher_net, mode=mode, num_steps=student_steps, guided=guided,
                                   weighting=d.progressive.loss_weighting, lr=lr, max_steps=max_steps,
                                   journal=folder / "train_steps.jsonl", lineage=dict(rounds=lineage), **common)
            print(f"== distilling {stage.name}: {mode}" + (f" to {student_steps} steps" if mode == "progressive"
                                                            else f", w in [{w_range[0]:g}, {w_range[1]:g}]"),
                  flush=True)
            trainer = _round(recipe, stage, folder, module, max_steps, lr, extra_callbacks)
            if trainer.global_step < max_steps:  # stopped by a signal: the round is not finished
                raise SystemExit(0)
            if trainer.is_global_zero:  # one writer; the other ranks read what it wrote
                save_student(module.student, student_file, stage, recipe, steps=student_steps, guided=guided,
                             w_range=w_range, lineage=lineage)
            else:
                wait_for(student_file)
        from safetensors.torch import load_file

        state = load_file(str(student_file))
        teacher_guided = guided
        lineage = [*lineage, dict(kind=mode, path=str(student_file), sha256=file_sha256(student_file),
                                  steps=student_steps)]
    final = run_folder(recipe, stage).parent / "distilled" / f"{stage.name}.safetensors"
    last_file = Path(lineage[-1]["path"])
    if process_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(last_file.read_bytes())
        tmp.replace(final)
    return final


def distill_command(args) -> int:
    import sys

    from cascade.lit.train import load_for_stage

    recipe, _ = load_for_stage(args)
    try:
        path = distill(recipe, args.stage, args.teacher)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"distilled student: {path}")
    return 0
