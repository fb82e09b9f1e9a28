"""Callbacks and plugins of stage training: atomic checkpoints, preemption, periodic EMA samples."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file, then rename it: a kill mid-write never leaves a broken checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Checkpoints hold tensors, numbers and strings only: never unpickle code.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class Preemption(L.Callback):
    """On SIGUSR1 or SIGTERM: finish the current step, save `last.ckpt`, stop; the process then exits 0. At the end
    of training, `last.ckpt` is saved too.

    Under SLURM, SIGUSR1 is left to Lightning's SLURM environment, which saves and requeues the job.
    """

    def __init__(self, last_checkpoint: str | Path, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.last_checkpoint = Path(last_checkpoint)
        self.signals = signals
        self.received: int | None = None
        self.saved = False

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            signal.signal(signum, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        """The final weights are always in last.ckpt, also when max_steps is not a multiple of the cadence."""
        if not self.saved:
            trainer.save_checkpoint(self.last_checkpoint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if stop and not self.saved:
            trainer.save_checkpoint(self.last_checkpoint)
            self.saved = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                name = signal.Signals(self.received).name if self.received else "a signal on another rank"
                print(f"received {name}: saved {self.last_checkpoint} at step {trainer.global_step}; stopping",
                      flush=True)


class SampleVideos(L.Callback):
    """Every N steps, sample a few videos from the EMA network on the conditioning of the first batch seen, write
    them as mp4 in the run folder and, with wandb, log them as videos."""

    def __init__(self, folder: str | Path, every: int, make_spec, count: int = 2) -> None:
        self.folder, self.every, self.make_spec, self.count = Path(folder), every, make_spec, count
        self.fixed: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fixed is None:
            keep = ("text", "text_mask", "cond", "fps", "captions")
            self.fixed = {k: (v[: self.count].clone() if torch.is_tensor(v) else v[: self.count])
                          for k, v in batch.items() if k in keep}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or not trainer.is_global_zero or self.fixed is None:
            return
        if getattr(self, "_last", None) == step:  # several micro-batches per optimizer step
            return
        self._last = step
        self.sample(trainer, pl_module, step)

    @torch.no_grad()
    def sample(self, trainer, pl_module, step: int) -> Path:
        from cascade.data.loader import to_model_input
        from cascade.data.video import to_uint8, write_video
        from cascade.sampling.cascade import CascadeSampler

        fixed = to_model_input(self.fixed, pl_module.device)
        spec = self.make_spec(pl_module.ema.module)
        was_training = pl_module.ema.training
        pl_module.ema.eval()
        generator = torch.Generator(device=pl_module.device).manual_seed(step)
        video, _ = CascadeSampler.sample_stage(spec, fixed["text"], fixed["text_mask"], fixed.get("cond"), generator)
        pl_module.ema.train(was_training)
        frames = to_uint8(torch.cat(list(video), dim=-1))  # samples side by side
        path = write_video(self.folder / f"step-{step:07d}.mp4", frames, spec.fps)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({"samples": wandb.Video(str(path), format="mp4"), "trainer/global_step": step})
        return path
