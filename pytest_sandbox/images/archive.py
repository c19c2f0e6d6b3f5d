"""OCI image layouts and ``docker save`` archives, in and out of the store (skopeo's transports).

Sources and destinations are named as skopeo names them, so nothing new is to be learnt:

* ``oci:DIR[:TAG]`` -- an OCI image layout directory (``oci-layout``, ``index.json``,
  ``blobs/sha256/...``); ``TAG`` is the ``org.opencontainers.image.ref.name`` annotation of
  the manifest in ``index.json``.
* ``docker-archive:FILE[:REF]`` -- a ``docker save`` tarball (``manifest.json``, a config JSON
  and one tar per layer, plain or gzip).  On import ``REF`` picks the image by its tag when the
  archive holds several; on export it is the tag written into ``RepoTags``.

Everything read is checked before it is used: digests must be ``sha256:<64 hex>`` (never a path),
blobs are regular files read up to their declared size and verified against their digest, no
symlink below a layout's root is followed (``blobs``, ``blobs/sha256`` and the files are opened
``O_NOFOLLOW`` from a descriptor of the layout), JSON documents are size- and depth-limited,
and each layer is unpacked by
:func:`pytest_sandbox.images.layertar.extract_layer_tar` (hostile entries refused) and stored only if
its content matches the config's ``diff_id``.  An image on the host base cannot be exported: its
lowest layer is this host.  Layers are written as gzip (deterministic: no name, mtime 0) into
OCI layouts and uncompressed into docker archives, as ``docker save`` does.

Imports take an optional ``progress(layer, bytes_done, bytes_total)`` callback (:data:`Progress`)
for the command line's progress display.  What an OCI layout shares with a registry -- media
types, descriptors, platform selection, digest checks, the verifying reader, the gzip writer,
config <-> record -- is :mod:`pytest_sandbox.images.manifest`'s.
"""

from __future__ import annotations

import contextlib
import errno
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from ..core.errors import InvalidSpecError, LayerTarError
from ..core.imagemodel import ImageRecord, canonical_json, sha256_digest
from ..core.reference import Reference, parse_reference
from ..host.fstree import AtomicFile, write_atomic
from .layertar import tar_files
from .manifest import (
    CHUNK,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    REF_NAME,
    Descriptor,
    Readable,
    VerifiedReader,
    config_from_record,
    gzip_blob,
    layer_created_by,
    loads_json,
    record_from_config,
    select_platform,
)
from .store import Store

MAX_JSON = 8 << 20
# the ref.name annotation grammar of the image spec (annotations.md)
_TAG_RE = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)
PROGRESS_STEP = 1 << 20  # a progress callback hears of every MiB read, and of the end
Progress = Callable[[str, int, int], None]
"""``progress(layer, bytes_done, bytes_total)``: ``layer`` is the layer's blob digest (OCI layout),
its diff_id (docker archive) or the archive's name while a gzip archive is decompressed; called
with ``bytes_done == 0`` first, then at least every :data:`PROGRESS_STEP` bytes, and with
``bytes_done == bytes_total`` once it is done (at once for a layer already in the store)."""
# -- transports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    """A parsed ``oci:DIR[:TAG]`` or ``docker-archive:FILE[:REF]``."""

    kind: str  # "oci" or "docker-archive"
    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.tag}" if self.tag else "")


def parse_transport(value: object) -> Transport:
    """Parse skopeo's transport syntax (the path ends at the first ':', as in skopeo)."""
    if not isinstance(value, str) or "\0" in value:
        raise InvalidSpecError(f"{value!r}: expected 'oci:DIR[:TAG]' or 'docker-archive:FILE[:REF]'")
    kind, sep, rest = value.partition(":")
    if not sep or kind not in ("oci", "docker-archive"):
        raise InvalidSpecError(
            f"{value!r}: unknown transport {kind!r}",
            hint="use oci:DIR[:TAG] (an OCI image layout) or docker-archive:FILE[:REF] (a docker save file)",
        )
    path, _, tag = rest.partition(":")
    if not path:
        raise InvalidSpecError(f"{value!r}: the {kind} transport needs a path, e.g. {kind}:./image")
    if tag and kind == "oci" and not _TAG_RE.fullmatch(tag):
        raise InvalidSpecError(
            f"{value!r}: {tag!r} is not a valid OCI ref name (letters, digits and . _ - : @ + / between them)"
        )
    if tag and kind == "docker-archive":
        parse_reference(tag)
    return Transport(kind, path, tag or None)


