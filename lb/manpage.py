"""The splicelb(1) man page, written from the click command tree.

``python -m lb.manpage -o docs/splicelb.1`` writes it; without ``-o`` it goes
to stdout. One page for the whole command: NAME, SYNOPSIS and DESCRIPTION from
the group, then each command's usage, help and options as ``splicelb COMMAND
--help`` shows them, read from click's own metadata (commands and options
marked hidden are left out). Only EXIT STATUS, FILES and SEE ALSO are fixed
text here. The tests regenerate the page and compare it with the committed
one, so it cannot go stale.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterator

import click

from lb import __version__
from lb.cli import cli
from lb.config import DEFAULT_CONFIG_PATH, DEFAULT_RUNTIME_DIR

NAME = "splicelb"
NO_REWRAP = "\b"  # click: a paragraph starting with this line is printed as written
# An option named in running text (--log-format, -c): its hyphens are minus signs, so
# that what a reader copies from the rendered page runs.
_OPTION_RE = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")

EXIT_STATUS = (
    ("0", "Success."),
    ("1", "An invalid config, or the command failed: a line on standard error says why."),
    ("2", "Invalid usage: an unknown option or command, or a missing argument."),
    (
        "3",
        "No instance is running (the commands that talk to a running instance); for "
        "run: a child process kept failing at boot, and the instance halted.",
    ),
)


def escape(text: str, *, literal: bool = False) -> str:
    """One line of text for roff: backslashes escaped, no control character at its
    start, and minus signs where hyphens are options (every hyphen if ``literal``)."""
    text = text.replace("\\", "\\e")
    if literal:
        text = text.replace("-", "\\-")
    else:
        text = _OPTION_RE.sub(lambda match: match[0].replace("-", "\\-"), text)
    return "\\&" + text if text.startswith((".", "'")) else text


def help_text(text: str) -> Iterator[str]:
    """Click help text as roff: a paragraph each, filled, except those that start with
    click's no-rewrap line, which keep their lines as written."""
    text = inspect.cleandoc(text.split("\f", maxsplit=1)[0])
    for paragraph in re.split(r"\n\s*\n", text) if text.strip() else []:
        lines = paragraph.splitlines()
        yield ".PP"
        if lines and lines[0].strip() == NO_REWRAP:
            yield ".nf"
            yield from (escape(line.rstrip(), literal=line.startswith(" ")) for line in lines[1:])
            yield ".fi"
        else:
            yield from (escape(line.strip()) for line in lines if line.strip())


def option_item(record: tuple[str, str]) -> Iterator[str]:
    """An option as a tagged paragraph: its names in bold, its value's name in italics."""
    names, description = record
    *others, last = names.split(", ")
    last, _, metavar = last.partition(" ")
    tag = ", ".join(f"\\fB{escape(name, literal=True)}\\fR" for name in [*others, last])
    yield ".TP"
    yield f"{tag} \\fI{escape(metavar)}\\fR" if metavar else tag
    yield escape(" ".join(description.split()))


def options(context: click.Context, params: list[click.Parameter]) -> Iterator[str]:
    for param in params:
        record = param.get_help_record(context)
        if isinstance(param, click.Option) and record is not None:  # None: hidden
            yield from option_item(record)


def usage(context: click.Context) -> str:
    """The command's usage line, as ``--help`` starts with it, its name in bold."""
    pieces = " ".join(context.command.collect_usage_pieces(context))
    name = escape(context.command_path, literal=True)
    return f"\\fB{name}\\fR {escape(pieces, literal=True)}"


def command_contexts(group: click.Group) -> tuple[click.Context, list[click.Context]]:
    """The group's context and one for each of its commands that is not hidden, in the
    order ``--help`` lists them; a group of commands (``splicelb server``) by its own."""
    root = group.make_context(NAME, [], resilient_parsing=True)
    return root, _commands(group, root)


def _commands(group: click.Group, parent: click.Context) -> list[click.Context]:
    commands = []
    for name in group.list_commands(parent):
        command = group.get_command(parent, name)
        if command is None or command.hidden:
            continue
        context = command.make_context(name, [], parent=parent, resilient_parsing=True)
        if isinstance(command, click.Group):
            commands += _commands(command, context)
        else:
            commands.append(context)
    return commands


DESCRIPTION = (
    r"\fBsplicelb run\fR runs the balancer in the foreground; the other commands check a "
    "config file or talk to the running instance, which they find through the runtime "
    r"directory named in the config, or the one given with \fB\-\-runtime\-dir\fR. Each "
    r"command also takes \fB\-h\fR, \fB\-\-help\fR, which prints its part of this page."
)
FILES = (
    (
        DEFAULT_CONFIG_PATH,
        r"The config file when \fB\-c\fR is not given (TOML; the README's Configuration "
        "section describes every key, and examples/ holds configs to copy).",
    ),
    (
        DEFAULT_RUNTIME_DIR,
        "The default runtime directory (global.runtime_dir): the live pool, the pid file "
        "and the control socket of the running instance.",
    ),
)
SEE_ALSO = r"\fBsystemctl\fR(1), \fBsystemd.service\fR(5), \fBjournalctl\fR(1)"


def fixed_sections() -> Iterator[str]:
    yield ".SH EXIT STATUS"
    for code, meaning in EXIT_STATUS:
        yield from (".TP", rf"\fB{code}\fR", escape(meaning))
    yield ".SH FILES"
    for path, meaning in FILES:
        yield from (".TP", rf"\fI{escape(path)}\fR", meaning)
    yield from (".SH SEE ALSO", SEE_ALSO)


def render(group: click.Group) -> str:
    """The man page of ``group``, a click group of commands, as roff (man macros)."""
    root, commands = command_contexts(group)
    summary, _, more = inspect.cleandoc(group.help or "").partition("\n")
    lines = [
        f'.TH {NAME.upper()} 1 "" "{NAME} {__version__}" "User Commands"',
        ".SH NAME",
        rf"{NAME} \- {escape(summary.removeprefix(f'{NAME}: ').rstrip('.'))}",
        ".SH SYNOPSIS",
    ]
    for context in [root, *commands]:
        lines += [".PP" if context is root else ".br", usage(context)]
    lines += [".SH DESCRIPTION", *help_text(more), ".PP", DESCRIPTION]
    lines += [".SH OPTIONS", *options(root, group.get_params(root)), ".SH COMMANDS"]
    for context in commands:
        lines += [f'.SS "{usage(context)}"', *help_text(context.command.help or "")]
        lines += options(context, context.command.params)
    lines += fixed_sections()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the splicelb(1) man page.")
    parser.add_argument("-o", "--output", help="the file to write (default: standard output)")
    args = parser.parse_args(argv)
    page = render(cli)
    if args.output is None:
        sys.stdout.write(page)
    else:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(page)


if __name__ == "__main__":
    main()
