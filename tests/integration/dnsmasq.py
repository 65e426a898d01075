"""A real DNS server for discovery tests: Debian's dnsmasq on 127.0.0.1 and a free port.

It answers for ``test.`` only (``local=/test/``: any other name is NXDOMAIN
at once), A and AAAA records from a hosts file it re-reads on SIGHUP, SRV
records from its config file, which it reads only when it starts (dnsmasq
re-reads no ``srv-host`` on SIGHUP): ``set_srv`` restarts it on the same
port.  Records have a TTL of 1 s (``local-ttl``).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.resolver
import pytest

from tests.integration.harness import Proc, free_port, wait_until

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def need_dnsmasq() -> None:
    if not Path(DNSMASQ).exists():
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq; .ci/run installs it)")


class Dnsmasq:
    """dnsmasq in the foreground; ``hosts`` are (ip, name) pairs, ``srv`` are (name,
    target, port, priority, weight) records."""

    def __init__(
        self,
        tmp: Path,
        hosts: Iterable[tuple[str, str]] = (),
        srv: Iterable[tuple[str, str, int, int, int]] = (),
        port: int | None = None,
        listen: tuple[str, ...] = (),
    ) -> None:
        """``listen``: addresses it answers on besides 127.0.0.1."""
        need_dnsmasq()
        self.listen = ("127.0.0.1", *listen)
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.hosts_file = self.dir / "hosts"
        self.conf_file = self.dir / "dnsmasq.conf"
        self.proc: Proc | None = None
        self.started_at = 0.0
        self._write_hosts(hosts)
        self._write_srv(srv)
        self.start()

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            DNSMASQ,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            *(f"--listen-address={address}" for address in self.listen),
            f"--port={self.port}",
            f"--addn-hosts={self.hosts_file}",
            f"--conf-file={self.conf_file}",
            "--local=/test/",
            "--local-ttl=1",
            "--user=root",
            "--group=root",
            "--pid-file=",
        ]
        self.started_at = time.time()  # it answers with its records from (just after) then
        self.proc = Proc(argv)
        wait_until(self.answers, 10, "dnsmasq to answer")

    def answers(self) -> bool:
        try:
            self.query("ping.test", "A")
        except dns.resolver.NXDOMAIN:
            return True
        except dns.exception.DNSException:
            return False
        return True

    def query(self, name: str, rdtype: str) -> list[str]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 1
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False)
        return sorted(r.to_text() for r in answer.rrset or ())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def set_hosts(self, hosts: Iterable[tuple[str, str]]) -> None:
        """New A/AAAA records, re-read on SIGHUP."""
        self._write_hosts(hosts)
        assert self.proc is not None
        self.proc.signal(signal.SIGHUP)

    def set_srv(self, srv: Iterable[tuple[str, str, int, int, int]]) -> None:
        """New SRV records: dnsmasq reads them only at start, so it starts again."""
        self._write_srv(srv)
        self.stop()
        self.start()

    def _write_hosts(self, hosts: Iterable[tuple[str, str]]) -> None:
        self.hosts_file.write_text("".join(f"{ip} {name}\n" for ip, name in hosts))

    def _write_srv(self, srv: Iterable[tuple[str, str, int, int, int]]) -> None:
        lines = [f"srv-host={n},{t},{p},{prio},{w}\n" for n, t, p, prio, w in srv]
        self.conf_file.write_text("".join(lines))

    def kill(self) -> None:
        self.stop()
