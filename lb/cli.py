"""The ``splicelb`` command line (click)."""

from __future__ import annotations

import sys

import click

from lb.config import DEFAULT_CONFIG_PATH, LOG_FORMATS, LOG_LEVELS, Config, load_config
from lb.errors import ConfigError
from lb.supervisor import Supervisor

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The TOML config file.",
)


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="splicelb")
def cli() -> None:
    """splicelb: a kernel-assisted load balancer for WebSocket and TCP traffic."""


@cli.command()
@config_option
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Overrides global.log_level.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), help="Overrides global.log_format.")
def run(config_path: str, log_level: str | None, log_format: str | None) -> None:
    """Run in the foreground: JSON log lines on stdout; SIGTERM drains and stops.

    \b
    Example:
      splicelb run -c /etc/splicelb/splicelb.toml
    """
    config = _load_or_exit(config_path)
    supervisor = Supervisor(config, log_level=log_level, log_format=log_format)
    sys.exit(supervisor.run())


@cli.command()
@config_option
def check(config_path: str) -> None:
    """Validate the config: exit 0, or 1 with one line per problem.

    \b
    Example:
      splicelb check -c /etc/splicelb/splicelb.toml
    """
    config = _load_or_exit(config_path)
    servers = sum(len(b.servers) for b in config.backends)
    click.echo(
        f"{config.path}: OK ({len(config.listeners)} listeners, "
        f"{len(config.backends)} backends, {servers} servers)"
    )


def main() -> None:
    cli(prog_name="splicelb")
