"""The one small error hierarchy of splicelb.

Every error a user can see derives from :class:`LBError`.  Config errors carry
one line per problem, each naming the key path; protocol errors carry the HTTP
status the balancer answers with.
"""

from __future__ import annotations


class LBError(Exception):
    """Base of every splicelb error."""


class ConfigError(LBError):
    """The config file is invalid; ``problems`` holds one line per problem.

    Each line names the key path, e.g.
    ``backends[1].servers[0].address: port 70000 is out of range``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ProtocolError(LBError):
    """A client's request cannot be served; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}")


class NotRunningError(LBError):
    """No splicelb instance is running at the given runtime dir."""
