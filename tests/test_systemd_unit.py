"""The systemd unit: valid for systemd-analyze, and hardened to an exposure of 2.0 or less."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "splicelb.service"
INSTALLED = "/usr/local/bin/splicelb"  # where the README installs the command

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (Debian package systemd) is missing",
)


def splicelb_command() -> str:
    """The splicelb script of this environment (verify checks that ExecStart exists)."""
    found = shutil.which("splicelb") or str(Path(sys.executable).with_name("splicelb"))
    assert Path(found).exists(), "splicelb is not installed in this environment"
    return found


def test_unit_verifies_without_a_word(tmp_path: Path) -> None:
    unit = tmp_path / "splicelb.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, splicelb_command()))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


def test_unit_exposure_is_at_most_2() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_has_what_the_service_relies_on() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "KillMode=mixed",
        "ExecReload=",
        "RuntimeDirectory=splicelb",
        "LimitNOFILE=",
        "User=splicelb",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "WatchdogSec=",
    ):
        assert re.search(rf"^{re.escape(line)}", text, re.M), line
