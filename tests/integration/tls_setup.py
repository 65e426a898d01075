"""TLS test setup shared by the integration tests: certificates from ``trustme``."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from tests.test_tls import pair


@dataclass
class Certs:
    dir: Path
    ca: trustme.CA
    ca_file: Path
    cert_file: Path  # for localhost and 127.0.0.1: the default
    key_file: Path
    other_cert: Path  # for other.test: chosen by SNI
    other_key: Path

    def client_context(self, **options: Any) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        for name, value in options.items():
            setattr(context, name, value)
        return context


def make_certs(tmp_path: Path) -> Certs:
    """A CA, a default pair for localhost and 127.0.0.1, and one for other.test."""
    ca = trustme.CA()
    directory = tmp_path / "certs"
    directory.mkdir()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = pair(ca, directory, "default", "localhost", "127.0.0.1")
    other_cert, other_key = pair(ca, directory, "other", "other.test")
    return Certs(directory, ca, ca_file, cert_file, key_file, other_cert, other_key)
