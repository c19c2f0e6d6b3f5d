"""``docker save`` tarballs (``docker-archive:FILE[:REF]``), read into the store and written from it.

An archive is read in place, never unpacked (a gzipped one is decompressed to a temporary file
first): its files are found by :func:`.tarformat.tar_files`, names checked as in a layer.  The
config must match the digest its name says; each layer is verified against the config's
diff_id.  Layers are written uncompressed, as ``docker save`` does.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import os
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, Any, BinaryIO

from ..core.errors import InvalidSpecError, LayerTarError
from ..core.imagemodel import ImageRecord, canonical_json, sha256_digest
from ..core.reference import Reference, parse_reference
from ..host.fstree import AtomicFile
from .layerimport import MAX_JSON, LayerSource, Progress, store_layers, with_progress
from .manifest import CHUNK, config_from_record, loads_json, record_from_config
from .store import Store
from .tarformat import tar_files

# -- docker-archive --------------------------------------------------------------------------


class _Member:
    """A regular file inside the archive, read in place (the archive is never unpacked)."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self.f = f
        self.offset = offset
        self.size = size
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


@contextlib.contextmanager
def _plain_archive(store: Store, file: str, where: str, progress: Progress | None) -> Iterator[BinaryIO]:
    """The archive, seekable and uncompressed (``docker save | gzip`` is unpacked to a temp file)."""
    try:
        f = open(file, "rb")  # noqa: SIM115 -- closed below
    except OSError as e:
        raise InvalidSpecError(f"{where}: {e.strerror}") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidSpecError(f"{where}: not a regular file")
        if f.read(2) != b"\x1f\x8b":
            f.seek(0)
            yield f
            return
        f.seek(0)
        with store.tempdir() as tmp, open(os.path.join(tmp, "archive.tar"), "w+b") as plain:
            try:
                total = os.fstat(f.fileno()).st_size
                raw = with_progress(f, where, total, progress)
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    shutil.copyfileobj(gz, plain, CHUNK)
                if progress is not None:
                    raw.end()
            except (OSError, EOFError, zlib.error) as e:
                raise LayerTarError(f"{where}: the gzip stream is corrupt ({e})") from None
            plain.seek(0)
            yield plain


