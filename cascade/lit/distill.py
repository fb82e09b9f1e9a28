"""The LightningModule of one distillation round: Lightning glue around a `cascade.distill` method (guidance
distillation, a progressive halving, or any other method behind the same protocol).

Every random draw of a step (caption dropout, augmentation level and noise, the method's levels and w, the noise)
comes from a generator seeded by (seed, rank, micro-batch count), as in stage training, so a round resumes exactly.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from cascade.data.loader import to_model_input
from cascade.diffusion import Denoiser, NoiseAugmentation, diffuse, stage_inputs
from cascade.distill.methods import DistillationMethod
from cascade.lit.randomness import StepRandomness


class DistillModule(L.LightningModule):
    """Trains `student` on `method`'s targets from the frozen `teacher`; Adam, learning rate annealed linearly to 0
    over the round (PD configs). Captions are dropped at the stage's rate, so every student also learns the
    unconditional case that classifier-free guidance needs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: DistillationMethod, *,
                 parameterization: str = "v", augmentation: NoiseAugmentation | None = None,
                 text_drop_prob: float = 0.0, lr: float = 1e-4, max_steps: int = 1000, seed: int = 0,
                 journal: str | Path | None = None, lineage: dict | None = None, known_frames=None) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.student_x = Denoiser(student, parameterization)
        self.teacher_x = Denoiser(teacher, parameterization)
        # the method's target network: an EMA of the student, frozen between updates (consistency distillation)
        self.target_student = None
        if getattr(method, "target_ema", None) is not None:
            self.target_student = copy.deepcopy(student).eval().requires_grad_(False)
        self.target_x = None if self.target_student is None else Denoiser(self.target_student, parameterization)
        self.method, self.augmentation, self.text_drop_prob = method, augmentation, text_drop_prob
        self.known_frames = known_frames  # the stage's KnownFrameDraw: the student learns the same inputs
        self.lr, self.max_steps = lr, max_steps
        self.journal = None if journal is None else Path(journal)
        self.lineage = lineage or {}
        self.randomness = StepRandomness(seed)
        self._last_time: float | None = None

    def configure_model(self) -> None:
        """Under `launch.strategy: fsdp`: the student and the frozen teacher sharded per block over the mesh."""
        from cascade.lit.sharding import is_sharded, mixed_precision, shard_network

        if self.device_mesh is None or is_sharded(self.student):
            return
        mesh, policy = self.device_mesh["data_parallel"], mixed_precision(self.trainer.precision)
        shard_network(self.student, mesh, policy)
        shard_network(self.teacher, mesh, policy)
        if self.target_student is not None:
            shard_network(self.target_student, mesh, policy)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (dropout off)
        if self.target_student is not None:
            self.target_student.eval()
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
        g = self.randomness.next(self.device, self.global_rank)
        cond = stage_inputs(inputs, self.augmentation, training=True, text_drop_prob=self.text_drop_prob, generator=g,
                            known_frames=self.known_frames)
        draw = self.method.draw(x.shape[0], g, self.device)
        noise = torch.randn(x.shape, generator=g, device=self.device, dtype=x.dtype)
        z = diffuse(x, draw.logsnr, noise)
        # only a method with a target network (target_ema) is handed one: a method of four arguments keeps working
        extra = {} if self.target_x is None else dict(target_net=self.target_x)
        target = self.method.target(self.teacher_x, z, draw, cond, **extra)
        x_hat = self.student_x(z, draw.logsnr, **self.method.student_inputs(cond, draw))
        loss = self.method.loss(x_hat, target, draw).mean()
        self.log("distill/loss", loss, prog_bar=True)
        self.log("global_step", float(self.global_step))
        self._journal(loss, batch)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.target_student is None:
            return
        from cascade.lit.sharding import ema_update

        # after the optimizer step: target <- decay target + (1 - decay) student, on each rank's shards when sharded
        ema_update(self.target_student, self.student, self.method.target_ema, first=False)

    def _journal(self, loss: Tensor, batch: dict) -> None:
        if self.journal is None or self.global_rank != 0:
            return
        now = time.perf_counter()
        seconds, self._last_time = now - self._last_time, now
        record = dict(step=self.global_step, micro=self.randomness.micro_steps - 1, loss=loss.item(),
                      loss_hex=loss.item().hex(), keys=batch["keys"],
                      videos_per_second=len(batch["keys"]) * self.trainer.world_size / seconds if seconds else None)
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
        self.randomness.load(checkpoint.get("cascade", {}))
