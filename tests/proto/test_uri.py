"""Normal forms of paths and hosts: what routes compare and what servers are sent."""

from __future__ import annotations

import pytest

from lb.errors import ProtocolError
from lb.proto.uri import normalize_host, normalize_path, without_parameters


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/", "/"),
        ("/admin", "/admin"),
        ("/admin/", "/admin/"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a.b/c..d/...", "/a.b/c..d/..."),
        # unreserved characters decoded (RFC 3986 section 2.3), in either case
        ("/%61dmin", "/admin"),
        ("/%41%44%4d%49%4e", "/ADMIN"),
        ("/%2d%2E%5f%7E%30", "/-._~0"),
        # other escapes kept, upper-cased
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/%25%3b%3F%20", "/%25%3B%3F%20"),
        ("/%2561dmin", "/%2561dmin"),  # one decoding only: this is "/%61dmin" to a server
        # empty segments merged
        ("//admin", "/admin"),
        ("/admin//x///", "/admin/x/"),
        ("//", "/"),
        # dot segments resolved (RFC 3986 section 5.2.4)
        ("/./admin", "/admin"),
        ("/admin/../x", "/x"),
        ("/admin/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/./", "/a/"),
        ("/a/b/../../c", "/c"),
        ("/.", "/"),
        ("/%2e/admin", "/admin"),
        ("/x/%2E%2e/admin", "/admin"),
        ("/x/.%2e/admin", "/admin"),
        ("/x//../admin", "/admin"),
        # path parameters are kept (routes leave them out: see without_parameters)
        ("/admin;v=1/x", "/admin;v=1/x"),
        ("/a/;x", "/a/;x"),
    ],
)
def test_normal_form(path: str, normal: str) -> None:
    assert normalize_path(path) == normal
    assert normalize_path(normal) is normal  # idempotent, and a normal path is not copied


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/..", "above the root"),
        ("/../admin", "above the root"),
        ("/a/../../admin", "above the root"),
        ("/%2e%2e/admin", "above the root"),
        ("/a%", "percent-escape"),
        ("/a%4", "percent-escape"),
        ("/a%zz", "percent-escape"),
        ("/a%%41", "percent-escape"),
        ("/a%00b", "NUL"),
        ("/a%2Fb", "'/'"),
        ("/a%2fb", "'/'"),
        ("/%5Cadmin", "'\\'"),
        ("/\\admin", "'\\'"),
        ("/x/..;/admin", "parameters"),
        ("/x/.;a=b/admin", "parameters"),
        ("/x/%2e%2e;/admin", "parameters"),
    ],
)
def test_paths_without_a_normal_form(path: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        normalize_path(path)
    assert refused.value.status == 400
    assert reason in refused.value.reason


@pytest.mark.parametrize(
    ("path", "stripped"),
    [
        ("/admin", "/admin"),
        ("/admin;jsessionid=1", "/admin"),
        ("/admin;v=1/x", "/admin/x"),
        ("/admin;x/", "/admin/"),
        ("/admin/;x", "/admin/"),
        ("/;x/admin", "/admin"),
        ("/;x", "/"),
        ("/", "/"),
    ],
)
def test_without_parameters(path: str, stripped: str) -> None:
    assert without_parameters(path) == stripped


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("example.com", "example.com"),
        ("Internal.Example.COM", "internal.example.com"),
        ("internal.example.com.", "internal.example.com"),
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]", "[::1]"),
        ("[0:0:0:0:0:0:0:1]", "[::1]"),
        ("[2001:DB8::0001]", "[2001:db8::1]"),
    ],
)
def test_host_normal_form(host: str, normal: str) -> None:
    assert normalize_host(host) == normal


@pytest.mark.parametrize(
    "host", ["", ".", "a..", "a..b", ".a", "%61dmin", "a%2eb", "[::1::]", "[1.2.3.4]", "[]"]
)
def test_invalid_hosts(host: str) -> None:
    assert normalize_host(host) is None
