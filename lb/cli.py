"""The ``splicelb`` command line (click).

Only ``run`` needs the supervisor, and through it the workers, asyncio, aiohttp
and the rest: it imports them itself.  The other commands read a file or talk
to the running instance, and answer in the time the light modules imported
here take to load (tests/test_cli.py checks what they load).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import NoReturn

import click
from click.core import ParameterSource

from lb import control
from lb.config import (
    DEFAULT_CONFIG_PATH,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WEIGHT,
    Config,
    capacity_warnings,
    load_config,
    local_ports,
    runtime_dir_of,
)
from lb.config_table import parse_address
from lb.errors import ConfigError, LBError, NotRunningError
from lb.rundir import not_writable
from lb.status import format_table, read_status
from lb.tls import expiry_warnings

EXIT_NOT_RUNNING = 3  # commands that talk to a running instance, when there is none
UPGRADE_TIMEOUT = 120.0  # seconds `splicelb upgrade` waits for the new generation

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The TOML config file.",
)


def _config_error(exc: ConfigError) -> NoReturn:
    for line in exc.problems:
        click.echo(line, err=True)
    sys.exit(1)


def _no_default_config(path: str, advice: str) -> None:
    """Exit 1 with ``advice`` when the config is the default one (not named) and absent."""
    source = click.get_current_context().get_parameter_source("config_path")
    if source is ParameterSource.DEFAULT and not os.path.exists(path):
        click.echo(f"splicelb: no config file at {path} (the default); {advice}", err=True)
        sys.exit(1)


def _load_or_exit(path: str) -> Config:
    _no_default_config(path, "give one with -c PATH")
    try:
        return load_config(path)
    except ConfigError as exc:
        _config_error(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="splicelb")
def cli() -> None:
    """splicelb: a kernel-assisted load balancer for WebSocket and TCP traffic."""


@cli.command()
@config_option
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Overrides global.log_level.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), help="Overrides global.log_format.")
@click.option("--resume", type=int, hidden=True, help="An upgrade's handoff (see lb.upgrade).")
def run(
    config_path: str, log_level: str | None, log_format: str | None, resume: int | None
) -> None:
    """Run in the foreground: JSON log lines on stdout; SIGTERM drains and stops.

    Logs are human-readable instead when stdout is a terminal (or with
    --log-format console). SIGHUP reloads the config.

    \b
    Example:
      splicelb run -c /etc/splicelb/splicelb.toml
    """
    config = _load_or_exit(config_path)
    # Loaded here, not above: the other commands answer without them (module docstring).
    from lb.supervisor import Supervisor  # noqa: PLC0415
    from lb.upgrade import read_handoff  # noqa: PLC0415

    handoff = None
    if resume is not None:  # this process was the supervisor a moment ago: same settings
        handoff = read_handoff(resume)
        log_level, log_format = handoff.log_level, handoff.log_format
    if log_format is None and sys.stdout.isatty():
        log_format = "console"  # a person is watching; JSON stays the default for pipes
    supervisor = Supervisor(config, log_level=log_level, log_format=log_format, handoff=handoff)
    sys.exit(supervisor.run())


@cli.command()
@config_option
def check(config_path: str) -> None:
    """Validate the config: exit 0, or 1 with one line per problem.

    Warnings (exit 0) are about this host rather than the file: a runtime_dir
    this user could not write, a TLS certificate that expires within 14 days.

    \b
    Example:
      splicelb check -c /etc/splicelb/splicelb.toml
    """
    config = _load_or_exit(config_path)
    if problem := not_writable(config.global_.runtime_dir):
        click.echo(f"warning: {problem}", err=True)
    ports = local_ports()
    for warning in capacity_warnings(config, ports) if ports else ():
        click.echo(f"warning: {warning}", err=True)
    for listener in config.listeners:  # the loader checked that each key matches and is private
        for warning in expiry_warnings(listener.tls) if listener.tls else ():
            click.echo(f"warning: {warning}", err=True)
    servers = sum(len(b.servers) for b in config.backends)
    spare = sum(b.spare_servers + b.dns_slots for b in config.backends)
    slots = f", {spare} spare slots" if spare else ""
    click.echo(
        f"{config.path}: OK ({len(config.listeners)} listeners, "
        f"{len(config.backends)} backends, {servers} servers{slots})"
    )


runtime_dir_option = click.option(
    "--runtime-dir",
    type=click.Path(file_okay=False),
    help="The running instance's runtime dir, instead of reading it from the config.",
)


def _runtime_dir(config_path: str, runtime_dir: str | None) -> str:
    if runtime_dir:
        return runtime_dir
    _no_default_config(
        config_path,
        "give the instance's config with -c PATH, or its runtime dir with --runtime-dir DIR",
    )
    try:
        return runtime_dir_of(config_path)
    except ConfigError as exc:
        _config_error(exc)


@cli.command()
@config_option
@runtime_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the status object as JSON.")
def status(config_path: str, runtime_dir: str | None, as_json: bool) -> None:
    """Show listeners, backends, servers (health, admin state, connections) and workers.

    Reads the live pool directly, so it answers even while the workers are busy.

    \b
    Examples:
      splicelb status -c /etc/splicelb/splicelb.toml
      splicelb status --runtime-dir /run/splicelb --json
    """
    directory = _runtime_dir(config_path, runtime_dir)
    try:
        state = read_status(directory)
    except NotRunningError as exc:
        click.echo(f"splicelb: {exc}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except LBError as exc:  # e.g. a pool this user may not read
        click.echo(f"splicelb: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(state) if as_json else format_table(state))


def _talk(directory: str, command: dict[str, object], timeout: float = 120) -> dict[str, object]:
    """One control request; a failure is one line and a non-zero exit, never a traceback.

    Exits with ``EXIT_NOT_RUNNING`` when there is no instance.
    """
    try:
        return control.request(directory, command, timeout)
    except NotRunningError as exc:
        click.echo(f"splicelb: {exc}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except LBError as exc:
        click.echo(f"splicelb: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # control.request says LBError; this is the last line of defence
        click.echo(f"splicelb: the control connection failed: {exc.strerror or exc}", err=True)
        sys.exit(1)


@cli.command()
@config_option
@runtime_dir_option
def reload(config_path: str, runtime_dir: str | None) -> None:
    """Reload the running instance's config and report the outcome.

    The instance re-reads the file it was started with. If it is invalid, the
    running config stays and each problem is printed; otherwise a new generation
    of workers takes over new connections while the old ones drain. Open
    tunnels are not touched.

    \b
    Example:
      splicelb reload -c /etc/splicelb/splicelb.toml
    """
    answer = _talk(_runtime_dir(config_path, runtime_dir), {"cmd": "reload"})
    if answer.get("ok"):
        click.echo(f"reloaded: generation {answer['generation']} is serving")
        return
    for line in answer.get("errors", []):  # type: ignore[attr-defined]
        click.echo(line, err=True)
    sys.exit(1)


@cli.command()
@config_option
@runtime_dir_option
def upgrade(config_path: str, runtime_dir: str | None) -> None:
    """Run the installed splicelb in place of the running one, without dropping anything.

    After installing a new version (pip install -U splicelb): the supervisor
    executes the new code in its own process (same pid, same listening
    sockets), starts a new generation of workers from it, and the old workers
    hand their open connections over to them, as on a reload. Waits until the
    new generation serves.

    \b
    Example:
      splicelb upgrade -c /etc/splicelb/splicelb.toml
    """
    directory = _runtime_dir(config_path, runtime_dir)
    answer = _talk(directory, {"cmd": "upgrade"})
    if not answer.get("ok"):
        for line in answer.get("errors", []):  # type: ignore[attr-defined]
            click.echo(line, err=True)
        sys.exit(1)
    before, deadline = int(str(answer["generation"])), time.monotonic() + UPGRADE_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            now = control.request(directory, {"cmd": "ping"}, timeout=5)
        except LBError:  # the new image is starting: the control socket answers again soon
            continue
        if now.get("generation", 0) > before and now.get("serving"):
            if now.get("pid") != answer["pid"]:
                click.echo(f"splicelb: the instance's pid changed to {now.get('pid')}", err=True)
                sys.exit(1)
            version, generation = now.get("version"), now["generation"]
            click.echo(f"upgraded: splicelb {version}, generation {generation} is serving")
            return
    click.echo(f"splicelb: no new generation serving after {UPGRADE_TIMEOUT:g} s", err=True)
    sys.exit(1)


@cli.command()
@click.option(
    "--file",
    "path",
    metavar="PATH",
    help="Read this log file, followed as tail -F does ('-': stdin), not the journal.",
)
@click.option(
    "--unit",
    default="splicelb",
    show_default=True,
    metavar="NAME",
    help="The systemd unit whose journal is read.",
)
@click.option(
    "--follow/--no-follow",
    default=True,
    help="Keep printing lines as they come (the default), or print what is there and exit.",
)
@click.option(
    "-n",
    "--lines",
    "last",
    type=click.IntRange(min=0),
    metavar="N",
    help="Start with the last N lines of the file or journal "
    "[default: 10; with --no-follow: all of them].",
)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="NAME",
    help="Only this backend (repeat for more).",
)
@click.option(
    "--server", "servers", multiple=True, metavar="NAME", help="Only this server (repeat for more)."
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    metavar="CODE",
    help="Only the balancer's answers with this status: 503, or a class such as 5xx "
    "(repeat for more).",
)
@click.option(
    "--errors",
    is_flag=True,
    help="Only failures: answers of 400 and up, connections that ended badly, warnings and errors.",
)
@click.option("--utc", is_flag=True, help="Times in UTC, as logged, instead of local time.")
@click.option(
    "--no-color",
    is_flag=True,
    help="No colours (none either when NO_COLOR is set or the output is not a terminal).",
)
def tail(
    path: str | None,
    unit: str,
    follow: bool,
    last: int | None,
    backends: tuple[str, ...],
    servers: tuple[str, ...],
    statuses: tuple[str, ...],
    errors: bool,
    utc: bool,
    no_color: bool,
) -> None:
    """Follow the running instance's log lines and print them for people.

    One line per connection (time, client, listener -> backend/server, the
    balancer's answer or the tunnel and why it closed, duration, bytes),
    coloured by outcome; other events as "level event key=value". Filters
    combine: a line is shown when it passes all of them. Reads the journal of
    the systemd unit, or --file, or stdin when a log is piped in.

    \b
    Examples:
      splicelb tail --errors
      splicelb tail --file /var/log/splicelb.log --backend app --status 5xx
      journalctl -u splicelb --since today -o cat | splicelb tail --errors
    """
    from lb import tail as logtail  # noqa: PLC0415 (only this command needs it)

    try:
        wanted = tuple(logtail.parse_status(status) for status in statuses)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--status'") from None
    keep = logtail.Filter(frozenset(backends), frozenset(servers), wanted, errors)
    style = logtail.Style(
        color=logtail.color_wanted(no_color, sys.stdout),
        utc=utc,
        arrow=logtail.arrow_for(sys.stdout),
    )
    unit_given = click.get_current_context().get_parameter_source("unit") is not (
        click.core.ParameterSource.DEFAULT
    )
    try:
        lines = logtail.open_lines(
            path,
            unit,
            unit_given=unit_given,
            follow=follow,
            last=last,
            notice=lambda text: click.echo(f"splicelb: {text}", err=True),
        )
        sys.exit(logtail.serve(lines, keep, style))
    except LBError as exc:
        click.echo(f"splicelb: {exc}", err=True)
        sys.exit(1)


def _admin_command(state: str, summary: str, example: str) -> None:
    @cli.command(name=state, help=f"{summary}\n\n\b\nExample:\n  {example}")
    @config_option
    @runtime_dir_option
    @click.argument("target", metavar="BACKEND/SERVER")
    def command(config_path: str, runtime_dir: str | None, target: str) -> None:
        backend, sep, server = target.partition("/")
        if not sep or not backend or not server:
            raise click.BadParameter("expected BACKEND/SERVER, e.g. app/a1", param_hint="target")
        answer = _talk(
            _runtime_dir(config_path, runtime_dir),
            {"cmd": "admin", "backend": backend, "server": server, "state": state},
        )
        if not answer.get("ok"):
            for line in answer.get("errors", []):  # type: ignore[attr-defined]
                click.echo(f"splicelb: {line}", err=True)
            sys.exit(1)
        click.echo(f"{backend}/{server}: {answer['from']} -> {answer['to']}")


_admin_command(
    "drain",
    "Send no new connections to a server; its open connections stay.",
    "splicelb drain -c /etc/splicelb/splicelb.toml app/a1",
)
_admin_command(
    "maint",
    "Take a server out of rotation and pause its health checks; open connections stay.",
    "splicelb maint -c /etc/splicelb/splicelb.toml app/a1",
)
_admin_command(
    "ready",
    "Put a server back to normal after drain or maint.",
    "splicelb ready -c /etc/splicelb/splicelb.toml app/a1",
)


@cli.group()
def server() -> None:
    """Add, remove and re-weight servers of a running instance, with no reload.

    Added servers live in the backend's spare slots (its spare_servers key) and
    survive reloads; `splicelb status` lists them with source "api".
    """


def _target(target: str) -> tuple[str, str]:
    backend, sep, name = target.partition("/")
    if not sep or not backend or not name:
        raise click.BadParameter("expected BACKEND/NAME, e.g. app/a3", param_hint="target")
    return backend, name


def _server_request(
    config_path: str, runtime_dir: str | None, request: Mapping[str, object]
) -> dict[str, object]:
    answer = _talk(_runtime_dir(config_path, runtime_dir), {"cmd": "server", **request})
    if not answer.get("ok"):
        for line in answer.get("errors", []):  # type: ignore[attr-defined]
            click.echo(f"splicelb: {line}", err=True)
        sys.exit(1)
    return answer


@server.command(name="add")
@config_option
@runtime_dir_option
@click.option(
    "--weight",
    type=click.IntRange(1, MAX_WEIGHT),
    default=1,
    show_default=True,
    help="Its share of the backend's connections, as a configured server's weight.",
)
@click.argument("target", metavar="BACKEND/NAME")
@click.argument("address", metavar="ADDRESS")
def server_add(
    config_path: str, runtime_dir: str | None, weight: int, target: str, address: str
) -> None:
    """Add a server (host:port or [v6]:port; a host name is resolved once, here).

    \b
    Example:
      splicelb server add -c /etc/splicelb/splicelb.toml app/a3 10.0.0.7:9001 --weight 2
    """
    backend, name = _target(target)
    try:
        resolved = parse_address(address, "ADDRESS")
    except ConfigError as exc:
        click.echo(f"splicelb: {exc.problems[0]}", err=True)
        sys.exit(1)
    numeric = f"[{resolved.sockaddr[0]}]" if ":" in resolved.sockaddr[0] else resolved.sockaddr[0]
    request = {"action": "add", "backend": backend, "server": name, "weight": weight}
    answer = _server_request(
        config_path, runtime_dir, {**request, "address": f"{numeric}:{resolved.port}"}
    )
    click.echo(f"{backend}/{name}: added at {answer['address']}, weight {answer['weight']}")


@server.command(name="remove")
@config_option
@runtime_dir_option
@click.argument("target", metavar="BACKEND/NAME")
def server_remove(config_path: str, runtime_dir: str | None, target: str) -> None:
    """Remove a server added with `server add`: no new connections; open ones stay.

    \b
    Example:
      splicelb server remove -c /etc/splicelb/splicelb.toml app/a3
    """
    backend, name = _target(target)
    request = {"action": "remove", "backend": backend, "server": name}
    answer = _server_request(config_path, runtime_dir, request)
    click.echo(f"{backend}/{name}: removed ({answer['address']}); its open connections stay")


@server.command(name="weight")
@config_option
@runtime_dir_option
@click.argument("target", metavar="BACKEND/NAME")
@click.argument("weight", type=click.IntRange(1, MAX_WEIGHT))
def server_weight(config_path: str, runtime_dir: str | None, target: str, weight: int) -> None:
    """Change the weight of a server added with `server add`.

    \b
    Example:
      splicelb server weight -c /etc/splicelb/splicelb.toml app/a3 4
    """
    backend, name = _target(target)
    request = {"action": "weight", "backend": backend, "server": name, "weight": weight}
    answer = _server_request(config_path, runtime_dir, request)
    click.echo(f"{backend}/{name}: weight {answer['from']} -> {answer['to']}")


def main() -> None:
    cli(prog_name="splicelb")
