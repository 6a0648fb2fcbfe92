"""SIGTERM and SIGINT end a run at a step boundary, checkpointed and resumable.

SLURM's pre-emption and ``timeout`` send SIGTERM; Ctrl+C sends SIGINT. From the start of a
run (``catch_interrupts``) either is recorded, not obeyed on the spot: killed mid-step, a run
loses every step since its last checkpoint, and a KeyboardInterrupt raised mid-step can leave
the optimizer half-updated. Lightning already stops for SIGTERM: while a Trainer runs, its
``_SignalConnector`` handler (which also calls the handler it found, this one) makes the fit
loop raise ``SIGTERMException`` once the step, and its validation when one is due, are done,
and in every DDP rank alike. SIGINT is handed to that handler, so both signals stop there;
``LastCheckpoint`` saves last.ckpt as the exception passes. A signal that comes between two
Trainer calls is acted on as the next one starts (``StopOnInterrupt``). The run is then
recorded ``interrupted`` and the process exits ``EXIT_INTERRUPTED``; ``resume=true``
continues it. The same signal twice ends the process at once, as if none were caught.
"""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from loralab.exits import EXIT_INTERRUPTED

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the signals this process was sent, in order


class Interrupted(SystemExit):
    """The run was stopped by a signal and can be resumed. A SystemExit, as Lightning's
    SIGTERMException is, because Hydra records a job's Exception and goes on to the next
    job: this one ends the sweep at the interrupted job, with ``EXIT_INTERRUPTED``."""

    def __init__(self):
        super().__init__(EXIT_INTERRUPTED)


INTERRUPTIONS = (Interrupted, SIGTERMException)  # what ends a run as `interrupted`


def catch_interrupts() -> None:
    """Record SIGTERM and SIGINT from now on (in the main thread, where Python runs handlers)."""
    for signum in SIGNALS:
        if signal.getsignal(signum) is not _record:
            signal.signal(signum, _record)


def _record(signum: int, frame) -> None:
    if signum in _received:  # asked twice: stop now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    lightning = signal.getsignal(signal.SIGTERM)
    if signum == signal.SIGINT and callable(lightning) and lightning is not _record:
        lightning(signal.SIGTERM, frame)  # a Trainer is running: stop it where it stops for SIGTERM


def interruption() -> str:
    """What stopped this process: "SIGTERM" or "SIGINT" (a DDP rank that Lightning stopped
    for rank 0's SIGTERM received none itself)."""
    return signal.Signals(_received[0]).name if _received else "SIGTERM"


def stop_if_interrupted() -> None:
    """Raise Interrupted when a signal has come."""
    if _received:
        raise Interrupted()


class StopOnInterrupt(pl.Callback):
    """A signal that came while no Trainer ran (Lightning's handler, and its flag, exist only
    during a Trainer call) stops the next Trainer call before it does any work."""

    def setup(self, trainer, pl_module, stage):
        stop_if_interrupted()
