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
for the command line's progress display.  The transports live in :mod:`.ocilayout` and
:mod:`.dockerarchive`; this module names them and is their interface.  What an OCI layout
shares with a registry -- media types, descriptors, platform selection, digest checks, the
verifying reader, the gzip writer, config <-> record -- is :mod:`pytest_sandbox.images.manifest`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import InvalidSpecError
from ..core.reference import parse_reference
from .dockerarchive import export_docker_archive, import_docker_archive
from .layerimport import PROGRESS_STEP, Progress
from .ocilayout import TAG_RE, export_oci_layout, import_oci_layout
from .store import Store

__all__ = [
    "PROGRESS_STEP",
    "Progress",
    "Transport",
    "export_docker_archive",
    "export_image",
    "export_oci_layout",
    "import_docker_archive",
    "import_image",
    "import_oci_layout",
    "parse_transport",
]


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
    if tag and kind == "oci" and not TAG_RE.fullmatch(tag):
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
