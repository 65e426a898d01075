"""The checks every fault test ends with pass on an instance that met no fault."""

from __future__ import annotations

from collections.abc import Callable

from tests.faults.checks import fault_config, still_serves
from tests.integration.harness import EchoBackend, SpliceLB, free_port


def test_an_instance_without_faults_passes_the_checks(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(fault_config(port, [(b.name, b.address) for b in echo_pair]))
    still_serves(lb, port)
