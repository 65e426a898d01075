"""User-space instructions to sniff one request head, for each real client's head.

``python -m bench.heads`` counts, with callgrind (``bench.snippet``), what a
new ``HeadSniffer`` costs and what feeding it each head captured from a real
client (``tests/proto/fixtures``, a copy of the project's shared fixtures)
costs, the whole head in one piece, as the worker usually reads it; and
wrk's head, the one of the benchmark's new connections.  The heads of
WebSocket handshakes from browsers carry a dozen fields and more, and one
field that routing does not read costs less than one it does.  ``--code REV``
counts the sniffer of an earlier commit (``git archive``).
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.procs import REPO, log
from bench.snippet import code_under_test, per_call

FIXTURES = REPO / "tests" / "proto" / "fixtures"
WRK_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"


def sniff(times: int, path: str) -> None:
    """Feed the head in ``path`` (empty path: none) to ``times`` new sniffers (a
    bench.snippet snippet)."""
    from lb.proto.http1 import HeadSniffer  # noqa: PLC0415

    if not path:
        for _ in range(times):
            HeadSniffer()
        return
    with open(path, "rb") as f:
        head = f.read()
    for _ in range(times):
        HeadSniffer().feed(head)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=1000, help="heads of the short run (1000)")
    parser.add_argument("--code", default="", help="the sniffer of commit CODE (git archive)")
    args = parser.parse_args(argv)
    with code_under_test(args.code) as (code, tmp):
        wrk = tmp / "wrk.http"
        wrk.write_bytes(WRK_HEAD)
        heads = {"wrk": wrk} | {p.stem: p for p in sorted(FIXTURES.glob("*.http"))}
        log(f"sniffing {len(heads)} heads with {args.code or 'this tree'} under callgrind")
        new = per_call(code, sniff, args.times, "")
        result = {
            "code": args.code or "this tree",
            "new_sniffer": new,
            "feed": {
                name: per_call(code, sniff, args.times, str(p)) - new for name, p in heads.items()
            },
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
