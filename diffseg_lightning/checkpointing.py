"""``last.ckpt``: the latest training state, written often and atomically, and on SIGINT / SIGTERM.

Lightning's own machinery does most of this; the code here covers what it does not do right:

- ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only at the steps where it also
  writes a monitored checkpoint (so ``last.ckpt`` lags behind), and one ``ModelCheckpoint`` saves either on
  train-epoch end or on validation end, never both. :class:`LastCheckpoint` is a second ``ModelCheckpoint``
  without a monitor: Lightning's ``every_n_train_steps`` trigger, plus a write at every epoch end and
  every validation end.
- On Ctrl+C Lightning saves nothing, and ``save_on_exception`` saves wherever the exception struck: in the
  middle of an optimiser step, or in the middle of a validation, while ``WeightAveraging`` has swapped the
  EMA weights into the model (the checkpoint then holds them under the wrong keys). So SIGINT and SIGTERM
  are only noted when they arrive; the run stops at the next point where the state is whole (the end of
  the current training step, or of the running validation), after writing ``last.ckpt``.
- Lightning's "atomic" save (fabric's ``_atomic_save``) stages the file in the system temp folder and
  moves it into place; across file systems the move is a copy, which a kill can leave half-written.
  :class:`AtomicCheckpointIO` writes a hidden temporary file beside the target and renames it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffseg_lightning.exceptions import ConfigError

#: Exit status of a run stopped by SIGTERM after saving ``last.ckpt`` (the shell's 128 + signal number).
SIGTERM_EXIT = 128 + signal.SIGTERM


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: ``torch.save`` into ``.<name>.tmp-<pid>`` beside the
    target, ``fsync``, then ``os.replace``. A kill at any moment leaves the previous complete file (and at most
    a stale temporary file, removed by the next write); remote paths keep Lightning's own save."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # hidden and not ending in .ckpt, so no glob for checkpoints (Lightning's ckpt_path="last") can find it
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` the latest state of the run.

    ``last.ckpt`` is written at the end of every training epoch, at the end of every validation, every
    ``every_n_train_steps`` optimiser steps, and when the process gets SIGINT (Ctrl+C) or SIGTERM: the
    signal is noted, the current training step (or the running validation) finishes, ``last.ckpt`` is
    written, and the run stops, for SIGINT through Lightning's KeyboardInterrupt handling (exit status 1),
    for SIGTERM with exit status :data:`SIGTERM_EXIT` (143). A second Ctrl+C stops at once, without saving.
    Under DDP every process stops at the same step. Every checkpoint of the trainer (``best.ckpt`` too) is
    written atomically (:class:`AtomicCheckpointIO`). Resuming with ``ckpt_path=.../last.ckpt`` continues at
    the global step it holds, with the weights, EMA, optimiser, RNG and data order of an uninterrupted run
    (:mod:`diffseg_lightning.data.resumable`). ``fast_dev_run`` writes it too (best.ckpt it does not).

    Args:
        dirpath: the folder of ``last.ckpt``.
        every_n_train_steps: also write every this many optimiser steps; null or 0: only at the points above.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = 500) -> None:
        steps = every_n_train_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_train_steps must be a whole number >= 0 or null, got {steps!r}"
            )
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_last=True,
            save_top_k=0,  # no "<epoch>-<step>.ckpt" files: only last.ckpt
            every_n_train_steps=steps or 0,
            enable_version_counter=False,  # overwrite last.ckpt, never last-v1.ckpt
        )
        self._signal: str | None = None
        self._handlers: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------------------ when to write
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every_n_train_steps
        if self._stop_requested(trainer):
            if self._may_save(trainer) and self._last_global_step_saved != trainer.global_step:
                self._save_last(trainer)
            self._stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after on_validation_epoch_end, where WeightAveraging swapped the EMA weights back out
        self._save_and_maybe_stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_and_maybe_stop(trainer)

    def _save_and_maybe_stop(self, trainer: L.Trainer) -> None:
        if self._may_save(trainer):
            self._save_last(trainer)
        if trainer.state.fn == TrainerFn.FITTING and self._stop_requested(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint would write last.ckpt here if it never had; WeightAveraging.on_train_end has just
        # copied the EMA weights over the raw ones, so that file would not resume. Every epoch end wrote it.
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()  # save_on_exception is off: the state at an arbitrary exception is not whole

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    @staticmethod
    def _may_save(trainer: L.Trainer) -> bool:
        """While fitting, outside the sanity check. Unlike ModelCheckpoint's rules: also under fast_dev_run (as
        before, when ModelCheckpoint's on_train_end wrote last.ckpt there), so a smoke run leaves a checkpoint
        to predict with; and without "already saved at this global step": the loop state after a validation
        or at the end of an epoch is later than at the end of the step, at the same global step."""
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _save_last(self, trainer: L.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ---------------------------------------------------------------------------------- signals
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Installed here, after Lightning's signal connector installed its SIGTERM handler (it would raise
        # SIGTERMException mid-validation); the previous handlers come back when fitting ends.
        self._signal, self._trainer = None, trainer
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._handlers[signum] = signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._signal == "SIGINT" and signum == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # the second Ctrl+C: stop now, without saving
        if self._signal is None:
            trainer = self._trainer
            if trainer is not None and trainer.is_global_zero:
                print(
                    f"\n{name} received: finishing the current step, then writing {self._last_path()} and stopping"
                    + (" (Ctrl+C again stops at once, without saving)" if signum == signal.SIGINT else ""),
                    file=sys.stderr,
                    flush=True,
                )
            launcher = trainer.strategy.launcher if trainer is not None else None
            if signum == signal.SIGTERM and launcher is not None:
                launcher.kill(signum)  # as Lightning's handler does: pass it on to the other processes
            self._signal = name

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        noted = self._signal is not None
        if trainer.world_size > 1:  # stop every process at the same step
            noted = trainer.strategy.reduce_boolean_decision(noted, all=False)
        return noted

    def _stop(self, trainer: L.Trainer) -> None:
        name = self._signal or "SIGTERM"  # another process got it
        self._restore_handlers()
        if trainer.is_global_zero:
            print(
                f"{name}: wrote {self._last_path()} at global step {trainer.global_step}; "
                f"resume with ckpt_path={self._last_path()}",
                file=sys.stderr,
                flush=True,
            )
        if name == "SIGINT":
            raise KeyboardInterrupt  # Lightning's graceful shutdown, then exit status 1
        raise SIGTERMException(SIGTERM_EXIT)

    def _last_path(self) -> str:
        return str(Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _restore_handlers(self) -> None:
        while self._handlers:
            signum, handler = self._handlers.popitem()
            signal.signal(signum, handler)
