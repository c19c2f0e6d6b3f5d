"""The README and the docs stand alone and name what exists.

Issue 8, item 10: nothing in them points outside the repository, and the modules they name are the
package's modules (a re-layout that renames one must update the docs too).  docs/reliability.md
names, for each threat, the tests that prove its defence: each of them must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/architecture.md")
CHECKLIST = "docs/reliability.md"
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


@pytest.mark.parametrize("name", [*DOCS, CHECKLIST])
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


# `kernel/test_logs.py::test_name`, then `::test_other` for another test of the same file.
_NODE = re.compile(r"`(?:([a-z]+/test_[a-z0-9_]+\.py))?(?:::(test_[a-z0-9_]+))?`")


def test_every_test_the_checklist_names_exists() -> None:
    text = _text(CHECKLIST)
    named, missing, current = 0, [], None
    for path, func in _NODE.findall(text):
        if not path and not func:
            continue
        current = path or current
        assert current, f"{CHECKLIST}: ::{func} follows no test file"
        source = ROOT / "tests" / current
        named += 1
        if not source.exists() or (func and not re.search(rf"^def {func}\(", source.read_text(), re.M)):
            missing.append(f"{current}::{func}" if func else current)
    assert named > 20, f"{CHECKLIST} names {named} tests: the pattern is out of date"
    assert not missing, f"{CHECKLIST} names tests that do not exist: {missing}"
