"""The command-line tools explain themselves: each usage line names the console script that
starts it (pyproject.toml's [project.scripts], as installed), every option has help text, and
--help answers before torch or Lightning is imported (so at once, not after seconds of imports)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
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


HELP_BEFORE_TORCH = """
import sys
from loralab.{tool} import main
try:
    main(["--help"])
except SystemExit as e:
    assert e.code == 0, f"--help exited {{e.code}}"
heavy = [name for name in ("torch", "lightning") if name in sys.modules]
assert not heavy, f"--help imported {{heavy}}"
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_help_is_printed_before_torch_or_lightning_is_imported(tool):
    result = subprocess.run([sys.executable, "-c", HELP_BEFORE_TORCH.format(tool=tool)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    [script] = [name for name, target in SCRIPTS.items() if target == f"loralab.{tool}:main"]
    assert result.stdout.startswith(f"usage: {script} ") and "options:" in result.stdout
