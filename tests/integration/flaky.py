"""A backend whose health check can be switched to fail, for the health tests.

``python flaky.py --name A --port N [--ports N,M,...] [--host H] [--tls CERT KEY] [--log-checks]``

* ``GET /healthz``: by mode, ``ok`` (200 "ok A"), ``500``, ``hang`` (never
  answers) or ``body`` (200 with a body lacking "ok");
* ``GET /whoami``: the name, always;
* ``POST /control/MODE``: switch mode (sent straight to the backend, not through
  the balancer);
* with ``--log-checks``, one JSON line per health request: port and monotonic time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time

from aiohttp import web

MODES = ("ok", "500", "hang", "body")


def make_app(name: str, state: dict[str, str], log_checks: bool) -> web.Application:
    async def healthz(request: web.Request) -> web.StreamResponse:
        if log_checks:
            port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
            print(json.dumps({"port": port, "t": time.monotonic()}), flush=True)
        mode = state["mode"]
        if mode == "500":
            return web.Response(status=500, text="broken")
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "body":
            return web.Response(text="degraded")
        return web.Response(text=f"ok {name}")

    async def whoami(_request: web.Request) -> web.StreamResponse:
        return web.Response(text=name)

    async def control(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        if mode not in MODES:
            return web.Response(status=400, text=f"modes: {MODES}")
        state["mode"] = mode
        return web.Response(text=mode)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/control/{mode}", control)
    return app


async def serve(args: argparse.Namespace) -> None:
    state = {"mode": args.mode}
    context = None
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*args.tls)
    runner = web.AppRunner(make_app(args.name, state, args.log_checks), access_log=None)
    await runner.setup()
    ports = [args.port] + [int(p) for p in args.ports.split(",") if p]
    for port in ports:
        await web.TCPSite(runner, args.host, port, ssl_context=context).start()
    print(f"flaky {args.name} listening on {args.host}:{ports}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ports", default="")
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--log-checks", action="store_true")
    asyncio.run(serve(parser.parse_args()))
    sys.exit(0)


if __name__ == "__main__":
    main()
