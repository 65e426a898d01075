"""A child process's tie to its parent: the kernel signals it when the parent dies.

Apart from :mod:`lb.children`, which imports the worker, the prober, uvloop
and aiohttp, so that the benchmark's process launchers and its bare splice
floor (``bench/``) take the same call without those imports.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
