"""Load for the lifecycle tests, in its own process: open tunnels and a stream of new connections.

``python load.py --port P --tunnels N --rate R --duration D``

* N WebSocket tunnels (``/ws`` on the echo backends), each sending a message
  every ``--every`` seconds and checking its echo;
* R new connections per second, each one ``GET /whoami`` with
  ``Connection: close``, checked for a 200 answer.

Prints ``{"event": "tunnels_open"}`` once every tunnel is open, then, at the
end, one JSON summary: counts, and every failure with its time (monotonic).
Nothing is retried: a refused, reset, unanswered or wrong answer is a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

REQUEST = b"GET /whoami HTTP/1.1\r\nHost: load.test\r\nConnection: close\r\n\r\n"
ANSWER_TIMEOUT = 10.0


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.failures: list[dict[str, Any]] = []
        self.requests_ok = 0
        self.requests = 0
        self.messages_ok = 0
        self.last_echo: list[float] = []
        self.stop_at = 0.0

    def fail(self, kind: str, error: object, started: float) -> None:
        self.failures.append(
            {"kind": kind, "error": repr(error)[:200], "started": started, "at": time.monotonic()}
        )

    async def request(self) -> None:
        started = time.monotonic()
        self.requests += 1
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.args.port)
                writer.write(REQUEST)
                reply = await reader.read()
                writer.close()
            if not reply.startswith(b"HTTP/1.1 200"):
                raise ValueError(f"answer {reply[:40]!r}")
            self.requests_ok += 1
        except Exception as exc:
            self.fail("request", exc, started)

    async def tunnel(self, ws: ClientConnection, index: int) -> None:
        seq = 0
        while time.monotonic() < self.stop_at:
            seq += 1
            message = f"{index}:{seq}:" + "x" * 32
            started = time.monotonic()
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    await ws.send(message)
                    echo = await ws.recv()
                if echo != message:
                    raise ValueError("wrong echo")
                self.messages_ok += 1
                self.last_echo[index] = time.monotonic()
            except Exception as exc:
                self.fail("tunnel", exc, started)
                return
            await asyncio.sleep(self.args.every)

    async def run(self) -> dict[str, Any]:
        args = self.args
        url = f"ws://127.0.0.1:{args.port}/ws"
        sockets = []
        for _ in range(args.tunnels):
            sockets.append(await connect(url, open_timeout=10, ping_interval=None))
        self.last_echo = [0.0] * len(sockets)
        print(json.dumps({"event": "tunnels_open", "at": time.monotonic()}), flush=True)
        self.stop_at = time.monotonic() + args.duration
        tunnels = [asyncio.create_task(self.tunnel(ws, i)) for i, ws in enumerate(sockets)]
        pending: set[asyncio.Task[None]] = set()
        began = time.monotonic()
        sent = 0
        while time.monotonic() < self.stop_at:
            due = began + sent / args.rate if args.rate else self.stop_at
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if args.rate:
                task = asyncio.create_task(self.request())
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
        await asyncio.gather(*tunnels, *pending)
        for ws in sockets:
            await ws.close()
        return {
            "event": "summary",
            "requests": self.requests,
            "requests_ok": self.requests_ok,
            "rate": self.requests / args.duration,
            "tunnels": len(sockets),
            "messages_ok": self.messages_ok,
            "last_echo_min": min(self.last_echo, default=0.0),
            "failures": self.failures,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tunnels", type=int, default=0)
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--duration", type=float, default=5)
    args = parser.parse_args()
    summary = asyncio.run(Load(args).run())
    print(json.dumps(summary), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
