"""Every command-line example in the README parses with the flags of the command it runs, so the docs cannot
drift from the code.

Each `python -m mlx_gemma4.<module> ...` command is run as `python -m` runs it (`runpy`, as `__main__`, with that
`sys.argv`), but the first `ArgumentParser.parse_args` call stops the program right after parsing: no model is
loaded, nothing is downloaded. This goes through the parser the command really uses, whether or not its module
exposes it as `build_parser()`.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
COMMAND = re.compile(r"python -m (mlx_gemma4\.\w+)(.*)")


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, module, arguments) of every `python -m mlx_gemma4.<module>` command in the README; a command
    ends at `&&`, `|`, `;` or a `#` comment."""
    commands = []
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        match = COMMAND.search(line)
        if match is None:
            continue
        words = []
        for word in shlex.split(match.group(2), comments=True):
            if word in ("&&", "|", ";", "||"):
                break
            words.append(word)
        commands.append((number, match.group(1), words))
    return commands


class _Parsed(Exception):
    """Raised right after a successful parse, to stop before the command does any work."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def _parse_and_stop(real_parse_args):
    def parse_args(self, args=None, namespace=None):
        raise _Parsed(real_parse_args(self, args, namespace))

    return parse_args


def test_the_readme_shows_every_command() -> None:
    modules = {module for _, module, _ in readme_commands()}
    assert {"mlx_gemma4.generate", "mlx_gemma4.chat", "mlx_gemma4.speech", "mlx_gemma4.convert"} <= modules


@pytest.mark.parametrize("number, module, arguments", readme_commands(),
                         ids=[f"line{number}" for number, _, _ in readme_commands()])
def test_readme_command_parses(number: int, module: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _parse_and_stop(argparse.ArgumentParser.parse_args))
    monkeypatch.setattr(sys, "argv", [module, *arguments])
    try:
        with warnings.catch_warnings():
            # runpy warns that the module was imported before it ran as __main__ (by another test); harmless here.
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        assert parsed.namespace is not None
    except SystemExit as e:
        pytest.fail(f"README line {number}: `python -m {module} {shlex.join(arguments)}` does not parse "
                    f"(exit {e.code}): {capsys.readouterr().err.strip()}")
    else:
        pytest.fail(f"README line {number}: python -m {module} never parsed its arguments")
