"""Reading a TOML table with typed getters, and the addresses in it.

:class:`Table` is one table of the config being read: each getter checks a
value's type and range, records that the key was used, and appends a problem
line prefixed by the key path (``listeners[0].bind: ...``) to a list shared by
the whole walk, returning a placeholder so the walk goes on; ``finish``
reports the keys nobody asked for, pointing a key that belongs in another
table (``workers`` above ``[global]``) there.  ``lb.config`` builds the
config from it.
"""

from __future__ import annotations

import difflib
import math
import re
import socket
from dataclasses import dataclass
from typing import Any

from lb.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Address:
    """A host:port, resolved once at load time, ready for connect/bind."""

    host: str  # as written, without the brackets of an IPv6 literal
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6
    sockaddr: tuple[Any, ...]

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# Stands in for an address that failed to parse; never leaves this module.
NO_ADDRESS = Address("", 0, socket.AF_INET, ())


def parse_address(text: str, path: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` and resolve the host once.

    Raises ConfigError with one line, prefixed by ``path``.
    """
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or not port_text:
        raise ConfigError([f"{path}: expected host:port or [v6]:port, got '{text}'"])
    if ":" in host and not bracketed:
        raise ConfigError(
            [f"{path}: an IPv6 address needs brackets, e.g. '[::1]:8080'; got '{text}'"]
        )
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError([f"{path}: port '{port_text}' is not a number"])
    port, lowest = int(port_text), 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ConfigError([f"{path}: port {port} is out of range ({lowest}-65535)"])
    family, flags = (socket.AF_INET6, socket.AI_NUMERICHOST) if bracketed else (0, 0)
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags)
    except (OSError, UnicodeError) as exc:
        if bracketed:
            raise ConfigError([f"{path}: '{host}' is not an IPv6 address"]) from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot resolve host '{host}': {reason}"]) from None
    resolved_family, _, _, _, sockaddr = infos[0]
    return Address(host, port, int(resolved_family), tuple(sockaddr))


def describe(value: Any) -> str:
    """How a TOML value reads in a problem line: its type, and itself if short."""
    if isinstance(value, list | dict):
        return "an array" if isinstance(value, list) else "a table"
    if isinstance(value, bool | str):
        return "boolean " + str(value).lower() if isinstance(value, bool) else f"string '{value}'"
    kind = {int: "integer", float: "float"}.get(type(value), type(value).__name__)
    return f"{kind} {value}"  # numbers, TOML dates and times


class Table:
    """One TOML table being read: typed getters, used-key tracking, problems."""

    __slots__ = ("_used", "data", "elsewhere", "path", "problems")

    def __init__(
        self,
        data: dict[str, Any],
        path: str,
        problems: list[str],
        elsewhere: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        # The keys of tables a misplaced key may belong in, by header ("[global]"),
        # shared by the whole walk: filled in as those tables are read.
        self.elsewhere = {} if elsewhere is None else elsewhere
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    def get(self, key: str, kinds: tuple[type, ...], expected: str, required: bool) -> Any:
        """The value at ``key`` if it has one of ``kinds``, else None (and a problem)."""
        self._used.add(key)
        if key not in self.data:
            if required:
                self.problem(key, "required key is missing")
            return None
        value = self.data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.problem(key, f"expected {expected}, got {describe(value)}")
            return None
        return value

    def string(self, key: str, default: str | None = None) -> str:
        """A string; ``default`` None makes the key required."""
        value = self.get(key, (str,), "a string", default is None)
        return (default or "") if value is None else str(value)

    def integer(self, key: str, default: int, lo: int, hi: int | None = None) -> int:
        value = self.get(key, (int,), "an integer", False)
        if value is None:
            return default
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            self.problem(key, f"must be {bounds}, got {value}")
        return int(value)

    def seconds(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        """A duration in seconds: > 0, or >= 0 with ``allow_zero``."""
        value = self.get(key, (int, float), "a number of seconds", False)
        if value is None:
            return default
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            self.problem(key, f"must be a number of seconds {bound}, got {value}")
        return float(value)

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in allowed:
            self.problem(key, f"expected one of {', '.join(allowed)}; got '{value}'")
        return value

    def name(self, key: str = "name") -> str:
        """A required name, as used in CLI arguments and metrics labels."""
        value = self.string(key)
        if isinstance(self.data.get(key), str) and not NAME_RE.fullmatch(value):
            why = f"'{value}' is not a valid name (use letters, digits, '_', '.', '-')"
            self.problem(key, why if value else "must not be empty")
        return value

    def address(self, key: str, text: str | None = None) -> Address:
        """Parse ``text``, or else the required string at ``key``, into an Address."""
        if text is None:
            text = self.get(key, (str,), "a string", True)
            if text is None:
                return NO_ADDRESS
        try:
            return parse_address(text, self.key_path(key))
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return NO_ADDRESS

    def items(self, key: str, expected: str) -> list[tuple[str, Any]]:
        """The (path, element) pairs of an array; [] if absent or not an array."""
        value = self.get(key, (list,), expected, False)
        return [(f"{self.key_path(key)}[{i}]", v) for i, v in enumerate(value or ())]

    def tables(self, key: str) -> list[Table]:
        """The tables of an array of tables (``[[key]]``)."""
        found = []
        for path, value in self.items(key, f"an array of tables ([[{key}]])"):
            if isinstance(value, dict):
                found.append(Table(value, path, self.problems, self.elsewhere))
            else:
                self.problems.append(f"{path}: expected a table, got {describe(value)}")
        return found

    def table(self, key: str) -> Table | None:
        value = self.get(key, (dict,), f"a table ([{key}])", False)
        if value is None:
            return None
        return Table(value, self.key_path(key), self.problems, self.elsewhere)

    def keys_read(self) -> frozenset[str]:
        """The keys a getter asked for: the keys this table may have."""
        return frozenset(self._used)

    def finish(self) -> None:
        """Report every key that no getter asked for."""
        for key in self.data:
            if key not in self._used:
                where = "" if self.path else " at top level"
                self.problem(key, f"unknown key{where}{self._hint(key)}")

    def _hint(self, key: str) -> str:
        """Where an unknown key may belong: a table that has it, else a key like it here,
        else one like it in another table."""
        reminder = "" if not self.path else " (a key belongs to the nearest table header above it)"
        for header, keys in self.elsewhere.items():
            if key in keys:
                return f"; did you mean {header} {key}?{reminder}"
        close = difflib.get_close_matches(key, self._used, n=1)
        if close:
            return f" (did you mean '{close[0]}'?)"
        for header, keys in self.elsewhere.items():
            close = difflib.get_close_matches(key, keys, n=1)
            if close:
                return f"; did you mean {header} {close[0]}?{reminder}"
        return ""
