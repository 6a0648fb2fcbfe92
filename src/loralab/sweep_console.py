"""What a sweep says on the console: ``job k/N: <label>`` as each job starts; once the last
job has ended, the report's settings table (once, not after every job, so no "best
setting" is named while jobs are still to run), and where the results are, with the
``wandb sync`` command when W&B ran offline. At the end of the sweep the report also
goes to W&B, as the sweep's ``report`` run."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def announce_job(config: DictConfig) -> None:
    """``[loralab] job 2/6: lora.rank=4,seed=1``, numbered as the sweep's directories are (+1)."""
    from loralab.layout import declared_jobs
    from loralab.loggers import run_identity

    hydra = config.hydra
    jobs = declared_jobs(hydra.sweep.dir)
    total = len(jobs) if jobs else hydra.sweeper.get("n_trials", "?")  # Optuna: the trials it will run
    print(f"[loralab] job {hydra.job.num + 1}/{total}: {run_identity(config).name}", flush=True)


def end_sweep(config: DictConfig) -> None:
    """The final report, printed; the report as a W&B run; where everything is."""
    from loralab.report import write_report
    from loralab.wandb_sweep import log_report

    sweep_dir = Path(config.hydra.sweep.dir)
    try:
        report = write_report(sweep_dir)
        log_report(sweep_dir, config)
    except Exception as e:  # a broken report must not mask the jobs' own results or errors
        log.warning("sweep report not written in %s: %s", sweep_dir, e)
        report = None
    print(where_results(sweep_dir, "*/wandb/offline-run-*", report), flush=True)


def where_results(directory: Path, offline_runs: str, report: Path | None = None) -> str:
    """``[loralab] results: DIR (report: DIR/report.md)``, and the command that uploads the
    W&B runs there (``offline_runs``, a glob under ``directory``) when there are any."""
    line = f"[loralab] results: {directory}" + (f" (report: {report})" if report else "")
    if any(Path(directory).glob(offline_runs)):
        line += f"\n[loralab] W&B ran offline; upload with: wandb sync {shlex.quote(str(directory))}/{offline_runs}"
    return line
