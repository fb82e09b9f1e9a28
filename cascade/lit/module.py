"""The LightningModule that trains one stage: it owns the network, its EMA copy and the loss.

Every random draw of a step (noise level, noise, caption dropout, augmentation level) comes from a generator seeded
by (seed, rank, micro-batch count); that count and the global RNG state (dropout) are saved in the checkpoint, so a
resumed run repeats an uninterrupted one bit for bit (on CPU, with deterministic algorithms) on any device.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cascade.data.loader import to_model_input
from cascade.lit.randomness import StepRandomness
from cascade.diffusion import Denoiser, NoiseAugmentation, diffusion_loss, sample_logsnr_train, stage_inputs

BUCKETS = 4  # loss logged per quarter of t (log-SNR from clean to pure noise)


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(kind: str, warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at an optimizer step: linear warm-up, then constant, cosine or linear
    decay to `min_ratio` at `max_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay
    return factor


class StageModule(L.LightningModule):
    def __init__(self, net: nn.Module, *, schedule: Callable[[Tensor], Tensor], parameterization: str = "v",
                 weighting: str = "snr+1", augmentation: NoiseAugmentation | None = None,
                 text_drop_prob: float = 0.1, lr: float = 1e-4, optimizer: str = "adamw",
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, eps: float = 1e-8,
                 lr_schedule: str = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 max_steps: int = 1000, ema_decay: float = 0.9999, seed: int = 0, max_nonfinite: int = 20,
                 journal: str | Path | None = None, recipe_json: str = "{}", known_frames=None) -> None:
        super().__init__()
        self.net = net
        self.denoiser = Denoiser(net, parameterization)
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.ema_decay = ema_decay
        self.schedule, self.weighting, self.augmentation = schedule, weighting, augmentation
        self.text_drop_prob = text_drop_prob
        self.known_frames = known_frames  # a KnownFrameDraw: which frames each sample is given (None: no input)
        self.optim = dict(name=optimizer, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
        self.lr_factor = lr_lambda(lr_schedule, warmup_steps, max_steps, min_lr_ratio)
        self.seed, self.max_nonfinite = seed, max_nonfinite
        self.journal = None if journal is None else Path(journal)
        self.recipe_json = recipe_json
        self.randomness = StepRandomness(seed)
        self.nonfinite_total = self.nonfinite_in_a_row = 0
        self._skipped = False
        self._last_step_time: float | None = None

    def configure_model(self) -> None:
        """Under `launch.strategy: fsdp` (Lightning's ModelParallelStrategy): the network and its EMA sharded over
        the data-parallel mesh, per block and at the root (cascade.lit.sharding)."""
        from cascade.lit.sharding import is_sharded, mixed_precision, shard_network

        if self.device_mesh is None or is_sharded(self.net):
            return
        mesh, policy = self.device_mesh["data_parallel"], mixed_precision(self.trainer.precision)
        shard_network(self.net, mesh, policy)
        shard_network(self.ema.module, mesh, policy)

    def on_train_start(self) -> None:
        self._last_step_time = time.perf_counter()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.randomness.restore_global()

    # --- the step -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "consumed"):
            datamodule.consumed(batch)
        inputs = to_model_input(batch, self.device)
        x = inputs["video"]  # (B, 3, T, H, W) in [-1, 1]
        g = self.randomness.next(self.device, self.global_rank)
        logsnr = sample_logsnr_train(x.shape[0], self.schedule, generator=g, device=self.device).float()
        noise = torch.randn(x.shape, generator=g, device=self.device, dtype=x.dtype)
        cond = stage_inputs(inputs, self.augmentation, training=True, text_drop_prob=self.text_drop_prob, generator=g,
                            known_frames=self.known_frames)
        per_sample = diffusion_loss(self.denoiser, x, logsnr, noise, self.weighting, **cond)  # (B,)
        loss = per_sample.mean()
        speed = self._videos_per_second(len(batch["keys"]))
        finite = torch.isfinite(loss).float()
        if self.trainer.world_size > 1:  # every rank skips together, or DDP would hang
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if finite.item() < 1:
            return self._skip_step(batch, loss, speed)
        self.nonfinite_in_a_row = 0
        self._skipped = False
        self._log_step(loss, per_sample, logsnr, batch, speed)
        return loss

    def _videos_per_second(self, videos: int) -> float | None:
        """Videos/s over the time since the previous micro-batch reached this point (since the start of training for
        the first): a whole iteration (data, forward, backward, optimizer step, EMA, callbacks), all ranks."""
        now = time.perf_counter()
        seconds = None if self._last_step_time is None else now - self._last_step_time
        self._last_step_time = now
        return videos * self.trainer.world_size / seconds if seconds else None

    def _skip_step(self, batch: dict, loss: Tensor, speed: float | None) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        self._skipped = True
        self._log_scalars(loss, None, None, speed)
        print(f"warning: non-finite loss at step {self.global_step} (batch {batch.get('keys')}); step skipped "
              f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)", flush=True)
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss (limit "
                                     f"train.max_nonfinite={self.max_nonfinite}): lower the learning rate, check "
                                     f"the data, or resume from an earlier checkpoint")
        return None

    def _log_scalars(self, loss: Tensor, per_sample: Tensor | None, logsnr: Tensor | None,
                     speed: float | None) -> None:
        """Every scalar on every step, NaN where a step has none (a skipped step, a log-SNR bucket no sample fell
        in): Lightning would otherwise log the last value again, as if it were this step's."""
        nan = float("nan")
        self.log("train/loss", loss, prog_bar=True)
        if hasattr(self.schedule, "t"):  # loss per log-SNR bucket (quarters of t: 0 = clean end)
            t = None if logsnr is None else self.schedule.t(logsnr.double()).float()
            for b in range(BUCKETS):
                chosen = None if t is None else (t * BUCKETS).clamp(max=BUCKETS - 1).long() == b
                count = 0 if chosen is None else int(chosen.sum())
                self.log(f"train/loss_t{b / BUCKETS:.2f}-{(b + 1) / BUCKETS:.2f}",
                         per_sample[chosen].mean() if count else nan, batch_size=max(1, count))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/videos_per_second", nan if speed is None else speed)
        self.log("train/nonfinite_steps", float(self.nonfinite_total))
        self.log("global_step", float(self.global_step))

    def _log_step(self, loss: Tensor, per_sample: Tensor, logsnr: Tensor, batch: dict, speed: float | None) -> None:
        self._log_scalars(loss, per_sample, logsnr, speed)
        if self.journal is not None:  # one line per micro-batch and rank: what was trained on, and the loss
            record = dict(step=self.global_step, micro=self.randomness.micro_steps - 1, rank=self.global_rank,
                          loss=loss.item(), loss_hex=loss.item().hex(), keys=batch["keys"], videos_per_second=speed)
            journal = self.journal if self.global_rank == 0 else self.journal.with_suffix(f".rank{self.global_rank}.jsonl")
            with open(journal, "a") as file:
                file.write(json.dumps(record) + "\n")

    def on_before_optimizer_step(self, optimizer) -> None:
        from cascade.lit.sharding import total_grad_norm

        norm = float("nan") if self._skipped else total_grad_norm(self.net.parameters())
        self.log("train/grad_norm", norm)  # NaN: no gradient this step

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self._skipped:
            from cascade.lit.sharding import ema_update

            # torch.optim.swa_utils' EMA, on each rank's shard (whole tensors when nothing is sharded)
            ema_update(self.ema.module, self.net, self.ema_decay, first=self.ema.n_averaged.item() == 0)
            self.ema.n_averaged += 1

    def configure_optimizers(self):
        o = self.optim
        kind = torch.optim.AdamW if o["name"] == "adamw" else torch.optim.Adam
        optimizer = kind(self.net.parameters(), lr=o["lr"], betas=o["betas"], weight_decay=o["weight_decay"],
                         eps=o["eps"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return dict(optimizer=optimizer, lr_scheduler=dict(scheduler=scheduler, interval="step"))

    # --- checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cascade"] = dict(
            **self.randomness.state(),
            nonfinite_total=self.nonfinite_total, nonfinite_in_a_row=self.nonfinite_in_a_row,
            recipe=self.recipe_json,
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("cascade", {})
        self.randomness.load(state)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
