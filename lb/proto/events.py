"""What the sans-I/O readers of lb.proto share: the answer that more bytes are needed.

A module of its own, free of any parser's dependencies, so that the config (which
checks server names with :mod:`lb.proto.tls`) loads no HTTP parser."""

from __future__ import annotations

from typing import Final


class NeedData:
    """More bytes are needed before the input can be judged."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final[NeedData] = NeedData()
