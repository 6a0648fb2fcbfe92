"""Every ``python train.py ...`` command the documentation shows composes with Hydra.

The commands are read from README.md, docs/*.md and experiments/README.md (code blocks and
inline code alike) and composed with the real config in conf/ — nothing trains. A sweep
composes once per swept value (its other sweeps at their first value), including the
values an experiment sweeps in its ``hydra.sweeper.params``, so a renamed key, group
option or experiment in conf/ fails here until the documentation follows.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import DictConfig, OmegaConf, open_dict

import loralab.schema  # noqa: F401  registers train_schema, as train.py does
from loralab.plugins import PLUGINS

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]
COMMAND = re.compile(r"(\$ )?python train\.py([^`\n]*)")


def documented_commands() -> dict[tuple[str, ...], tuple[str, str]]:
    """{the command's arguments: (where it is written, the line after it when it is shown as
    ``$ python train.py ...`` with its output, else "")}. Shell continuations are joined; a
    comment, a ``(`` note in a table, and ``...`` placeholders are not arguments."""
    commands = {}
    for path in DOCUMENTS:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for match in COMMAND.finditer(text):
            if "$(" in match.group(2):  # built by the shell from a run's files: nothing to compose
                continue
            args = []
            for token in shlex.split(match.group(2), comments=True):
                if token.startswith("("):
                    break
                if token != "...":
                    args.append(token)
            output = text[match.end():].split("\n", 2)[1] if match.group(1) else ""
            commands.setdefault(tuple(args), (path.relative_to(ROOT).as_posix(), output))
    return commands


COMMANDS = documented_commands()


def test_the_documentation_shows_commands():
    """The reader found the commands (a broken reader would pass every test below vacuously)."""
    assert ("-m", "lora.rank=4,8,16") in COMMANDS
    assert ("-m", "experiment=rank_sweep") in COMMANDS
    assert ("-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=gpu", "trainer.devices=4",
            "lora.rank=4,8,16,32") in COMMANDS  # joined across its line continuation
    assert len(COMMANDS) >= 30


@pytest.fixture(scope="module")
def conf_dir():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


def split_command(args: tuple[str, ...]) -> tuple[bool, list[str]]:
    """(whether it is a multirun, its overrides): Hydra's own flags are not overrides."""
    multirun, overrides, skip_next = False, [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("--cfg", "-c", "--package", "-p"):
            skip_next = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return multirun, overrides


def swept_values(override) -> list[str]:
    """The values of a sweep (each choice or range value; an interval's ends), or a fixed value."""
    if not override.is_sweep_override():
        return [override.value()]
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return [sweep.start, sweep.end]
    return list(override.sweep_string_iterator())


def compose_job(overrides: list[str]) -> DictConfig:
    """Compose one job's config as Hydra would run it and resolve every interpolation."""
    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/nonexistent/run-dir"  # what Hydra sets as the job starts
        cfg.hydra.job.num = cfg.hydra.job.id = 0
    HydraConfig.instance().set_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    return cfg


def is_group(override) -> bool:
    """Whether the override chooses a config group option (``lora/targets=q``, ``experiment=x``)."""
    key = override.key_or_group
    return (ROOT / "conf" / key).is_dir() or key.startswith("hydra/")


def check_command(overrides: list[str], multirun: bool) -> None:
    """Compose the command's config; for a sweep once per value of each swept group (the
    others at their first value) and each swept key's values assigned to it, so the
    schema checks their types."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    assert multirun or not sweeps, f"sweeps {[o.input_line for o in sweeps]} without -m"
    cfg = compose_job(fixed)
    params = cfg.hydra.sweeper.get("params") or {} if multirun else {}
    by_key = {o.get_key_element(): o for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])}
    by_key.update({o.get_key_element(): o for o in sweeps})  # the command line wins, as in Hydra
    groups = [o for o in by_key.values() if is_group(o)]
    first_groups = [f"{o.get_key_element()}={swept_values(o)[0]}" for o in groups]
    for i, group in enumerate(groups):
        for value in swept_values(group):
            cfg = compose_job(fixed + first_groups[:i] + [f"{group.get_key_element()}={value}"] + first_groups[i + 1:])
    for key in (o for o in by_key.values() if not is_group(o)):
        for value in swept_values(key):
            OmegaConf.update(cfg, key.key_or_group, value, force_add=key.is_add())


def missing_plugin(overrides: list[str]) -> str | None:
    """The choice on the line whose optional plugin is not installed here, if any."""
    for override in overrides:
        plugin = PLUGINS.get(override)
        if plugin and importlib.util.find_spec(plugin[0]) is None:
            return override
    return None


@pytest.mark.slow  # about a second per composition, some 60 of them
@pytest.mark.parametrize("args", list(COMMANDS), ids=[" ".join(args) or "(defaults)" for args in COMMANDS])
def test_documented_command_composes(args, conf_dir):
    where, shown_output = COMMANDS[args]
    multirun, overrides = split_command(args)
    if plugin := missing_plugin(overrides):
        pytest.skip(f"{plugin} needs {PLUGINS[plugin][1]}, not installed here (train.py names the extra)")
    try:
        check_command(overrides, multirun)
    except Exception as error:
        if not shown_output:
            raise AssertionError(f"{where}: python train.py {' '.join(args)}: {error}") from error
        # an example of a refused value: the documented first line names the key Hydra names
        key = shown_output.split("=")[0]
        assert key in str(error), f"{where}: documented as {shown_output!r}, Hydra says {error}"
