"""Hydra overrides: what a job was told on the command line, and which of it the sweep varies.

One parser for the whole package, Hydra's own: ``+lora.rank=4`` sets ``lora.rank``, a
group override ``lora/targets=q`` names the group, and a multirun's ``x=False`` equals a
run's ``x=false`` (the sweeper rewrites overrides). The sweep report labels each run
with ``sweep_label`` and the run names itself with it, so the two always agree.
"""

from __future__ import annotations

from pathlib import Path

HYDRA_OVERRIDES = ".hydra/overrides.yaml"  # Hydra writes it into the job directory before the job starts
MULTIRUN_YAML = "multirun.yaml"  # Hydra's sweepers write it into the sweep directory before any job starts
SEED_KEY = "seed"
RANK_KEY = "lora.rank"


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(key, value, override) for each override, as Hydra reads them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # here: importing it takes 0.2 s

    return [(o.key_or_group, str(o.value()), o.input_line) for o in OverridesParser.create().parse_overrides(overrides)]


def without_resume(overrides) -> list[str]:
    """The overrides that say what a run computes: ``resume=...`` only says how it is started."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]


def declared_sweep(sweep_dir: str | Path) -> tuple[list[str], list[str]] | None:
    """(the keys a sweep varies, its command-line task overrides), from the multirun.yaml of
    ``sweep_dir``: the keys of ``-m lora.rank=4,8`` and of an experiment's
    ``hydra.sweeper.params`` (``+lora/budget: q,v`` varies ``lora/budget``). None without one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / MULTIRUN_YAML
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).hydra
    task = list(hydra.overrides.task)
    swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    return list(dict.fromkeys(swept + param_keys(hydra.sweeper.get("params") or {}))), task


def param_keys(params) -> list[str]:
    """The keys a sweeper's ``params`` search (``+lora/budget: q,v`` -> ``lora/budget``;
    Optuna's ``choice(...)``/``interval(...)`` values parse too)."""
    return [key for key, _, _ in parse_overrides([f"{key}={value}" for key, value in params.items()])]


def varying_keys(overrides_per_run: list[list[str]]) -> list[str]:
    """The override keys whose values differ between runs (in command-line order)."""
    values = [{key: value for key, value, _ in parse_overrides(overrides)} for overrides in overrides_per_run]
    keys = dict.fromkeys(key for run in values for key in run)
    return [key for key in keys if len({run.get(key) for run in values}) > 1]


def swept_overrides(overrides: list[str], swept: list[str]) -> dict[str, str]:
    """{key: override} of a job's overrides, for the keys the sweep varies, in sweep order."""
    own = {key: override for key, _, override in parse_overrides(overrides)}
    return {key: own[key] for key in swept if key in own}


def sweep_label(overrides: list[str], swept: list[str]) -> str:
    """A run's name in its sweep: its values of the swept keys, e.g. ``lora.rank=4,seed=2``."""
    return ",".join(swept_overrides(overrides, swept).values())


def declared_jobs(sweep_dir: str | Path) -> list[list[str]] | None:
    """Each job's overrides, in job order, as the sweeper expands the multirun.yaml of
    ``sweep_dir`` (its cartesian product, redundant full fine-tuning jobs dropped). None
    without one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from hydra_plugins.loralab_sweeper import LoRASweeper

    path = Path(sweep_dir) / MULTIRUN_YAML
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).hydra
    params = hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(hydra.overrides.task)  # as the sweeper
    batches = LoRASweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return [job for batch in batches for job in batch]


def job_order(job_dir: Path) -> tuple:
    """Sort key of a sweep's job directories: Hydra's job numbers in numeric order, then the rest by name."""
    return (0, int(job_dir.name), "") if job_dir.name.isdigit() else (1, 0, job_dir.name)
