"""A multirun's jobs: the command line's cartesian product, as Hydra's basic sweeper
expands it, less the jobs that would compute the same thing twice.

``-m lora=default,full lora.rank=4,8 seed=1,2`` is a product in which the full
fine-tuning baseline would run once per rank, though ``lora.*`` keys mean nothing to
it. Jobs that differ only in keys of the section a group option switched off are one
job: full fine-tuning runs once per seed. loralab's sweeper launches these jobs, and
whatever reads a sweep back (``loralab.layout.declared_jobs``) expands them the same way.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

# group option -> the key prefix it makes irrelevant
SWITCHED_OFF = {"lora=full": "lora."}


def sweep_arguments(params: dict | None, task: list[str]) -> list[str]:
    """A sweeper's ``params`` (an experiment's search space) followed by the command line's
    overrides, as Hydra's basic sweeper puts them together (a later value of a key wins)."""
    return [f"{key}={value}" for key, value in (params or {}).items()] + list(task)


def expand(arguments: list[str], config_loader=None) -> list[list[str]]:
    """Each job's overrides, in job order. ``config_loader`` lets ``glob(...)`` sweeps
    over a group's options parse (the sweeper has one; a reader of a finished sweep does not need it)."""
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    [jobs] = BasicSweeper.split_arguments(overrides, None)
    return without_redundant_jobs(jobs)


def without_redundant_jobs(jobs: list[list[str]]) -> list[list[str]]:
    """Drop a job when it equals an earlier one once the keys its group options switch off
    are left out (``lora=full`` ignores ``lora.rank=...``); the first of each stays."""
    seen, kept = set(), []
    parser = OverridesParser.create()
    for job in jobs:
        parsed = parser.parse_overrides(job)
        options = {o.input_line.lstrip("+~") for o in parsed}
        off = tuple(prefix for option, prefix in SWITCHED_OFF.items() if option in options)
        relevant = tuple(o.input_line for o in parsed if not (off and o.key_or_group.startswith(off)))
        if relevant not in seen:
            seen.add(relevant)
            kept.append(job)
    return kept


def contiguous_batches(numbers: list[int], max_batch_size: int | None) -> list[tuple[int, list[int]]]:
    """(first number, numbers) for each run of consecutive job numbers, at most
    ``max_batch_size`` long: [0, 2, 3, 4] -> (0, [0]), (2, [2, 3, 4]). A launcher numbers a
    batch's jobs from its first, so every job keeps its number (and directory) on resume."""
    batches: list[tuple[int, list[int]]] = []
    for number in numbers:
        if batches and number == batches[-1][1][-1] + 1 and len(batches[-1][1]) < (max_batch_size or len(numbers)):
            batches[-1][1].append(number)
        else:
            batches.append((number, [number]))
    return batches
