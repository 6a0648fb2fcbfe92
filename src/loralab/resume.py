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

import yaml
from hydra.errors import CompactHydraException

from loralab.checkpoints import finished_summary
from loralab.overrides import HYDRA_OVERRIDES, without_resume


class SweepDirError(CompactHydraException, ValueError):
    """The sweep directory holds results this sweep would overwrite or mix with its own
    (Hydra prints a CompactHydraException as its one line, without a traceback)."""


def holds_job(job_dir: Path) -> bool:
    return (job_dir / HYDRA_OVERRIDES).is_file() or (job_dir / "summary.json").is_file()


def saved_overrides(job_dir: Path) -> list[str]:
    return without_resume(yaml.safe_load((job_dir / HYDRA_OVERRIDES).read_text()) or [])


def jobs_to_run(sweep_dir: Path, jobs: list[list[str]], job_dirs: list[Path], resume: bool) -> list[int]:
    """The numbers of the jobs to launch (``jobs[i]`` runs in ``job_dirs[i]``); SweepDirError,
    one line, when the directory holds results and this sweep may not go on with them."""
    used = sorted(d for d in sweep_dir.iterdir() if d.is_dir() and holds_job(d)) if sweep_dir.is_dir() else []
    if used and not resume:
        raise SweepDirError(f"{sweep_dir} already holds the results of {len(used)} job(s): rerun with resume=true "
                            "to continue that sweep (finished jobs are kept), or choose another hydra.sweep.dir")
    declared = {d.resolve(): i for i, d in enumerate(job_dirs)}
    for job_dir in used:
        if job_dir.resolve() not in declared:
            raise SweepDirError(f"{job_dir} holds a job this sweep does not declare ({saved_overrides(job_dir)}): "
                                "resume a sweep with its own command line, or choose another hydra.sweep.dir")
        number = declared[job_dir.resolve()]
        expected = without_resume(jobs[number])
        if (job_dir / HYDRA_OVERRIDES).is_file() and sorted(saved_overrides(job_dir)) != sorted(expected):
            raise SweepDirError(f"{job_dir} holds a different job: it ran with {saved_overrides(job_dir)}, "
                                f"job {number} of this sweep is {expected}; it is never reused for another job")
    return [i for i, d in enumerate(job_dirs) if finished_summary(d) is None]
