"""An HTTP backend that says what it received, for the request tests.

``python recorder.py --name A --port N [--sequential]`` prints one line when
it listens, then one JSON line per request it receives: its backend name,
method, path, Host, Origin, its body's length and SHA-256, and the port it
came from (one per connection).  Every answer is that same JSON, kept alive.
It binds 127.0.0.1 only.

By default it is an aiohttp server, and ``GET /ws`` with upgrade headers
becomes a WebSocket echo (after its line).  aiohttp drops the answers it
still owes when its client half-closes; with ``--sequential`` it is the
standard library's ``http.server`` instead, which answers the requests it
has read, one after the other, before it looks for the next one or for the
end of file (no WebSocket there).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import WSMsgType, web

NAME = web.AppKey("name", str)
_OUT = threading.Lock()


def report(seen: dict[str, Any]) -> bytes:
    line = json.dumps(seen)
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return line.encode()


async def record(request: web.Request) -> web.StreamResponse:
    digest, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    peer = request.transport.get_extra_info("peername") if request.transport else None
    seen = {
        "backend": request.app[NAME],
        "method": request.method,
        "path": request.path,
        "host": request.headers.get("Host"),
        "origin": request.headers.get("Origin"),
        "length": length,
        "sha256": digest.hexdigest(),
        "upgrade": upgrade,
        "peer": peer[1] if peer else None,
    }
    report(seen)
    if upgrade and request.method == "GET" and request.path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws
    return web.json_response(seen)


async def serve(name: str, port: int) -> None:
    app = web.Application()
    app[NAME] = name
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"recorder {name} listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


class Sequential(BaseHTTPRequestHandler):
    """One request after the other, each answered before the next is read."""

    protocol_version = "HTTP/1.1"
    name = ""

    def do_GET(self) -> None:
        digest, length = hashlib.sha256(), 0
        for chunk in self._body():
            digest.update(chunk)
            length += len(chunk)
        body = report(
            {
                "backend": self.name,
                "method": self.command,
                "path": self.path.partition("?")[0],
                "host": self.headers.get("Host"),
                "origin": self.headers.get("Origin"),
                "length": length,
                "sha256": digest.hexdigest(),
                "upgrade": False,
                "peer": self.client_address[1],
            }
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_GET

    def _body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while size := int(self.rfile.readline().split(b";")[0], 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):  # the trailer section
                pass
            return
        left = int(self.headers.get("Content-Length", 0))
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            left -= len(chunk)
            yield chunk

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_sequential(name: str, port: int) -> None:
    Sequential.name = name
    server = ThreadingHTTPServer(("127.0.0.1", port), Sequential)
    print(f"recorder {name} listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sequential", action="store_true", help="http.server, no WebSocket")
    args = parser.parse_args()
    if args.sequential:
        serve_sequential(args.name, args.port)
    else:
        asyncio.run(serve(args.name, args.port))


if __name__ == "__main__":
    main()
