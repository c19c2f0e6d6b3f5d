"""Image references and digests: parsed, normalised, and refused before any filesystem access."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_sandbox import Image, InvalidSpecError
from pytest_sandbox.core.reference import Reference, parse_digest, parse_reference
from pytest_sandbox.images.store import Store


@pytest.mark.parametrize(
    ("text", "expected", "normal"),
    [
        ("app", Reference(None, "app"), "app:latest"),
        ("app:1", Reference(None, "app", "1"), "app:1"),
        ("user/app:1.4.2", Reference(None, "user/app", "1.4.2"), "user/app:1.4.2"),
        ("localhost/app", Reference("localhost", "app"), "localhost/app:latest"),
        ("localhost:5000/a/b:v_1", Reference("localhost:5000", "a/b", "v_1"), "localhost:5000/a/b:v_1"),
        ("registry.example.com/x-y__z.w", Reference("registry.example.com", "x-y__z.w"), None),
        ("127.0.0.1:5000/app:Tag", Reference("127.0.0.1:5000", "app", "Tag"), "127.0.0.1:5000/app:Tag"),
        (
            "app@sha256:" + "a" * 64,
            Reference(None, "app", None, "sha256:" + "a" * 64),
            "app@sha256:" + "a" * 64,
        ),
    ],
)
def test_reference_parses_and_normalises(text: str, expected: Reference, normal: str | None) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == (normal or f"{text}:latest")
    assert parse_reference(str(ref)).name == ref.name


@pytest.mark.parametrize(
    "text",
    [
        "",
        "../x",
        "sha256:../../x",
        "a/../b",
        "/abs",
        "a//b",
        "App",
        "app:",
        ":tag",
        "app:-x",
        "app:" + "t" * 129,
        "app name",
        "app\n",
        "café",
        "a" * 256,
        "app@sha256:../x",
        "app@sha256:" + "A" * 64,
        "bad_host:5000/app",
        "-app",
        "app.",
    ],
)
def test_reference_refused_before_any_filesystem_access(text: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError):
        parse_reference(text)
    st = Store(tmp_path / "store")
    with pytest.raises(InvalidSpecError):
        st.resolve(text) if text else st.tag(text, "sha256:" + "0" * 64)
    with pytest.raises(InvalidSpecError):
        Image.host_base().tag(text, store=st)
    for call in (st.remove, st.untag):
        with pytest.raises(InvalidSpecError):
            call(text)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "text", ["sha256:", "sha256:abc", "sha256:../../x", "md5:" + "0" * 32, "sha256:" + "g" * 64]
)
def test_digests_are_strict(text: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError):
        parse_digest(text)
    st = Store(tmp_path / "store")
    calls = [st.layer_path, st.has_layer, st.get_image]
    if text.startswith("sha256:"):  # "md5:0000" is a valid name:tag
        calls += [st.resolve, st.remove]
    for call in calls:
        with pytest.raises(InvalidSpecError):
            call(text)
    assert not (tmp_path / "store").exists()
