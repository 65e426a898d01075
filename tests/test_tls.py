"""``[listeners.tls]``: how it loads, what is refused and why, the contexts it makes,
and what ``splicelb check`` says about its certificates."""

from __future__ import annotations

import contextlib
import datetime
import ssl
from pathlib import Path

import pytest
import trustme

from lb import tls as lbtls
from lb.config import load_config
from lb.errors import ConfigError
from lb.tls import CertPair, ListenerTLS, certificate_names, data_path, server_context
from tests.integration.harness import cli
from tests.test_config import config, write


def pair(
    ca: trustme.CA,
    directory: Path,
    stem: str,
    *names: str,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names, not_after=not_after)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def tls_table(cert: str, key: str, extra: str = "") -> str:
    return f'[listeners.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n{extra}\n'


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def test_tls_loads_with_relative_paths_and_defaults(tmp_path: Path, ca: trustme.CA) -> None:
    pair(ca, tmp_path, "site", "example.test")
    pair(ca, tmp_path, "other", "*.other.test")
    extra = '[[listeners.tls.certificates]]\ncert_file = "other.pem"\nkey_file = "other.key"\n'
    cfg = load_config(write(tmp_path, config(more="") + "\n"))
    assert cfg.listeners[0].tls is None
    text = config(listener=tls_table("site.pem", "site.key", extra))
    tls = load_config(write(tmp_path, text)).listeners[0].tls
    assert tls is not None
    assert tls.min_version == "1.2"
    assert [(p.cert_file, p.key_file) for p in tls.pairs] == [
        (str(tmp_path / "site.pem"), str(tmp_path / "site.key")),
        (str(tmp_path / "other.pem"), str(tmp_path / "other.key")),
    ]
    assert [p.path for p in tls.pairs] == ["listeners[0].tls", "listeners[0].tls.certificates[0]"]


def test_bad_tls_tables_are_refused_naming_their_keys(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = pair(ca, tmp_path, "site", "example.test")
    _, other_key = pair(ca, tmp_path, "other", "other.test")
    assert problems_of(
        tmp_path,
        config(listener=tls_table(str(cert), str(key), 'min_version = "1.1"\nciphers = 1')),
    ) == [
        "listeners[0].tls.min_version: expected one of 1.2, 1.3; got '1.1'",
        "listeners[0].tls.ciphers: unknown key",
    ]
    assert problems_of(
        tmp_path, config(listener='mode = "tcp"\n' + tls_table(str(cert), str(key)))
    ) == ['listeners[0].tls: terminates TLS on mode = "http" listeners only, not "tcp"']
    assert problems_of(tmp_path, config(listener=tls_table("nope.pem", str(key)))) == [
        f"listeners[0].tls.cert_file: no such file: '{tmp_path / 'nope.pem'}'"
    ]
    assert problems_of(tmp_path, config(listener="[listeners.tls]\n")) == [
        "listeners[0].tls.cert_file: required key is missing",
        "listeners[0].tls.key_file: required key is missing",
    ]
    assert problems_of(tmp_path, config(listener=tls_table(str(cert), str(other_key)))) == [
        f"listeners[0].tls.key_file: '{other_key}' does not match the certificate in '{cert}'"
    ]
    extra = f'[[listeners.tls.certificates]]\ncert_file = "{cert}"\nkey = "{key}"\n'
    assert problems_of(tmp_path, config(listener=tls_table(str(cert), str(key), extra))) == [
        "listeners[0].tls.certificates[0].key_file: required key is missing",
        "listeners[0].tls.certificates[0].key: unknown key",
    ]


def test_tls_loads_with_accept_proxy(tmp_path: Path, ca: trustme.CA) -> None:
    """Behind an L4 balancer that sends a PROXY header and leaves TLS to splicelb."""
    cert, key = pair(ca, tmp_path, "site", "example.test")
    proxy = 'accept_proxy = true\ntrusted_proxies = ["10.0.0.0/8"]\n'
    (listener,) = load_config(
        write(tmp_path, config(listener=proxy + tls_table(str(cert), str(key))))
    ).listeners
    assert listener.tls is not None
    assert (listener.accept_proxy, listener.trusted_proxies) == (True, ("10.0.0.0/8",))
    assert problems_of(
        tmp_path, config(listener="accept_proxy = true\n" + tls_table(str(cert), str(key)))
    ) == [
        "listeners[0].accept_proxy: needs trusted_proxies: the peers that send a PROXY header"
        ' (e.g. trusted_proxies = ["10.0.0.0/8"])'
    ]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640])
