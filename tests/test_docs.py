"""The documents users read: every config key documented, every link resolves, a
changelog entry for this version, the license setup.cfg declares."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest

from lb import __version__, config_table
from lb.config import parse_config

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# One of everything the loader reads: a listener with a route, a backend with
# health checks, a server and DNS discovery.
EVERYTHING: dict[str, Any] = {
    "global": {"workers": 1},
    "listeners": [
        {
            "name": "l",
            "bind": "127.0.0.1:1",
            "default_backend": "b",
            "routes": [{"path_prefix": "/ws", "backend": "b"}],
        }
    ],
    "backends": [
        {
            "name": "b",
            "health": {"type": "http"},
            "servers": [{"name": "s", "address": "127.0.0.1:1"}],
            "discovery": {"name": "_s._tcp.example.test"},
        }
    ],
}


def keys_the_loader_reads(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """(table, key) for every key the config loader asks for, e.g. ("backends.health", "rise")."""
    asked: set[tuple[str, str]] = set()
    get = config_table.Table.get

    def recording(self: config_table.Table, key: str, *args: Any) -> Any:
        asked.add((re.sub(r"\[\d+\]", "", self.path), key))
        return get(self, key, *args)

    monkeypatch.setattr(config_table.Table, "get", recording)
    parse_config(EVERYTHING)
    return asked


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_every_config_key_is_in_the_readme_configuration_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = keys_the_loader_reads(monkeypatch)
    reference = section((REPO / "README.md").read_text(), "Configuration")
    assert len(asked) > 40  # the walk reached every table
    tables = {table for table, _ in asked}
    paths = {f"{table}.{key}".lstrip("."): key for table, key in asked}
    missing = sorted(
        path
        for path, key in paths.items()
        if f"`{key}`" not in reference and not (path in tables and f"{path}]" in reference)
    )
    assert not missing, f"config keys not documented under ## Configuration: {missing}"


def anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    title = re.sub(r"[`*_]", "", title.strip().lower())
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_link_in_the_documents_resolves(document: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # another site
        file, _, fragment = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        if not linked.exists() or (
            fragment and linked.suffix == ".md" and fragment not in anchors(linked)
        ):
            broken.append(target)
    assert not broken, f"{document.name}: links that lead nowhere: {broken}"


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