def import_docker_archive(
    store: Store,
    file: str,
    ref: str | None = None,
    *,
    select: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Import the image of a ``docker save`` tarball; tag it ``ref`` (default: its RepoTags).

    ``select`` picks the image by one of its RepoTags when the archive holds several.  Returns
    the image id.  Layers (plain or gzip) are verified against the config's diff_ids; a layer
    refused after earlier ones were stored leaves those, verified, in the store unreferenced
    (until :meth:`Store.prune`).  ``progress(diff_id, bytes_done, bytes_total)`` hears how far
    each layer was read (and ``progress("docker-archive:FILE", ...)`` how far a gzip archive
    was decompressed first).
    """
    if ref is not None:
        parse_reference(ref)
    where = f"docker-archive:{file}"
    with _plain_archive(store, file, where, progress) as f:
        archive = _DockerArchive(f, where)
        entry = _archive_entry(archive.json_member("manifest.json", "manifest.json"), select, where, file)
        record = archive.config(entry.get("Config"))
        layers = entry.get("Layers")
        if not isinstance(layers, list) or len(layers) != len(record.layers):
            raise LayerTarError(f"{where}: manifest.json's Layers do not match the config's diff_ids")
        members = [archive.member(name, f"layer {i}") for i, name in enumerate(layers)]  # all there, first
        sources = [
            LayerSource(diff_id, m.size, functools.partial(_in_place, m))
            for m, diff_id in zip(members, record.layers, strict=True)
        ]
        store_layers(store, record, sources, progress)
    image_id = store.put_image(record)
    tags = [ref] if ref is not None else _repo_tags(entry)
    for t in tags:
        store.tag(t, image_id)
    return image_id


def _in_place(member: _Member) -> contextlib.AbstractContextManager[_Member]:
    return contextlib.nullcontext(member)


class _DockerArchive:
    """A ``docker save`` tarball (uncompressed, seekable), its files read in place."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f = f
        self.where = where
        try:
            self.files = tar_files(f)
        except LayerTarError as e:  # say which file: "layer tar entry '../x'" alone misleads here
            raise LayerTarError(f"{where}: {e.message}", hint=e.hint) from None

    def member(self, name: object, what: str) -> _Member:
        if not isinstance(name, str) or name not in self.files:
            raise LayerTarError(f"{self.where}: {what} {str(name)[:200]!r} is not in the archive")
        return _Member(self.f, *self.files[name])

    def json_member(self, name: str, what: str) -> Any:
        m = self.member(name, what)
        if m.size > MAX_JSON:
            raise LayerTarError(f"{self.where}: {what} is larger than {MAX_JSON} bytes")
        return loads_json(m.read(), f"{self.where}: {what}")

    def config(self, name: object) -> ImageRecord:
        """The record of config ``name``, checked against the digest its name says, if it does."""
        config_bytes = self.member(name, "config").read(MAX_JSON + 1)
        if len(config_bytes) > MAX_JSON:
            raise LayerTarError(f"{self.where}: the config is larger than {MAX_JSON} bytes")
        stem = os.path.basename(str(name)).removesuffix(".json")
        if re.fullmatch(r"[0-9a-f]{64}", stem) and sha256_digest(config_bytes) != "sha256:" + stem:
            raise LayerTarError(f"{self.where}: config {name!r} does not match its digest; not imported")
        return record_from_config(loads_json(config_bytes, f"{self.where}: config"))


def _archive_entry(manifest: Any, select: str | None, where: str, file: str) -> Mapping[str, Any]:
    """The manifest.json entry of the image asked for: tagged ``select``, or the only one."""
    if not isinstance(manifest, list) or not manifest or not all(isinstance(m, Mapping) for m in manifest):
        raise LayerTarError(f"{where}: manifest.json is not a list of images")
    if select is not None:
        wanted = str(parse_reference(select))
        chosen = [m for m in manifest if wanted in _repo_tags(m) or select in _strings_in(m.get("RepoTags"))]
        if not chosen:
            raise InvalidSpecError(f"{where}: no image tagged {select!r} in the archive")
        entry: Mapping[str, Any] = chosen[0]
        return entry
    if len(manifest) == 1:
        only: Mapping[str, Any] = manifest[0]
        return only
    raise InvalidSpecError(
        f"{where}: the archive holds {len(manifest)} images; say which one",
        hint=f"use docker-archive:{file}:REF with one of its tags",
    )


def _strings_in(value: object) -> list[str]:
    """The strings of a JSON list (nothing for anything else: a string is not a list of tags)."""
    return [x for x in value if isinstance(x, str)] if isinstance(value, list) else []


def _repo_tags(entry: Mapping[str, Any]) -> list[str]:
    """An archive's RepoTags, in docker's familiar form (skopeo writes ``docker.io/library/x``)."""
    out = []
    for t in _strings_in(entry.get("RepoTags")):
        with contextlib.suppress(InvalidSpecError):
            ref = parse_reference(t)
            if ref.registry in ("docker.io", "index.docker.io"):
                ref = Reference(None, ref.repository.removeprefix("library/"), ref.tag, ref.digest)
            out.append(str(ref))
    return out


def _tar_add(tar: tarfile.TarFile, name: str, f: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, f)


def export_docker_archive(store: Store, ref: str, file: str, *, repo_tag: str | None = None) -> None:
    """Write the stored image ``ref`` as a ``docker save`` tarball (uncompressed layers) to ``file``.

    ``RepoTags`` is ``repo_tag`` or ``ref``.  Written to a temp file beside ``file``, then renamed.
    """
    record = store.resolve(ref)
    tar_digests = [store.tar_digest(d) for d in record.layers]
    config_bytes = canonical_json(config_from_record(record, tar_digests))
    config_name = sha256_digest(config_bytes)[7:] + ".json"
    tag = str(parse_reference(repo_tag or ref)) if not (repo_tag or ref).startswith("sha256:") else None
    directory = os.path.dirname(os.path.abspath(file))
    if not os.path.isdir(directory):
        raise InvalidSpecError(f"docker-archive:{file}: directory {directory!r} does not exist")
    with (
        AtomicFile(file, tmp_dir=directory) as out,
        tarfile.open(fileobj=out.file, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        names: list[str] = []
        for diff_id, tar_digest in zip(record.layers, tar_digests, strict=True):
            name = tar_digest[7:] + ".tar"
            if name not in names:
                with store.open_layer_tar(diff_id) as layer:
                    size = layer.seek(0, io.SEEK_END)
                    layer.seek(0)
                    _tar_add(tar, name, layer, size)
            names.append(name)
        _tar_add(tar, config_name, io.BytesIO(config_bytes), len(config_bytes))
        manifest = [{"Config": config_name, "RepoTags": [tag] if tag else [], "Layers": names}]
        data = json.dumps(manifest).encode()
        _tar_add(tar, "manifest.json", io.BytesIO(data), len(data))
