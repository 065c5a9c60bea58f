"""The command line follows the usual conventions: --version, help on everything, exit codes named."""

from __future__ import annotations

import argparse
from importlib.metadata import version

from receiver.cli import build_parser
from tests.processes import run_command

run = run_command


def test_version_prints_the_package_version() -> None:
    answer = run("--version")
    assert answer.returncode == 0
    assert answer.stdout.strip() == f"intergiro-receiver {version('intergiro-receiver')}"


def parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += parsers(sub)
    return found


def test_every_command_and_option_has_a_help_text() -> None:
    missing = []
    for prog, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{prog} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{prog} {action.dest}")
    assert missing == []


def test_help_names_the_exit_codes_and_where_settings_come_from() -> None:
    for args in (["--help"], ["serve", "--help"], ["check", "--help"]):
        answer = run(*args)
        assert answer.returncode == 0
        assert "exit codes:" in answer.stdout
        assert ".env" in answer.stdout and "environment" in answer.stdout


def test_a_bad_command_line_exits_2() -> None:
    assert run("serve", "--processes", "-1").returncode == 2
    assert run("no-such-command").returncode == 2
