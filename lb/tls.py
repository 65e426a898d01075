"""TLS termination on an http listener: its config, its server contexts, its checks.

A listener with a ``[listeners.tls]`` table terminates TLS: its first
certificate pair (``cert_file``, ``key_file``) is the default, and each pair
of ``[[listeners.tls.certificates]]`` is chosen instead when the client's
server name (SNI) is one its certificate names (a subjectAltName DNS entry,
exact or ``*.`` wildcard of one label, case-insensitive; the common name when
it has none).  Every pair gets its own :class:`ssl.SSLContext` with the same
settings: TLS ``min_version`` and up, AEAD ciphers with forward secrecy only
(Mozilla's "intermediate" list), no compression, no renegotiation, ALPN
``http/1.1``.

The loader (:func:`parse_tls`) builds those contexts once to validate the
files: a key that does not match its certificate, an unreadable file, or a
private key that group or others may read is a problem naming its key path.
Workers build them again from the same files when they start, so a reload
(a new generation) serves the files as they are then: new connections get the
new certificate, open ones keep the TLS state they have.

Data path: with kernel TLS (``ssl.OP_ENABLE_KTLS``, Python 3.12+, and the
kernel's ``tls`` ULP) OpenSSL could hand the record layer to the kernel; this
release detects it (:func:`data_path`) but always copies the decrypted bytes
through the ``ssl`` module (:mod:`lb.worker.tls`), and says so at start.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lb.config_table import Table

if TYPE_CHECKING:
    import ssl

    from cryptography import x509

# ssl and cryptography are imported where they are used: the commands that only talk
# to a running instance start without them (see tests/test_cli.py).
MIN_VERSIONS = ("1.2", "1.3")
# TLS 1.2 suites: ECDHE key exchange, AEAD only (TLS 1.3's are all of that kind).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
ALPN = ["http/1.1"]
EXPIRY_WARNING_DAYS = 14
ULP_PATH = "/proc/sys/net/ipv4/tcp_available_ulp"


@dataclass(frozen=True, slots=True)
class CertPair:
    cert_file: str  # absolute paths (a relative one is taken from the config's dir)
    key_file: str
    path: str  # its key path in the config, for messages: "listeners[0].tls"


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """A listener's ``[listeners.tls]``: the first pair is the default certificate."""

    pairs: tuple[CertPair, ...]
    min_version: str = "1.2"


def parse_tls(t: Table, base_dir: str) -> ListenerTLS:
    """Read ``[listeners.tls]`` and check its files (see the module's docstring)."""
    before = len(t.problems)
    pairs = [_parse_pair(t, base_dir)]
    pairs += [_parse_pair(extra, base_dir, alone=True) for extra in t.tables("certificates")]
    min_version = t.choice("min_version", "1.2", MIN_VERSIONS)
    t.finish()
    tls = ListenerTLS(tuple(pairs), min_version)
    if len(t.problems) == before:  # files readable, keys private: do they load and match?
        for pair in tls.pairs:
            try:
                _context(pair, tls.min_version)
            except OSError as exc:  # ssl.SSLError included
                t.problems.append(f"{pair.path}.key_file: {_load_problem(pair, exc)}")
    return tls


def _parse_pair(t: Table, base_dir: str, alone: bool = False) -> CertPair:
    """A certificate pair; ``alone``: its table holds nothing else (an entry of
    ``certificates``)."""
    cert_file = _file(t, "cert_file", base_dir)
    key_file = _file(t, "key_file", base_dir)
    if key_file and (problem := key_file_problem(key_file)):
        t.problem("key_file", problem)
    if alone:
        t.finish()
    return CertPair(cert_file, key_file, t.path)


def _file(t: Table, key: str, base_dir: str) -> str:
    name = t.string(key)
    if not name:
        return ""
    path = os.path.join(base_dir, name)
    if not os.path.isfile(path):
        t.problem(key, f"no such file: '{path}'")
        return ""
    if not os.access(path, os.R_OK):
        t.problem(key, f"'{path}' is not readable by this user")
        return ""
    return path


