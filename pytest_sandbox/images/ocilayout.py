"""OCI image layouts (``oci:DIR[:TAG]``), read into the store and written from it.

Below a layout's root nothing is followed: ``blobs``, ``blobs/sha256`` and every file are opened
``O_NOFOLLOW`` from a descriptor of the layout.  Every document and blob is verified (digest and
size, :class:`.manifest.VerifiedReader`); before any layer is extracted every layer descriptor is
checked and every needed blob found with its declared size.  Layers are written as deterministic
gzip blobs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from typing import IO, Any

from ..core.errors import InvalidSpecError, LayerTarError
from ..core.imagemodel import ImageRecord, canonical_json, sha256_digest
from ..core.reference import parse_reference
from ..host.fstree import AtomicFile, write_atomic
from .layerimport import MAX_JSON, LayerSource, Progress, store_layers
from .manifest import (
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    REF_NAME,
    Descriptor,
    VerifiedReader,
    config_from_record,
    gzip_blob,
    loads_json,
    record_from_config,
    select_platform,
)
from .store import Store

# the ref.name annotation grammar of the image spec (annotations.md)
TAG_RE = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)


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
    progress: Progress | None = None,
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
        LayerSource(d.digest, d.size, functools.partial(layout.blob, d.digest, d.size, f"layer {i}"))
        for i, d in enumerate(blobs)
    ]
    store_layers(store, record, layers, progress)
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
    if tag is not None and not TAG_RE.fullmatch(tag):
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