def test_a_private_key_others_may_read_is_refused(
    tmp_path: Path, ca: trustme.CA, mode: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = pair(ca, tmp_path, "site", "example.test")
    key.chmod(mode)
    if mode == 0o640:  # the file's group is not this user's
        monkeypatch.setattr(lbtls.os, "getegid", lambda: key.stat().st_gid + 1)
    assert problems_of(tmp_path, config(listener=tls_table(str(cert), str(key)))) == [
        f"listeners[0].tls.key_file: private key '{key}' is readable by others than this"
        f" user (mode {mode:04o}); chmod 600 it (or 640 with this user's group)"
    ]


def test_a_key_its_own_group_may_read_is_accepted(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = pair(ca, tmp_path, "site", "example.test")
    key.chmod(0o640)  # root:splicelb 0640, read as splicelb: its own group
    assert load_config(write(tmp_path, config(listener=tls_table(str(cert), str(key)))))


def _handshake(context: ssl.SSLContext, client: ssl.SSLContext, name: str) -> ssl.SSLObject:
    """An in-memory handshake: the client's side once done."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=name)
    server_side = context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return client_side


def test_the_certificate_is_chosen_by_sni_exact_or_wildcard(tmp_path: Path, ca: trustme.CA) -> None:
    pairs = [
        CertPair(*map(str, pair(ca, tmp_path, "a", "a.test", "127.0.0.1")), "t"),
        CertPair(*map(str, pair(ca, tmp_path, "b", "b.test")), "t"),
        CertPair(*map(str, pair(ca, tmp_path, "w", "*.w.test")), "t"),
    ]
    assert certificate_names(pairs[2].cert_file) == ["*.w.test"]
    context = server_context(ListenerTLS(tuple(pairs)))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.check_hostname = False

    def served(name: str) -> str:
        cert = _handshake(context, client, name).getpeercert()
        assert cert is not None
        return str(cert["subjectAltName"][0][1])  # type: ignore[index]

    assert served("B.test") == "b.test"
    assert served("x.w.test") == "*.w.test"
    assert served("y.x.w.test") == "a.test"  # a wildcard is one label
    assert served("unknown.test") == "a.test"
    chosen = _handshake(context, client, "b.test")
    assert chosen.selected_alpn_protocol() is None  # offered none
    assert chosen.version() == "TLSv1.3"


def test_contexts_refuse_old_versions_compression_and_renegotiation(
    tmp_path: Path, ca: trustme.CA
) -> None:
    cert, key = pair(ca, tmp_path, "a", "a.test")
    for version, minimum in (("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)):
        context = server_context(ListenerTLS((CertPair(str(cert), str(key), "t"),), version))
        assert context.minimum_version == minimum
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
        assert {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"} <= {
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-RSA-CHACHA20-POLY1305",
        }
        client = ssl.create_default_context()
        ca.configure_trust(client)
        client.set_alpn_protocols(["h2", "http/1.1"])
        assert _handshake(context, client, "a.test").selected_alpn_protocol() == "http/1.1"


def test_check_warns_of_certificates_that_expire_within_14_days(
    tmp_path: Path, ca: trustme.CA
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = pair(ca, tmp_path, "soon", "soon.test", not_after=now + datetime.timedelta(days=3))
    late, late_key = pair(
        ca, tmp_path, "late", "late.test", not_after=now + datetime.timedelta(days=90)
    )
    gone, gone_key = pair(
        ca, tmp_path, "gone", "gone.test", not_after=now - datetime.timedelta(days=1)
    )
    extra = "".join(
        f'[[listeners.tls.certificates]]\ncert_file = "{c}"\nkey_file = "{k}"\n'
        for c, k in ((late, late_key), (gone, gone_key))
    )
    path = write(
        tmp_path,
        config(
            global_=f'runtime_dir = "{tmp_path}/run"',
            listener=tls_table(str(cert), str(key), extra),
        ),
    )
    result = cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f"warning: listeners[0].tls.cert_file: certificate '{cert}' expires in 2 days ("
    ) or lines[0].startswith(
        f"warning: listeners[0].tls.cert_file: certificate '{cert}' expires in 3 days ("
    )
    assert lines[1].startswith(
        f"warning: listeners[0].tls.certificates[1].cert_file: certificate '{gone}' expired "
    )


def test_check_refuses_a_key_that_does_not_match(tmp_path: Path, ca: trustme.CA) -> None:
    cert, _ = pair(ca, tmp_path, "a", "a.test")
    _, wrong = pair(ca, tmp_path, "b", "b.test")
    path = write(tmp_path, config(listener=tls_table(str(cert), str(wrong))))
    result = cli("check", "-c", str(path))
    assert result.returncode == 1
    assert (
        f"listeners[0].tls.key_file: '{wrong}' does not match the certificate in '{cert}'"
        in result.stderr
    )


def test_the_data_path_is_detected_not_assumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ulp = tmp_path / "ulp"
    ulp.write_text("mptcp\n")
    monkeypatch.setattr(lbtls, "ULP_PATH", str(ulp))
    monkeypatch.delattr(ssl, "OP_ENABLE_KTLS", raising=False)
    assert data_path() == (
        "copy",
        "no kernel TLS: this Python's ssl has no OP_ENABLE_KTLS (3.12+);"
        " the kernel offers no tls ULP (modprobe tls)",
    )
    ulp.write_text("mptcp tls\n")
    monkeypatch.setattr(ssl, "OP_ENABLE_KTLS", 1 << 3, raising=False)
    assert data_path() == ("copy", "kernel TLS is available, not used yet by this release")


def test_backend_tls_loads_and_its_keys_need_it(tmp_path: Path, ca: trustme.CA) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = config(backend='tls = true\nca_file = "ca.pem"\nsni = "App.Example"\nverify = false')
    backend = load_config(write(tmp_path, text)).backends[0]
    assert backend.tls is not None
    assert (backend.tls.ca_file, backend.tls.sni, backend.tls.verify) == (
        str(tmp_path / "ca.pem"),
        "App.Example",
        False,
    )
    assert load_config(write(tmp_path, config())).backends[0].tls is None
    assert problems_of(tmp_path, config(backend='ca_file = "ca.pem"\nverify = true')) == [
        "backends[0].ca_file: needs tls = true (its servers reached over TLS)",
        "backends[0].verify: needs tls = true (its servers reached over TLS)",
    ]
    assert problems_of(tmp_path, config(backend='tls = true\nca_file = "no.pem"\nsni = "a b"')) == [
        f"backends[0].ca_file: no such file: '{tmp_path / 'no.pem'}'",
        "backends[0].sni: expected a host name without port, got 'a b'",
    ]
