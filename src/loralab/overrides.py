"""Hydra overrides: what a job was told on the command line, and which of it the sweep varies.

One parser for the whole package, Hydra's own: ``+lora.rank=4`` sets ``lora.rank``, a
group override ``lora/targets=q`` names the group, and a multirun's ``x=False`` equals a
run's ``x=false`` (the sweeper rewrites overrides). The sweep report labels each run
with ``sweep_label`` and the run names itself with it, so the two always agree.
"""

from __future__ import annotations


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(key, value, override) for each override, as Hydra reads them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # here: importing it takes 0.2 s

    return [(o.key_or_group, str(o.value()), o.input_line) for o in OverridesParser.create().parse_overrides(overrides)]


def without_resume(overrides) -> list[str]:
    """The overrides that say what a run computes: ``resume=...`` only says how it is started."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]


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
