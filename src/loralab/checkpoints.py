"""Checkpoints a killed run continues from: Lightning's own ``.ckpt`` files, written atomically.

Each run (and each pretraining of a base) keeps ``last.ckpt`` in its checkpoint
directory, refreshed every ``checkpoint.every_n_steps`` optimizer steps by Lightning's
``ModelCheckpoint``. It holds what training needs to go on exactly as if it had never
stopped: the trainable weights (``LitTransformer`` leaves the frozen base out), the optimizer
and scheduler state, the RNG states, the fit loop's progress and the data position
(``loralab.data.ResumableLoader``), and the loss history. A run stopped by SIGTERM or SIGINT
saves it once more, at the end of the step it stopped after (``loralab.interrupts``).

Lightning writes through fsspec, whose local "transaction" writes a temporary file in
the system's temp directory and then *moves* it: across file systems that is a copy,
so a kill can leave half a checkpoint. ``AtomicCheckpointIO`` writes beside the target
and renames, which is atomic.

A checkpoint is read back with ``torch.load(weights_only=True)`` only: a run directory or a
shared cache may hold a file someone else planted, and unpickling it would run its code.
A file that does not load that way is refused in one line (``CheckpointError``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.exceptions import SIGTERMException

from loralab.files import atomic_path

LAST = "last.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely: damaged, or not tensors and plain containers."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary name in the checkpoint's own directory, then ``os.replace``;
    loading never unpickles anything but tensors and plain containers."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class LastCheckpoint(ModelCheckpoint):
    """Only ``last.ckpt``, replaced every ``every_n_steps`` steps: a run needs one place to
    resume from. At a step that validation follows, the checkpoint waits for the end of
    that validation (ModelCheckpoint's own deferral): Lightning, resuming from a checkpoint
    taken before a due validation, skips it, and the resumed run's val/loss curve (and its
    best/val_loss) would lack that point."""

    def __init__(self, directory: str | Path, every_n_steps: int):
        super().__init__(dirpath=directory, filename="last", save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_steps, enable_version_counter=False)
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0 and validation_follows(trainer):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_exception(self, trainer, pl_module, exception):
        """An interrupted run keeps its steps (``loralab.interrupts``): Lightning raises
        SIGTERMException once a step, and its validation, are done, and last.ckpt is taken
        there. Lightning also raises it in the middle of a validation; then the checkpoint
        before stands, because a run resumed there would finish that validation on the batches
        left only, a val/loss no uninterrupted run logs."""
        if isinstance(exception, SIGTERMException) and trainer.state.stage == RunningStage.TRAINING:
            trainer.save_checkpoint(Path(self.dirpath) / LAST, weights_only=False)  # all of it, to resume from


def validation_follows(trainer) -> bool:
    """Whether the fit loop validates after the current batch: every ``val_check_batch``
    batches in all (loralab's Trainer counts them across epochs: check_val_every_n_epoch=None).
    A time-based ``val_check_interval`` cannot be foreseen (``val_check_batch`` is None)."""
    every = trainer.val_check_batch
    batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
    return every is not None and trainer.limit_val_batches > 0 and batches % every == 0


def last_checkpoint(directory: str | Path) -> str | None:
    """The checkpoint to resume from in ``directory``, or None when training never reached one."""
    path = Path(directory) / LAST
    return str(path) if path.is_file() else None


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at (memory-mapped: the weights are not
    read). CheckpointError, naming the file, when it is not a checkpoint that loads safely."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception as e:  # truncated, empty, random bytes, a planted pickle: all the same to a resume
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be resumed from: it is not a checkpoint that loads without unpickling "
                              f"code ({type(e).__name__}: {reason[:200]}); delete it to train from the start") from None


def discard_unreadable_checkpoint(directory: str | Path) -> str | None:
    """Remove ``directory`` when its checkpoint cannot be resumed from; return why, or None.
    For checkpoints that can be recomputed (a pretraining), starting over is the way on."""
    path = last_checkpoint(directory)
    try:
        if path is not None:
            checkpoint_step(path)
    except CheckpointError as e:
        shutil.rmtree(directory, ignore_errors=True)
        return str(e)
    return None

