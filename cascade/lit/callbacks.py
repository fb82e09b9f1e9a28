"""Callbacks and plugins of stage training: atomic checkpoints, preemption, periodic EMA samples, the step bar, and
loggers that leave out empty loss buckets."""

from __future__ import annotations

import csv
import math
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file, then rename it: a kill mid-write never leaves a broken checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except OSError as error:  # a full disk: free what the partial file took; the message names the checkpoint
            tmp.unlink(missing_ok=True)
            raise OSError(error.errno, error.strerror, str(path)) from None
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Checkpoints hold tensors, numbers and strings only: never unpickle code.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; a resumed run keeps its rows and header and appends."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


def without_empty_buckets(metrics: dict) -> dict:
    """The metrics less the per-log-SNR-bucket losses that no sample of the step fell in (NaN from the module,
    which logs NaN so that Lightning does not repeat an earlier step's value): nothing is logged for them."""
    def empty(key: str, value) -> bool:
        value = value.item() if torch.is_tensor(value) and value.numel() == 1 else value
        return key.startswith("train/loss_t") and isinstance(value, float) and math.isnan(value)
    return {k: v for k, v in metrics.items() if not empty(k, v)}


class StepWandbLogger(WandbLogger):
    """Lightning's WandbLogger without the empty loss buckets (a NaN there would read as divergence), and without
    the `anonymous` argument Lightning always passes (wandb warns on the screen that it has no effect)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(without_empty_buckets(metrics), step)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to metrics.csv instead of deleting it, and an empty
    loss bucket is an empty cell. Steps that a resumed run repeats appear again: the last row of a step counts, as
    in the step journal."""

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(without_empty_buckets(metrics), step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()  # the rows of every step a checkpoint holds are on disk: a run killed after it loses none


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, told after a resume that the step it resumed at is saved already. Lightning
    forgets it: with gradient accumulation it would save again after the first micro-batch, mid-step, and a resume
    from that checkpoint would train that step without the micro-batch's gradient."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step


class StepProgressBar(TQDMProgressBar):
    """The bar counts optimizer steps against max_steps (Lightning's counts batches of an epoch that never ends:
    `Epoch 0/-2`, then `40/10` under gradient accumulation), from the step a resumed run starts at."""

    def init_train_tqdm(self):
        import sys

        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        steps = self.trainer.max_steps
        return Tqdm(desc="steps", total=steps if steps > 0 else None, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        """Not Lightning's reset to batch 0 of the epoch: the bar counts steps across epochs."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and bar.n != trainer.global_step:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class Preemption(L.Callback):
    """On SIGUSR1 or SIGTERM: finish the current optimizer step (all its micro-batches), save `last.ckpt`, stop; the
    process then exits 0. At the end of training, `last.ckpt` is saved too. Before training starts (data, networks)
    the same signals stop the run at once (cascade.lit.runfolder.interruptible_startup). Nothing here requeues a
    SLURM job: the batch script does (slurm/README.md, "Preemption, time limits, requeue loops")."""

    def __init__(self, last_checkpoint: str | Path, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.last_checkpoint = Path(last_checkpoint)
        self.signals = signals
        self.received: int | None = None
        self.saved = False
        self._step: int | None = None

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        self._step = trainer.global_step
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
        # Only after an optimizer step: a checkpoint between micro-batches would lose their accumulated gradients.
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if stop and stepped and not self.saved:
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
        from cascade.lit.sharding import is_sharded

        step = trainer.global_step
        # A sharded EMA's forward gathers its weights from every rank: then every rank samples, rank 0 writes.
        if step == 0 or step % self.every or self.fixed is None or not (
                trainer.is_global_zero or is_sharded(pl_module.ema.module)):
            return
        if getattr(self, "_last", None) == step:  # several micro-batches per optimizer step
            return
        self._last = step
        self.sample(trainer, pl_module, step)

    @torch.no_grad()
    def sample(self, trainer, pl_module, step: int) -> Path | None:
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
        if not trainer.is_global_zero:
            return None
        frames = to_uint8(torch.cat(list(video), dim=-1))  # samples side by side
        path = write_video(self.folder / f"step-{step:07d}.mp4", frames, spec.fps)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"samples": wandb.Video(str(path), format="mp4"), "trainer/global_step": step})
        return path
