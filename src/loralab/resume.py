"""Which jobs of a sweep may run in its directory, so that no result is ever overwritten.

A sweep directory that already holds jobs is refused, unless ``resume=true``: then a
job that finished (``summary.json`` says completed or diverged) is left untouched, and
the others run (killed ones continue from their last checkpoint, see ``loralab.run``).
A job directory is only ever reused by the same job: its saved overrides
(``.hydra/overrides.yaml``, which Hydra writes as a job starts) must equal the
overrides of the job about to run there, ``resume=...`` aside.

A single run (``RunDirGuard``, checked before Hydra writes anything into its directory)
refuses a ``hydra.run.dir`` that holds a finished run unless ``resume=true``, and
``resume=true`` refuses a config that differs from the saved one in what the run is.
"""


from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from loralab.exits import EXIT_CONFIG
from loralab.files import WRITABLE_DIR, unwritable
from loralab.layout import (
    HYDRA_CONFIG,
    RunDirError,
    finished_summary,
    hold_writer_lock,
    hydra_config,
    hydra_overrides,
    job_dirs,
)
from loralab.overrides import without_resume

# what says how a run is started or recorded, not what it computes: resume may change these
HOW_STARTED = ("paths", "logger", "checkpoint", "resume")


class SweepDirError(CompactHydraException, ValueError):
    """The sweep directory holds results this sweep would overwrite or mix with its own
    (Hydra prints a CompactHydraException as its one line, without a traceback)."""


def jobs_to_run(sweep_dir: Path, jobs: list[list[str]], targets: list[Path], resume: bool) -> list[int]:
    """The numbers of the jobs to launch (``jobs[i]`` runs in ``targets[i]``); SweepDirError,
    one line, when the directory holds results this sweep may not go on with, or a damaged file."""
    refuse_unwritable(sweep_dir, "hydra.sweep.dir", sweep_dir)
    for target in targets:  # hydra.sweep.subdir names each job's directory (e.g. after its overrides)
        refuse_unwritable(target, "hydra.sweep.subdir", os.path.relpath(target, sweep_dir))
    try:
        hold_writer_lock(sweep_dir)
        return unfinished_jobs(sweep_dir, jobs, targets, resume)
    except RunDirError as e:
        raise SweepDirError(str(e)) from None


def refuse_unwritable(directory: Path, key: str, value) -> None:
    """SweepDirError, one line naming ``key`` and its ``value``, when this process cannot make
    ``directory`` and write in it."""
    why_not = unwritable(directory)
    if why_not is not None:
        raise SweepDirError(f"{key}={str(value)!r} is invalid: expected {WRITABLE_DIR}; {why_not}")


def unfinished_jobs(sweep_dir: Path, jobs: list[list[str]], targets: list[Path], resume: bool) -> list[int]:
    used = job_dirs(sweep_dir)
    if used and not resume:
        raise SweepDirError(f"{sweep_dir} already holds the results of {len(used)} job(s): rerun with resume=true "
                            "to continue that sweep (finished jobs are kept), or choose another hydra.sweep.dir")
    declared = {d.resolve(): i for i, d in enumerate(targets)}
    for job_dir in used:
        if job_dir.resolve() not in declared:
            raise SweepDirError(f"{job_dir} holds a job this sweep does not declare ({hydra_overrides(job_dir)}): "
                                "resume a sweep with its own command line, or choose another hydra.sweep.dir")
        number = declared[job_dir.resolve()]
        saved, expected = hydra_overrides(job_dir), without_resume(jobs[number])
        if saved is not None and sorted(saved) != sorted(expected):
            raise SweepDirError(f"{job_dir} holds a different job: it ran with {saved}, "
                                f"job {number} of this sweep is {expected}; it is never reused for another job")
    return [i for i, d in enumerate(targets) if finished_summary(d) is None]


def check_run_dir(run_dir: Path, config, resume: bool) -> None:
    """SweepDirError, one line, when a single run may not write into ``run_dir``: another process
    writes it, it holds a finished run (and no ``resume=true``), a damaged summary, or a run
    that ``config`` is not, or one it cannot write. Otherwise this process holds its writer lock from now on."""
    refuse_unwritable(run_dir, "hydra.run.dir", run_dir)
    try:
        hold_writer_lock(run_dir)
    except RunDirError as e:
        raise SweepDirError(str(e)) from None
    try:
        finished = finished_summary(run_dir)
        saved = hydra_config(run_dir) if resume and (run_dir / HYDRA_CONFIG).is_file() else None
    except RunDirError as e:
        raise SweepDirError(f"{e}: delete it (resume=true then continues from the last checkpoint), "
                            "or choose another hydra.run.dir") from None
    if finished is not None and not resume:
        raise SweepDirError(f"{run_dir} holds a {finished['status']} run: resume=true leaves it as it is; "
                            "choose another hydra.run.dir to run again")
    if saved is not None:
        changed = changed_keys(OmegaConf.to_container(saved), OmegaConf.to_container(config))
        if changed:
            raise SweepDirError(f"{run_dir} holds another run: resume=true continues a run only with its own "
                                f"config, and these keys differ: {', '.join(changed)}")


def changed_keys(saved: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ, beyond those that only say how a run is started."""
    from loralab.loggers import flatten  # here: the loggers import Lightning

    saved, new = ({k: v for k, v in c.items() if k not in (*HOW_STARTED, "hydra")} for c in (saved, new))
    saved, new = flatten(saved), flatten(new)
    return sorted(key for key in saved.keys() | new.keys() if saved.get(key) != new.get(key))


def started_for_another_rank() -> bool:
    """Whether this process is a rank other than 0 of a DDP run: Lightning's launcher starts those
    by running the command again, with the rank in the environment (the variables Lightning reads,
    in its order). The run's rank 0 has checked the directory and holds it."""
    rank = next((os.environ[key] for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
                 if key in os.environ), "0")
    return int(rank) > 0


class RunDirGuard(Callback):
    """Checks a single run's directory before Hydra writes its ``.hydra/`` there (Hydra's
    ``on_job_start`` comes after): a refused run leaves the directory exactly as it was."""

    def on_run_start(self, config, **kwargs) -> None:
        if started_for_another_rank():
            return
        try:
            check_run_dir(Path(config.hydra.run.dir), config, bool(config.get("resume", False)))
        except SweepDirError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(EXIT_CONFIG)  # Hydra turns a callback's exception into a warning
