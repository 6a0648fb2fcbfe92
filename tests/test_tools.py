"""The command-line tools explain themselves: each usage line names the console script that
starts it (pyproject.toml's [project.scripts], as installed), and every option has help text."""

from __future__ import annotations

import argparse
import importlib
from importlib.metadata import entry_points

import pytest

SCRIPTS = {script.name: script.value for script in entry_points(group="console_scripts")}
TOOLS = ["report", "export", "analyze", "evaluate", "savings", "benchmark"]


class Parsed(Exception):
    """Raised instead of parsing, carrying the parser the tool built."""


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_a_console_script_named_as_its_usage_and_help_for_every_option(tool, monkeypatch):
    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(f"loralab.{tool}").main([])
    parser = parsed.value.args[0]
    assert SCRIPTS.get(parser.prog) == f"loralab.{tool}:main", f"usage: {parser.prog} is not a console script"
    for action in parser._actions:
        assert action.help, f"{parser.prog} {'/'.join(action.option_strings) or action.dest} has no help text"
