"""The README and docs/architecture.md stand alone and name what exists.

Issue 8, item 10: nothing in them points outside the repository, and the modules they name are the
package's modules (a re-layout that renames one must update the docs too).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/architecture.md")
PACKAGE = ROOT / "pytest_sandbox"

# `core/spec`, `launcher/protocol.encode_spec`, `host/cgroups/`, `images/registry`: a module (or
# package) path below pytest_sandbox/, optionally followed by one of its names.
_MODULE_PATH = re.compile(r"`((?:core|host|launcher|net|images)(?:/[a-z_]+)*)/?(?:\.[a-z_]+)?`")
_LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")


def _text(name: str) -> str:
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"{name} is not in this copy of the repository")
    return path.read_text()


@pytest.mark.parametrize("name", DOCS)
def test_every_module_path_named_exists(name: str) -> None:
    named = set(_MODULE_PATH.findall(_text(name)))
    assert named, f"{name} names no module path: the pattern is out of date"
    missing = sorted(p for p in named if not (PACKAGE / f"{p}.py").exists() and not (PACKAGE / p).is_dir())
    assert not missing, f"{name} names modules that do not exist: {missing}"


@pytest.mark.parametrize("name", DOCS)
def test_links_stay_in_the_repository(name: str) -> None:
    text = _text(name)
    for target in _LINK.findall(text):
        assert "://" not in target, f"{name} links outside the repository: {target}"
        assert (ROOT / name).parent.joinpath(target).resolve().is_relative_to(ROOT), target
        assert (ROOT / name).parent.joinpath(target).exists(), f"{name} links to a missing {target}"
    assert "DESIGN.md" not in text


def test_the_package_points_at_no_design_file_outside_the_repository() -> None:
    stale = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "DESIGN.md" in p.read_text()]
    assert not stale, f"these modules point at a DESIGN.md (the design is docs/architecture.md): {stale}"
