"""The changelog has an entry for the version being built; the license is the one
setup.cfg declares."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from lb import __version__

REPO = Path(__file__).resolve().parents[1]


def test_changelog_has_unreleased_and_this_version() -> None:
    headings = re.findall(r"^## (.+)$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "[Unreleased]"
    versions = [
        h for h in headings if re.fullmatch(r"\[[0-9][^]]*\] - [0-9]{4}-[0-9]{2}-[0-9]{2}", h)
    ]
    assert versions == headings[1:], "each release heading reads: ## [VERSION] - YYYY-MM-DD"
    assert any(h.startswith(f"[{__version__}] - ") for h in versions), __version__


def test_license_is_the_one_setup_cfg_declares() -> None:
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(REPO / "setup.cfg")
    declared = setup["metadata"]["license"]
    assert (REPO / "LICENSE").read_text().splitlines()[0] == f"{declared} License"
