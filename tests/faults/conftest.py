"""Fault injection: one fault at a time into a running instance, then proof that it serves.

The fixtures are the integration suite's (real processes on 127.0.0.1, each
killed at the end of its test).
"""

from __future__ import annotations

from tests.integration.conftest import echo_pair, namespace, procs, start_lb

__all__ = ["echo_pair", "namespace", "procs", "start_lb"]
