"""A sweep's own W&B runs, in the group of its jobs' runs: the sweep report (job type
``report``: the settings table and the plots) and the adapter analysis (``analysis``).

Each writes under ``<sweep dir>/<job type>/wandb/``, so the command that syncs the jobs'
offline runs, ``wandb sync <sweep dir>/*/wandb/offline-run-*``, syncs these too.
"""

from __future__ import annotations

import csv
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loralab.layout import MULTIRUN_YAML
from loralab.wandb_setup import start_wandb, wandb_mode


def sweep_group(hydra: DictConfig) -> str:
    """``rank_sweep 2026-11-23/10-59-01``: readable in the dashboard, and no path of this machine."""
    sweep_dir = Path(hydra.sweep.dir)
    experiment = hydra.runtime.choices.get("experiment") or "sweep"
    return f"{experiment} {sweep_dir.parent.name}/{sweep_dir.name}"


@contextmanager
def sweep_run(sweep_dir: Path, config: DictConfig, job_type: str):
    """A W&B run of ``job_type`` in the sweep's group, as its jobs' logger settings say
    (``config``: the sweep's config, as Hydra composed it, with its ``hydra`` section);
    None when the jobs did not log to W&B."""
    logger = config.logger
    if logger.kind != "wandb" or wandb_mode(logger.mode) == "disabled":
        yield None
        return
    directory = Path(sweep_dir) / job_type
    directory.mkdir(parents=True, exist_ok=True)
    run = start_wandb(logger.mode, project=logger.project, entity=logger.entity, job_type=job_type, name=job_type,
                      group=logger.group or sweep_group(config.hydra), tags=list(logger.tags) or None, dir=directory)
    try:
        yield run
    finally:
        run.finish()


def sweep_config(sweep_dir: Path) -> DictConfig:
    """The config a sweep's jobs were composed from, as its sweeper saved it."""
    return OmegaConf.load(Path(sweep_dir) / MULTIRUN_YAML)


def log_report(sweep_dir: Path, config: DictConfig) -> None:
    """The sweep report as one ``report`` run: settings.csv as a ``wandb.Table``, and every plot."""
    sweep_dir = Path(sweep_dir)
    with sweep_run(sweep_dir, config, "report") as run:
        if run is None:
            return
        import wandb

        with (sweep_dir / "settings.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        logged = {"report/settings": wandb.Table(columns=rows[0], data=rows[1:])}
        for plot in sorted(sweep_dir.glob("*.png")):
            logged[f"report/{plot.stem}"] = wandb.Image(str(plot))
        run.log(logged)
