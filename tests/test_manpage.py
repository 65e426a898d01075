"""The man page: docs/splicelb.1 is what ``python -m lb.manpage`` writes from today's
command line, and groff renders it without a warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from lb.cli import cli
from lb.manpage import command_contexts, render

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "splicelb.1"
REGENERATE = "python -m lb.manpage -o docs/splicelb.1"

needs_groff = pytest.mark.skipif(
    shutil.which("groff") is None, reason="groff (Debian package groff-base) is missing"
)


def groff(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["groff", "-man", "-Tutf8", *options, str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_committed_page_is_what_the_command_line_says_today() -> None:
    assert PAGE.read_text() == render(cli), f"docs/splicelb.1 is stale: run {REGENERATE}"


def test_the_script_writes_the_page(tmp_path: Path) -> None:
    out = tmp_path / "splicelb.1"
    result = subprocess.run(
        [sys.executable, "-m", "lb.manpage", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == render(cli)


@needs_groff
def test_page_renders_without_warnings() -> None:
    result = groff("-ww", "-z")
    assert result.returncode == 0
    assert result.stderr == ""


@needs_groff
def test_page_shows_every_command_and_option_but_the_hidden_ones() -> None:
    # Plain text (no overstriking), no hyphenation, lines long enough for any usage line.
    result = groff("-P-cbou", "-rHY=0", "-rLL=200n")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    _, commands = command_contexts(cli)
    for context in commands:
        usage = " ".join([context.command_path, *context.command.collect_usage_pieces(context)])
        assert usage in text
        for param in context.command.params:
            if not isinstance(param, click.Option):
                continue
            shown = [name in text for name in param.opts]
            assert shown == [not param.hidden] * len(param.opts), (context.info_name, param.opts)
