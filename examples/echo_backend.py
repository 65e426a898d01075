"""Example backend for splicelb: a WebSocket echo server that says who it is.

Used by the demo and by the integration tests. Every HTTP response carries
``X-Backend: <name>`` and every non-WebSocket body names the backend, so a
person (or a test) can see which backend the load balancer picked.

Routes:
    GET /ws       WebSocket echo: each text or binary message comes back
                  unchanged, same type, in order; nothing is sent unasked.
    GET /healthz  ``ok <name>``
    GET /whoami   ``<name>``
    GET /         a self-contained page to try the echo from a browser.

Run: ``python examples/echo_backend.py --name echo1 --port 9001``
"""

from __future__ import annotations

import argparse
import asyncio
import html
import signal
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

DEFAULT_HOST = "127.0.0.1"

NAME = web.AppKey("name", str)
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Echo every data message back unchanged; pings are answered by aiohttp."""
    # max_msg_size=0: no limit, large messages are part of what we test.
    # compress=False: the balancer and its tests should see plain frames.
    ws = web.WebSocketResponse(max_msg_size=0, compress=False)
    await ws.prepare(request)
    open_sockets = request.app[WEBSOCKETS]
    open_sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        open_sockets.discard(ws)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text=f"ok {request.app[NAME]}")


async def whoami(request: web.Request) -> web.Response:
    return web.Response(text=request.app[NAME])


async def index(request: web.Request) -> web.Response:
    page = INDEX_HTML.replace("__BACKEND__", html.escape(request.app[NAME]))
    return web.Response(text=page, content_type="text/html")


@web.middleware
async def name_error_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Make error bodies (404, 405, a bad upgrade) name the backend too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        exc.text = f"{exc.text} (backend {request.app[NAME]})\n"
        raise


async def add_backend_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Backend"] = request.app[NAME]


async def close_websockets(app: web.Application) -> None:
    """On shutdown, tell WebSocket clients we are going away instead of hanging."""
    for ws in app[WEBSOCKETS].copy():
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def make_app(name: str) -> web.Application:
    """Build the echo application for the backend called ``name``."""
    app = web.Application(middlewares=[name_error_bodies])
    app[NAME] = name
    open_sockets: set[web.WebSocketResponse] = set()
    app[WEBSOCKETS] = open_sockets
    app.router.add_get("/", index)
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/whoami", whoami)
    app.on_response_prepare.append(add_backend_header)
    app.on_shutdown.append(close_websockets)
    return app


async def serve(name: str, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly."""
    runner = web.AppRunner(make_app(name), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        print(f"echo backend {name} listening on http://{host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="splicelb example WebSocket echo backend")
    parser.add_argument("--name", required=True, help="backend name shown in replies")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    asyncio.run(serve(args.name, args.host, args.port))


INDEX_HTML = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>WebSocket echo &ndash; served by __BACKEND__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 56rem;
         padding: 0 1rem; color: #222; }
  h1 { font-size: 1.5rem; margin-bottom: 0.25rem; }
  .backend { color: #0a58ca; }
  #state { margin: 0 0 1.5rem; color: #666; }
  .row { display: flex; gap: 0.5rem; margin-bottom: 0.75rem; align-items: center; }
  .row label { width: 6rem; }
  .row input { flex: 1; padding: 0.35rem 0.5rem; font: inherit; }
  button { padding: 0.35rem 0.9rem; font: inherit; cursor: pointer; }
  button:disabled { cursor: default; opacity: 0.5; }
  table { border-collapse: collapse; width: 100%; margin-top: 1rem; font-size: 0.9rem; }
  th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.5rem; text-align: left;
           vertical-align: top; }
  th { background: #f4f4f4; }
  td.text { font-family: ui-monospace, monospace; white-space: pre-wrap;
            word-break: break-all; }
  td.time { white-space: nowrap; color: #666; }
  tr.error td { color: #b02a37; }
  tr.client td.dir { color: #0a58ca; }
  tr.server td.dir { color: #198754; }
</style>
</head>
<body>
<h1>WebSocket echo &ndash; served by <span class="backend">__BACKEND__</span></h1>
<p id="state">Ready to connect&hellip;</p>

<div class="row">
  <label for="url">Server URL</label>
  <input id="url" type="text">
  <button id="connect">Connect</button>
  <button id="close" disabled>Close</button>
</div>
<div class="row">
  <label for="message">Message</label>
  <input id="message" type="text" disabled>
  <button id="send" disabled>Send</button>
</div>

<h2>Communication log</h2>
<table>
  <thead><tr><th>Direction</th><th>Text</th><th>Time</th></tr></thead>
  <tbody id="log"></tbody>
</table>

<script>
(function () {
  "use strict";
  var scheme = location.protocol === "https:" ? "wss://" : "ws://";
  var url = document.getElementById("url");
  var connectButton = document.getElementById("connect");
  var closeButton = document.getElementById("close");
  var message = document.getElementById("message");
  var sendButton = document.getElementById("send");
  var state = document.getElementById("state");
  var log = document.getElementById("log");
  var socket = null;

  url.value = scheme + location.host + "/ws";

  function addRow(kind, direction, text) {
    var row = document.createElement("tr");
    row.className = kind;
    [["dir", direction], ["text", text], ["time", new Date().toLocaleTimeString()]]
      .forEach(function (cell) {
        var td = document.createElement("td");
        td.className = cell[0];
        td.textContent = cell[1];  // textContent: echoed data is never parsed as HTML
        row.appendChild(td);
      });
    log.appendChild(row);
  }

  function update() {
    var open = socket !== null && socket.readyState === WebSocket.OPEN;
    var idle = socket === null || socket.readyState === WebSocket.CLOSED;
    url.disabled = !idle;
    connectButton.disabled = !idle;
    closeButton.disabled = !open;
    message.disabled = !open;
    sendButton.disabled = !open;
    var names = ["Connecting", "Open", "Closing", "Closed"];
    state.textContent = socket === null ? "Ready to connect\\u2026" : names[socket.readyState];
  }

  connectButton.onclick = function () {
    addRow("event", "connect", url.value);
    try {
      socket = new WebSocket(url.value);
    } catch (err) {
      addRow("error", "error", String(err));
      socket = null;
      update();
      return;
    }
    socket.binaryType = "arraybuffer";
    socket.onopen = function () { addRow("event", "open", "connection opened"); update(); };
    socket.onerror = function () { addRow("error", "error", "WebSocket error"); update(); };
    socket.onclose = function (event) {
      var text = "code " + event.code + (event.reason ? ", reason: " + event.reason : "");
      addRow("event", "close", text);
      update();
    };
    socket.onmessage = function (event) {
      var text = typeof event.data === "string"
        ? event.data : "[binary, " + event.data.byteLength + " bytes]";
      addRow("server", "server \\u2192 client", text);
    };
    update();
  };

  closeButton.onclick = function () {
    if (socket !== null) { socket.close(1000, "closed from page"); update(); }
  };

  function send() {
    if (socket === null || socket.readyState !== WebSocket.OPEN) { return; }
    socket.send(message.value);
    addRow("client", "client \\u2192 server", message.value);
    message.value = "";
    message.focus();
  }
  sendButton.onclick = send;
  message.onkeydown = function (event) { if (event.key === "Enter") { send(); } };

  update();
})();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    main()
