"""The run and sweep directory: what a run leaves behind, and the one way to read it back.

A run directory holds

    .hydra/          the resolved config and the overrides (Hydra writes them as the job starts)
    summary.json     status, error, metrics, loss history, config, provenance (as the run ends)
    adapter/         the adapter's weights and adapter_config.json (a completed LoRA run)
    checkpoints/     last.ckpt, which a killed run continues from

A sweep directory holds Hydra's ``multirun.yaml`` (what the sweep declares) and one run
directory per job, named by its job number. Everything that reads runs back (the sweep
report, analyze, evaluate, export, resume, the exit code, the loggers, the sweeper) goes
through this module. Importing it is fast: no torch, no Lightning.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import yaml
from hydra.errors import HydraException

from loralab.files import write_json
from loralab.jobs import expand, sweep_arguments
from loralab.overrides import param_keys, parse_overrides, varying_keys, without_resume

SUMMARY = "summary.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = f"{HYDRA_DIR}/config.yaml"
HYDRA_OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"
MULTIRUN_YAML = "multirun.yaml"  # Hydra's sweepers write it into the sweep directory before any job starts

WRITER_LOCK = ".loralab.lock"  # flock'ed by the one process that writes the run or sweep directory

RANK_KEY, SEED_KEY = "lora.rank", "seed"
FINISHED = ("completed", "diverged")  # a run with one of these results is never run again


class RunDirError(ValueError):
    """A file of a run directory cannot be read: the message names the file and why."""


# --- one writer ----------------------------------------------------------------------

_held_locks: dict[Path, int] = {}  # directory -> the open lock file: held until this process ends


def hold_writer_lock(directory: str | Path) -> None:
    """Make this process the one writer of ``directory`` until it ends; RunDirError when another
    process is. The lock is the kernel's (flock): it dies with its process, so a stale lock
    file never blocks."""
    directory = Path(directory).resolve()
    if directory in _held_locks:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"{directory} is being written by another process: wait for it to end, "
                          "or choose another directory") from None
    _held_locks[directory] = fd


# --- one run -------------------------------------------------------------------------


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's summary.json, or None when it wrote none; RunDirError when it is damaged."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        raise RunDirError(f"{path}: not a loralab summary (it records no status)")
    return summary


def write_summary(run_dir: str | Path, summary: dict) -> None:
    write_json(Path(run_dir) / SUMMARY, summary)


def run_status(run_dir: str | Path) -> str | None:
    """The status the run recorded, or None when it wrote none or it cannot be read."""
    try:
        summary = read_summary(run_dir)
    except RunDirError:
        return None
    return summary and summary["status"]


def finished_summary(run_dir: str | Path) -> dict | None:
    """The run's summary when it holds a finished result, else None (never started,
    killed, interrupted or failed: those ``resume=true`` runs again, from their last checkpoint)."""
    summary = read_summary(run_dir)
    return summary if summary is not None and summary["status"] in FINISHED else None


def seed_of(summary: dict) -> int | None:
    """The seed the run trained with, from its summary's config."""
    return summary.get("config", {}).get(SEED_KEY)


def hydra_overrides(run_dir: str | Path) -> list[str] | None:
    """The overrides Hydra saved as the job started (``resume=...`` left out: how a run
    was started is not what it is); None without them; RunDirError when damaged."""
    path = Path(run_dir) / HYDRA_OVERRIDES
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text()) or []
        parse_overrides(overrides)
    except (OSError, yaml.YAMLError, TypeError, HydraException) as e:  # not what Hydra wrote
        raise RunDirError(f"{path}: {type(e).__name__}: {e}") from None
    return without_resume(overrides)