def import_image(
    src: str | Transport,
    ref: str | None = None,
    *,
    store: Store | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """Import ``src`` (``oci:DIR[:TAG]`` or ``docker-archive:FILE[:REF]``); tag it ``ref``; the image id.

    ``progress``, if given, is called as ``progress(layer, bytes_done, bytes_total)`` while
    layers are read (see :data:`Progress`).
    """
    t = src if isinstance(src, Transport) else parse_transport(src)
    store = store if store is not None else Store.default()
    if t.kind == "oci":
        return import_oci_layout(store, t.path, t.tag, ref, progress=progress)
    return import_docker_archive(store, t.path, ref, select=t.tag, progress=progress)


def export_image(ref: str, dst: str | Transport, *, store: Store | None = None) -> None:
    """Export the stored image ``ref`` to ``dst`` (``oci:DIR[:TAG]`` or ``docker-archive:FILE[:REF]``)."""
    t = dst if isinstance(dst, Transport) else parse_transport(dst)
    store = store if store is not None else Store.default()
    if t.kind == "oci":
        export_oci_layout(store, ref, t.path, t.tag)
    else:
        export_docker_archive(store, ref, t.path, repo_tag=t.tag)


# -- reading blobs ---------------------------------------------------------------------------


class _ProgressReader:
    """Passes reads through, telling ``progress`` how far it got (every PROGRESS_STEP bytes)."""

    def __init__(self, f: Readable, name: str, total: int, progress: Progress) -> None:
        self.f = f
        self.name = name
        self.total = total
        self.progress = progress
        self.done = self.reported = 0
        self.ended = False
        progress(name, 0, total)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.done += len(data)
        if not data:
            self.end()
        elif self.done - self.reported >= PROGRESS_STEP:
            self.reported = self.done
            self.progress(self.name, self.done, self.total)
        return data

    def end(self) -> None:
        """The last call: all of it was read (or it was not needed after all)."""
        if not self.ended:
            self.ended = True
            self.progress(self.name, max(self.done, self.total), self.total)


def _with_progress(f: Any, name: str, total: int, progress: Progress | None) -> Any:
    return f if progress is None else _ProgressReader(f, name, total, progress)


class _Layout:
    """An OCI image layout directory being read.

    The layout's own path may be a symlink (the user named it); below it nothing is followed:
    ``blobs``, ``blobs/sha256`` and every file are opened ``O_NOFOLLOW`` from a descriptor of the
    layout, so a layout cannot make us read a file outside it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidSpecError(f"oci:{path}: no such directory") from None
        except NotADirectoryError:
            raise InvalidSpecError(
                f"oci:{path}: not a directory (an OCI image layout is a directory)"
            ) from None
        except OSError as e:
            raise InvalidSpecError(f"oci:{path}: {e.strerror}") from None
        try:
            layout = self._json_file("oci-layout")
            if not isinstance(layout, Mapping) or layout.get("imageLayoutVersion") != "1.0.0":
                raise LayerTarError(f"oci:{path}: oci-layout does not say imageLayoutVersion 1.0.0")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Layout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, rel: str, what: str) -> IO[bytes]:
        *dirs, name = rel.split("/")
        parent = self.fd
        try:
            for part in dirs:
                sub = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
                )
                if parent != self.fd:
                    os.close(parent)
                parent = sub
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
        except FileNotFoundError:
            raise LayerTarError(f"oci:{self.path}: {what} ({rel}) is missing") from None
        except OSError as e:
            reason = (
                "it or a directory above it is a symlink"
                if e.errno in (errno.ELOOP, errno.ENOTDIR)
                else e.strerror
            )
            raise LayerTarError(f"oci:{self.path}: {what} ({rel}): {reason}") from None
        finally:
            if parent != self.fd:
                os.close(parent)
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise LayerTarError(f"oci:{self.path}: {what} ({rel}) is not a regular file")
        return f

    def _json_file(self, rel: str) -> Any:
        with self._open(rel, rel) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise LayerTarError(f"oci:{self.path}: {rel} is larger than {MAX_JSON} bytes")
        return loads_json(data, f"oci:{self.path}: {rel}")

    @contextlib.contextmanager
    def blob(self, digest: str, size: int | None, what: str) -> Iterator[VerifiedReader]:
        with self._open("blobs/sha256/" + digest[7:], what) as f:
            yield VerifiedReader(f, digest, size, f"oci:{self.path}: {what} {digest[:19]}")

    def check_blob_size(self, desc: Descriptor, what: str) -> None:
        """The blob is there, a regular file of its declared size (checked before anything is stored)."""
        with self._open("blobs/sha256/" + desc.digest[7:], what) as f:
            found = os.fstat(f.fileno()).st_size
        if found != desc.size:
            raise LayerTarError(
                f"oci:{self.path}: {what} {desc.digest[:19]}: {found} bytes, but its descriptor declares "
                f"{desc.size}",
                hint="the image is truncated or corrupt; copy it again",
            )

    def json_blob(self, digest: str, size: int, what: str) -> Any:
        if size > MAX_JSON:
            raise LayerTarError(f"oci:{self.path}: {what} declares {size} bytes (the limit is {MAX_JSON})")
        with self.blob(digest, size, what) as r:
            data = r.read(size + 1)
            r.finish()
        return loads_json(data, f"oci:{self.path}: {what}")

    def index(self) -> Any:
        return self._json_file("index.json")


def _ref_name(desc: object) -> str | None:
    """The ``org.opencontainers.image.ref.name`` annotation of an index entry, if it has one."""
    annotations = desc.get("annotations") if isinstance(desc, Mapping) else None
    name = annotations.get(REF_NAME) if isinstance(annotations, Mapping) else None
    return name if isinstance(name, str) else None


def _manifests(index: Any, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(index, Mapping) or not isinstance(index.get("manifests"), list):
        raise LayerTarError(f"{what}: expected an image index with a 'manifests' list")
    return list(index["manifests"])


def _resolve_manifest(layout: _Layout, desc: Descriptor, what: str, depth: int = 0) -> Any:
    doc = layout.json_blob(desc.digest, desc.size, "manifest")
    kind = doc.get("mediaType", desc.media_type) if isinstance(doc, Mapping) else desc.media_type
    if kind in INDEX_TYPES or (isinstance(doc, Mapping) and "manifests" in doc and "layers" not in doc):
        if depth > 4:
            raise LayerTarError(f"{what}: image indexes nested too deeply")
        entries = [
            Descriptor.from_json(d, f"{what}: index entry {i}") for i, d in enumerate(_manifests(doc, what))
        ]
        child = select_platform(entries, what)
        return _resolve_manifest(layout, child, what, depth + 1)
    return doc


def import_oci_layout(
    store: Store,
    path: str,
    tag: str | None = None,
    ref: str | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """Import the image ``tag`` (or the only one) of the OCI layout at ``path``; tag it ``ref``.

    Returns the image id.  Every document and blob is verified (digest and size); before any
    layer is extracted every layer descriptor is checked and every needed blob is found with its
    declared size, so a malformed image or a missing, truncated or grown blob stores nothing.  A
    layer refused later (its digest, its diff_id or a hostile entry) is not stored; the layers
    before it were verified and stay in the store unreferenced, until :meth:`Store.prune`.
    ``progress(blob_digest, bytes_done, bytes_total)`` hears how far each layer blob was read.
    """
    if ref is not None:
        parse_reference(ref)
    where = f"oci:{path}" + (f":{tag}" if tag else "")
    with _Layout(path) as layout:
        return _import_layout(store, layout, where=where, path=path, tag=tag, ref=ref, progress=progress)


def _import_layout(
    store: Store,
    layout: _Layout,
    *,
    where: str,
    path: str,
    tag: str | None,
    ref: str | None,
    progress: Progress | None,
) -> str:
    manifest = _resolve_manifest(layout, _index_entry(layout, where, path, tag), where)
    if not isinstance(manifest, Mapping) or manifest.get("mediaType", MEDIA_MANIFEST) not in MANIFEST_TYPES:
        raise LayerTarError(f"{where}: the manifest is not an OCI or Docker v2 image manifest")
    config_desc = Descriptor.from_json(manifest.get("config"), f"{where}: config")
    record = record_from_config(layout.json_blob(config_desc.digest, config_desc.size, "config"))
    blobs = _layer_blobs(store, layout, manifest, record, where)
    layers = [
        _LayerSource(d.digest, d.size, functools.partial(layout.blob, d.digest, d.size, f"layer {i}"))
        for i, d in enumerate(blobs)
    ]
    _store_layers(store, record, layers, progress)
    image_id = store.put_image(record)
    if ref is not None:
        store.tag(ref, image_id)
    return image_id


def _index_entry(layout: _Layout, where: str, path: str, tag: str | None) -> Descriptor:
    """The index.json entry of the image asked for: the one tagged ``tag``, or the only one."""
    descs = _manifests(layout.index(), f"{where}: index.json")
    names = ", ".join(sorted({str(_ref_name(d)) for d in descs}))
    if tag is not None:
        chosen = [d for d in descs if _ref_name(d) == tag]
        if not chosen:
            raise InvalidSpecError(f"{where}: no image tagged {tag!r} in the layout (it has: {names})")
        return Descriptor.from_json(chosen[0], where)
    if len(descs) == 1:
        return Descriptor.from_json(descs[0], where)
    raise InvalidSpecError(
        f"{where}: the layout holds {len(descs)} images; say which one",
        hint=f"use oci:{path}:TAG with one of: {names}",
    )


def _layer_blobs(
    store: Store, layout: _Layout, manifest: Mapping[str, Any], record: ImageRecord, where: str
) -> list[Descriptor]:
    """The manifest's layer descriptors, all checked -- and every blob still needed found, of its
    declared size -- before any layer is extracted: a malformed image stores nothing."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != len(record.layers):
        raise LayerTarError(
            f"{where}: the manifest lists {len(layers) if isinstance(layers, list) else 'no'} layers, "
            f"the config {len(record.layers)} diff_ids"
        )
    blobs = []
    for i, (value, diff_id) in enumerate(zip(layers, record.layers, strict=True)):
        desc = Descriptor.from_json(value, f"{where}: layer {i}")
        if desc.media_type not in LAYER_TYPES:
            raise LayerTarError(
                f"{where}: layer {i} has media type {desc.media_type!r}; plain and gzip tar layers are "
                "supported",
                hint="convert it, e.g. skopeo copy --dest-compress-format gzip",
            )
        if not store.has_layer(diff_id):
            layout.check_blob_size(desc, f"layer {i}")
        blobs.append(desc)
    return blobs


@dataclass(frozen=True)
class _LayerSource:
    """Where one layer of an image being imported is read from: ``open()`` gives its bytes."""

    name: str  # what progress calls it: the blob digest (layout) or the diff_id (docker archive)
    size: int
    open: Callable[[], contextlib.AbstractContextManager[Readable]]


def _store_layers(
    store: Store, record: ImageRecord, layers: Sequence[_LayerSource], progress: Progress | None
) -> None:
    """Store each layer the store does not have yet, verified against the record's diff_id.

    A layer refused after earlier ones were stored leaves those, verified, in the store
    unreferenced (until :meth:`Store.prune`).
    """
    created_by = layer_created_by(record)
    parent: str | None = None
    for i, (layer, diff_id) in enumerate(zip(layers, record.layers, strict=True)):
        if store.has_layer(diff_id):
            if progress is not None:
                progress(layer.name, layer.size, layer.size)
        else:
            with layer.open() as raw:
                reader = _with_progress(raw, layer.name, layer.size, progress)
                store.add_layer_tar(reader, expected_diff_id=diff_id, created_by=created_by[i], parent=parent)
                if progress is not None:
                    reader.end()
        parent = diff_id


# -- writing OCI layouts ---------------------------------------------------------------------


class _LayoutWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")

    def prepare(self) -> None:
        if os.path.lexists(self.path):
            if not os.path.isdir(self.path):
                raise InvalidSpecError(f"oci:{self.path}: exists and is not a directory")
            if os.listdir(self.path) and not os.path.isfile(os.path.join(self.path, "oci-layout")):
                raise InvalidSpecError(
                    f"oci:{self.path}: the directory is neither empty nor an OCI image layout",
                    hint="export into a new or empty directory, or into an existing OCI layout",
                )
        os.makedirs(self.blobs, exist_ok=True)
        layout = os.path.join(self.path, "oci-layout")
        if not os.path.exists(layout):
            write_atomic(layout, canonical_json({"imageLayoutVersion": "1.0.0"}))

    def put(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        final = os.path.join(self.blobs, digest[7:])
        if not os.path.exists(final):
            write_atomic(final, data)
        return digest, len(data)

    def put_gzip(self, tar: IO[bytes]) -> tuple[str, int]:
        with AtomicFile(tmp_dir=self.blobs) as out:
            blob = gzip_blob(tar, out.file)
            out.final = os.path.join(self.blobs, blob.diff_id[7:])
        return blob.diff_id, blob.size

    def add_to_index(self, desc: dict[str, Any], tag: str | None) -> None:
        index_path = os.path.join(self.path, "index.json")
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}
        if os.path.exists(index_path):
            with open(index_path, "rb") as f:
                loaded = loads_json(f.read(MAX_JSON + 1), f"oci:{self.path}: index.json")
            index = dict(loaded) if isinstance(loaded, Mapping) else index
            index.setdefault("schemaVersion", 2)
        keep = [
            d
            for d in index.get("manifests") or []
            if not (tag and isinstance(d, Mapping) and (d.get("annotations") or {}).get(REF_NAME) == tag)
            and not (isinstance(d, Mapping) and d.get("digest") == desc["digest"] and not tag)
        ]
        if tag:
            desc = {**desc, "annotations": {REF_NAME: tag}}
        index["manifests"] = [*keep, desc]
        write_atomic(index_path, json.dumps(index, indent=None, separators=(",", ":")).encode())


def export_oci_layout(store: Store, ref: str, path: str, tag: str | None = None) -> str:
    """Write the stored image ``ref`` into the OCI layout at ``path`` (made if missing; an
    existing layout gets one more image), its manifest annotated with ``tag`` if given.

    Returns the manifest digest.  Layers are gzip-compressed blobs.
    """
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise InvalidSpecError(f"oci:{path}:{tag}: {tag!r} is not a valid OCI ref name")
    record = store.resolve(ref)
    config = config_from_record(record, [store.tar_digest(d) for d in record.layers])
    writer = _LayoutWriter(path)
    writer.prepare()
    layers = []
    for diff_id in record.layers:
        with store.open_layer_tar(diff_id) as tar:
            digest, size = writer.put_gzip(tar)
        layers.append({"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": size})
    config_digest, config_size = writer.put(canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    manifest_digest, manifest_size = writer.put(canonical_json(manifest))
    writer.add_to_index(
        {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": config["architecture"], "os": "linux"},
        },
        tag,
    )
    return manifest_digest


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
                raw = _with_progress(f, where, total, progress)
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
    progress: Callable[[str, int, int], None] | None = None,
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
            _LayerSource(diff_id, m.size, functools.partial(_in_place, m))
            for m, diff_id in zip(members, record.layers, strict=True)
        ]
        _store_layers(store, record, sources, progress)
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