def key_file_problem(path: str) -> str | None:
    """Why a private key file may not be used: others may read it (its group only when
    that is not this user's own group, as ``root:splicelb 0640``)."""
    info = os.stat(path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IROTH or (mode & stat.S_IRGRP and info.st_gid != os.getegid()):
        return (
            f"private key '{path}' is readable by others than this user (mode {mode:04o});"
            f" chmod 600 it (or 640 with this user's group)"
        )
    return None


def _load_problem(pair: CertPair, exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    if reason == "KEY_VALUES_MISMATCH":
        return f"'{pair.key_file}' does not match the certificate in '{pair.cert_file}'"
    return f"cannot load '{pair.cert_file}' with '{pair.key_file}': {reason}"


def _context(pair: CertPair, min_version: str) -> ssl.SSLContext:
    import ssl  # noqa: PLC0415 (see MIN_VERSIONS)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion[f"TLSv1_{min_version[-1]}"]
    context.set_ciphers(CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    context.set_alpn_protocols(ALPN)
    context.load_cert_chain(pair.cert_file, pair.key_file)
    return context


def server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """The context a listener's connections start with: its default certificate, and a
    server-name callback that switches to another pair's context by SNI."""
    contexts = [_context(pair, tls.min_version) for pair in tls.pairs]
    default = contexts[0]
    if len(contexts) == 1:
        return default
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
    for pair, context in zip(tls.pairs, contexts, strict=True):
        for name in certificate_names(pair.cert_file):
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)

    def choose(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if not server_name:
            return
        name = server_name.lower().rstrip(".")
        chosen = exact.get(name) or wildcard.get(name.partition(".")[2])
        if chosen is not None:
            sslobj.context = chosen

    default.sni_callback = choose
    return default


def client_context(ca_file: str, verify: bool) -> ssl.SSLContext:
    """What a worker connects to a ``tls = true`` backend's servers with: the system CAs
    and ``ca_file``; ``verify = false`` accepts any certificate."""
    import ssl  # noqa: PLC0415 (see MIN_VERSIONS)

    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        context.load_verify_locations(ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(ALPN)
    return context


def _certificate(cert_file: str) -> x509.Certificate:
    from cryptography import x509  # noqa: PLC0415 (see MIN_VERSIONS)

    with open(cert_file, "rb") as file:
        return x509.load_pem_x509_certificate(file.read())


def certificate_names(cert_file: str) -> list[str]:
    """The DNS names a certificate is for, lowercased: its subjectAltName entries, or
    its common name when it has none."""
    from cryptography import x509  # noqa: PLC0415 (see MIN_VERSIONS)
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    cert = _certificate(cert_file)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [name.lower() for name in names]


def expiry_warnings(tls: ListenerTLS, now: datetime.datetime | None = None) -> list[str]:
    """Certificates that expire within ``EXPIRY_WARNING_DAYS``, or have."""
    now = now or datetime.datetime.now(datetime.UTC)
    warnings = []
    for pair in tls.pairs:
        not_after = _certificate(pair.cert_file).not_valid_after_utc
        left = not_after - now
        when = not_after.strftime("%Y-%m-%d %H:%M UTC")
        if left.total_seconds() <= 0:
            warnings.append(f"{pair.path}.cert_file: certificate '{pair.cert_file}' expired {when}")
        elif left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            warnings.append(
                f"{pair.path}.cert_file: certificate '{pair.cert_file}' expires in"
                f" {left.days} days ({when})"
            )
    return warnings


def data_path() -> tuple[str, str]:
    """How a terminating listener moves its bytes, and why: ``("copy", reason)`` here
    always (see the module's docstring); the reason says whether kernel TLS is there."""
    import ssl  # noqa: PLC0415 (see MIN_VERSIONS)

    missing = []
    if getattr(ssl, "OP_ENABLE_KTLS", None) is None:
        missing.append("this Python's ssl has no OP_ENABLE_KTLS (3.12+)")
    try:
        with open(ULP_PATH) as file:
            ulps = file.read().split()
    except OSError:
        ulps = []
    if "tls" not in ulps:
        missing.append("the kernel offers no tls ULP (modprobe tls)")
    if missing:
        return "copy", "no kernel TLS: " + "; ".join(missing)
    return "copy", "kernel TLS is available, not used yet by this release"
