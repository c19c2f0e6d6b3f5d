"""Layer tars without extracting as root: the tar index, truncated and foreign-compressed input,
names the writer refuses, bad destinations.  Extraction of real trees (owners, devices, xattrs)
is tests/kernel/test_layertar.py."""

from __future__ import annotations

import bz2
import io
import lzma
from pathlib import Path

import pytest

from pytest_sandbox.core.errors import InvalidSpecError, LayerTarError
from pytest_sandbox.images.layertar import (
    digest_dir,
    extract_layer_tar,
    tar_files,
)
from tests.layertar_support import build, dirm, reg, sym


def test_truncated_file_data_is_refused(tmp_path: Path) -> None:
    data = build(reg("etc/a", b"a" * 1000))
    start = data.index(b"a" * 100)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(LayerTarError, match="truncated"):
        extract_layer_tar(io.BytesIO(data[: start + 500]), str(dest))


@pytest.mark.parametrize(
    ("compress", "kind"), [(lzma.compress, "xz"), (bz2.compress, "bzip2")], ids=["xz", "bzip2"]
)
def test_other_compressions_are_refused_with_a_fix(tmp_path: Path, compress: object, kind: str) -> None:
    data = compress(build(reg("a", b"x")))  # type: ignore[operator]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(LayerTarError, match=f"{kind}-compressed") as info:
        extract_layer_tar(io.BytesIO(data), str(dest))
    assert "gzip" in info.value.hint


def test_writer_refuses_names_that_mean_a_deletion(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".wh.oops").write_text("x")
    with pytest.raises(LayerTarError, match=r"starts with '\.wh\.'"):
        digest_dir(str(tmp_path / "src"))


def test_bad_destinations_and_sources(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidSpecError, match="not empty"):
        extract_layer_tar(io.BytesIO(build(reg("a"))), str(tmp_path / "full"))
    with pytest.raises(InvalidSpecError, match="extraction target"):
        extract_layer_tar(io.BytesIO(build(reg("a"))), str(tmp_path / "missing"))
    with pytest.raises(InvalidSpecError, match="layer directory"):
        digest_dir(str(tmp_path / "missing"))


def test_tar_files_indexes_an_archive_in_place(tmp_path: Path) -> None:
    data = build(
        reg("./manifest.json", b"[]"),
        dirm("abc"),
        reg("abc/layer.tar", b"L" * 700),
        sym("l", "abc/layer.tar"),
    )
    files = tar_files(io.BytesIO(data))
    assert set(files) == {"manifest.json", "abc/layer.tar", "l"}
    offset, size = files["abc/layer.tar"]
    assert data[offset : offset + size] == b"L" * 700
    assert files["l"] == files["abc/layer.tar"]
