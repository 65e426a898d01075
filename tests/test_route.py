"""Routing: first matching route wins, then the listener's default backend."""

from __future__ import annotations

from lb.config import parse_config
from lb.proto.http1 import Head, HeadSniffer
from lb.route import Router


def router(routes: list[dict[str, object]], origins: list[str] | None = None) -> Router:
    config = parse_config(
        {
            "listeners": [
                {
                    "name": "l",
                    "bind": "127.0.0.1:1",
                    "default_backend": "app",
                    "routes": routes,
                    "allowed_origins": origins or [],
                }
            ],
            "backends": [
                {"name": n, "servers": [{"name": "s", "address": "127.0.0.1:2"}]}
                for n in ("app", "chat", "api")
            ],
        }
    )
    return Router(config.listeners[0])


def head(raw: bytes) -> Head:
    event = HeadSniffer().feed(raw)
    assert isinstance(event, Head)
    return event


UPGRADE = (
    b"GET /ws/room HTTP/1.1\r\nHost: Chat.Example.com:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n"
)


def test_first_match_wins_then_default() -> None:
    r = router(
        [
            {
                "websocket": True,
                "host": "chat.example.com",
                "path_prefix": "/ws",
                "backend": "chat",
            },
            {"path_prefix": "/api", "backend": "api"},
            {"websocket": True, "backend": "api"},
        ]
    )
    assert r.backend_for(head(UPGRADE + b"\r\n")) == "chat"
    assert r.backend_for(head(b"GET /api/v1 HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")) == "api"
    assert r.backend_for(head(b"GET /ws/room HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")) == "app"
    other_host = UPGRADE.replace(b"Chat.Example.com:8080", b"other.example") + b"\r\n"
    assert r.backend_for(head(other_host)) == "api"


def test_origin_allowlist_applies_to_upgrades_only() -> None:
    r = router([], origins=["https://good.example"])
    assert r.origin_allowed(head(UPGRADE + b"Origin: https://good.example\r\n\r\n"))
    assert r.origin_allowed(head(UPGRADE + b"Origin: HTTPS://Good.Example/\r\n\r\n"))
    assert not r.origin_allowed(head(UPGRADE + b"Origin: https://evil.example\r\n\r\n"))
    assert r.origin_allowed(head(UPGRADE + b"\r\n"))  # no Origin: not a browser page
    plain = b"GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n"
    assert r.origin_allowed(head(plain))
    assert router([]).origin_allowed(head(UPGRADE + b"Origin: https://evil.example\r\n\r\n"))