def hydra_config(run_dir: str | Path):
    """The run's resolved config, as Hydra saved it (an OmegaConf DictConfig)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(Path(run_dir) / HYDRA_CONFIG)


def adapter_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ADAPTER_DIR


def in_run_files(path: str | Path, run_dir: str | Path) -> bool:
    """Whether ``path`` is the run directory itself or inside the files the run wrote
    (adapter/, checkpoints/, .hydra/): no tool writes there but the run."""
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    own = [run_dir / name for name in (ADAPTER_DIR, CHECKPOINTS_DIR, HYDRA_DIR)]
    return path == run_dir or any(path == d or d in path.parents for d in own)


def read_adapter_config(run_dir: str | Path) -> dict:
    """The run's adapter_config.json; AdapterFileError naming it when it is not JSON or
    holds no ``lora`` section."""
    from loralab.adapters import ADAPTER_CONFIG, AdapterFileError  # here: importing it imports torch

    path = adapter_dir(run_dir) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("lora"), dict):
        raise AdapterFileError(f"{path} is not an adapter config: it holds no \"lora\" section")
    return meta


def has_adapter(run_dir: str | Path) -> bool:
    """Whether the run saved an adapter (its adapter_config.json is written last)."""
    from loralab.adapters import ADAPTER_CONFIG

    return (adapter_dir(run_dir) / ADAPTER_CONFIG).is_file()


# --- a sweep -------------------------------------------------------------------------


def job_order(job_dir: Path) -> tuple:
    """Sort key of a sweep's job directories: Hydra's job numbers in numeric order, then the rest by name."""
    return (0, int(job_dir.name), "") if job_dir.name.isdigit() else (1, 0, job_dir.name)


def holds_job(run_dir: Path) -> bool:
    return (run_dir / HYDRA_OVERRIDES).is_file() or (run_dir / SUMMARY).is_file()


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The sweep's job directories (those a job has started in), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    return sorted((d for d in sweep_dir.iterdir() if d.is_dir() and holds_job(d)), key=job_order)


def completed_adapter_jobs(sweep_dir: str | Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The jobs of a sweep that completed and saved an adapter, each with its summary, in job
    order; and for every other job one line saying why it is left out. The tools that read a
    sweep's adapters (analyze, evaluate) start from these, and list what they leave out."""
    jobs, notes = [], []
    for job_dir in job_dirs(sweep_dir):
        if not has_adapter(job_dir):
            notes.append(left_out(job_dir, f"it saved no {ADAPTER_DIR}/ (full fine-tuning, or a run that did not "
                                           "finish)"))
            continue
        try:
            summary = read_summary(job_dir)
        except RunDirError as e:
            notes.append(left_out(job_dir, f"its summary is unreadable ({e})"))
            continue
        if summary is None or summary["status"] != "completed":
            notes.append(left_out(job_dir, f"no {SUMMARY}" if summary is None else f"status {summary['status']}"))
            continue
        jobs.append((job_dir, summary))
    return jobs, notes


def left_out(job_dir: Path, why: str) -> str:
    return f"Job {job_dir.name} left out: {why}."


def no_adapter(sweep_dir: str | Path, notes: list[str]) -> str:
    """What a tool that reads a sweep's adapters says when none of them can be read."""
    return " ".join([f"{sweep_dir} holds no readable adapter of a completed run (expected {sweep_dir}/<job>/"
                     f"{ADAPTER_DIR}/, which each completed LoRA run of a `python train.py -m ...` writes).", *notes])


def read_multirun(sweep_dir: str | Path):
    """The sweep's multirun.yaml (its ``hydra`` section), or None without one."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / MULTIRUN_YAML
    return OmegaConf.load(path).hydra if path.is_file() else None


def declared_sweep(sweep_dir: str | Path) -> tuple[list[str], list[str]] | None:
    """(the keys a sweep varies, its command-line task overrides), from the multirun.yaml of
    ``sweep_dir``: the keys of ``-m lora.rank=4,8`` and of an experiment's
    ``hydra.sweeper.params`` (``+lora/budget: q,v`` varies ``lora/budget``). None without one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = read_multirun(sweep_dir)
    if hydra is None:
        return None
    task = list(hydra.overrides.task)
    swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    return list(dict.fromkeys(swept + param_keys(hydra.sweeper.get("params") or {}))), task


def declared_jobs(sweep_dir: str | Path) -> list[list[str]] | None:
    """Each job's overrides, in job order, as the sweeper expanded the multirun.yaml of
    ``sweep_dir``. None without one."""
    hydra = read_multirun(sweep_dir)
    if hydra is None:
        return None
    return expand(sweep_arguments(hydra.sweeper.get("params"), hydra.overrides.task))


def swept_keys(sweep_dir: str | Path, jobs_overrides: list[list[str]] = (), sweeper_params=None) -> list[str]:
    """The keys a sweep varies: as its multirun.yaml declares them; else those the sweeper's
    ``params`` search (Optuna's sweeper writes no multirun.yaml); else those whose values
    differ between ``jobs_overrides``."""
    declared = declared_sweep(sweep_dir)
    if declared is not None:
        return declared[0]
    if sweeper_params:
        return param_keys(sweeper_params)
    return varying_keys(list(jobs_overrides))


def setting_label(swept: dict[str, str], leave_out: tuple[str, ...] = (SEED_KEY,)) -> str:
    """What the seeds of one setting share: a run's swept overrides (``{key: override}``)
    but its seed (and the keys in ``leave_out``), e.g. ``lora.rank=4``."""
    return ",".join(override for key, override in swept.items() if key not in leave_out)
