"""Which jobs of a sweep may run in its directory, so that no result is ever overwritten.

A sweep directory that already holds jobs is refused, unless ``resume=true``: then a
job that finished (``summary.json`` says completed or diverged) is left untouched, and
the others run (killed ones continue from their last checkpoint, see ``loralab.run``).
A job directory is only ever reused by the same job: its saved overrides
(``.hydra/overrides.yaml``, which Hydra writes as a job starts) must equal the
overrides of the job about to run there, ``resume=...`` aside.
"""

from __future__ import annotations

from pathlib import Path

from hydra.errors import CompactHydraException

from loralab.layout import RunDirError, finished_summary, hydra_overrides, job_dirs
from loralab.overrides import without_resume


class SweepDirError(CompactHydraException, ValueError):
    """The sweep directory holds results this sweep would overwrite or mix with its own
    (Hydra prints a CompactHydraException as its one line, without a traceback)."""


def jobs_to_run(sweep_dir: Path, jobs: list[list[str]], targets: list[Path], resume: bool) -> list[int]:
    """The numbers of the jobs to launch (``jobs[i]`` runs in ``targets[i]``); SweepDirError,
    one line, when the directory holds results this sweep may not go on with, or a damaged file."""
    try:
        return unfinished_jobs(sweep_dir, jobs, targets, resume)
    except RunDirError as e:
        raise SweepDirError(str(e)) from None


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
