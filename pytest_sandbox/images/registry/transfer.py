"""Pull and push: images between a registry and the local store.

:func:`pull` returns ids (the image id, the layer digests), never an :class:`~pytest_sandbox.Image`:
``Image.pull`` loads the id it gets.  Layers the store has already are not downloaded; each blob
is streamed to a temporary file, checked against its digest and size, then extracted by the
store (which checks the layer's diff_id): a corrupt blob raises RegistryDigestError and stores
nothing.  :func:`push` writes an OCI manifest with gzip layers (deterministic: the same image
pushes the same blobs), skipping blobs the registry has.  What they do is told to a
:class:`TransferProgress` if given -- the command line's printer (``pytest_sandbox.cli.Progress``).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ...config import Settings
from ...core.errors import InvalidSpecError, RegistryError, RegistryNotFoundError
from ...core.imagemodel import ImageRecord, canonical_json, sha256_digest
from ...core.reference import Reference, parse_reference
from ..manifest import (
    LAYER_TYPES,
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    Descriptor,
    check_digest,
    config_from_record,
    gzip_blob,
    host_platform,
    layer_created_by,
    loads_json,
    record_from_config,
)
from ..store import Store
from .client import Manifest, RegistryClient
from .settings import DOCKER_HUB, canonical_registry

ProgressFn = Callable[[int], None]


class TransferProgress(Protocol):
    """What :func:`pull` and :func:`push` tell as they go (one layer at a time, and notes)."""

    def layer(
        self, index: int, count: int, digest: str, size: int, verb: str = "pull"
    ) -> contextlib.AbstractContextManager[ProgressFn]: ...

    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did: the image id in the store, the tag it got, the manifest it came from."""

    image_id: str
    ref: str | None
    manifest_digest: str
    downloaded: tuple[str, ...]
    present: tuple[str, ...]


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did: the manifest's digest, and which layer blobs were uploaded."""

    manifest_digest: str
    uploaded: tuple[str, ...]
    present: tuple[str, ...]


def registry_repository(ref: Reference) -> tuple[str, str]:
    """(registry, repository) as the API wants them: Docker Hub's official images are ``library/``."""
    registry = canonical_registry(ref.registry or DOCKER_HUB)
    repository = ref.repository
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    return registry, repository


def _check_platform(config: dict[str, Any], what: str) -> None:
    os_name, arch = host_platform()
    got = (config.get("os"), config.get("architecture"))
    if got != (os_name, arch):
        raise RegistryNotFoundError(
            f"{what} is an image for {got[0]}/{got[1]}; this host is {os_name}/{arch}",
            hint="pull a tag (or an index) that has an image for this platform",
        )


def _image_record(client: RegistryClient, repository: str, manifest: Manifest, what: str) -> ImageRecord:
    """The record of the manifest's image, its layers and config checked before any download."""
    layers = manifest.layers
    for desc in layers:
        if desc.media_type not in LAYER_TYPES:
            hint = "zstd-compressed layers are not supported yet" if "zstd" in desc.media_type else ""
            raise RegistryError(
                f"{what}: layer {desc.digest} has unsupported type {desc.media_type!r}", hint=hint
            )
    raw = client.read_blob(repository, manifest.config)
    config = loads_json(raw, f"{what}: the image config", RegistryError)
    if not isinstance(config, dict):
        raise RegistryError(f"{what}: the image config is not a JSON object")
    _check_platform(config, what)
    _check_diff_ids(config, len(layers), what)
    return record_from_config(config)


def _check_diff_ids(config: dict[str, Any], count: int, what: str) -> None:
    """One sha256 digest per layer, or RegistryError: the config is the registry's reply (the
    shared parser, :func:`record_from_config`, raises LayerTarError, an archive's error)."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise RegistryError(
            f"{what}: the config's rootfs.diff_ids does not list one digest per layer ({count} layers)"
        )
    for d in diff_ids:
        check_digest(d, f"{what} rootfs.diff_ids", RegistryError)


def pull(
    ref: str | Reference,
    store: Store | None = None,
    *,
    client: RegistryClient | None = None,
    quiet: bool = False,
    progress: TransferProgress | None = None,
    settings: Settings | None = None,
) -> PullResult:
    """Pull ``[registry/]name[:tag][@digest]`` into ``store`` (default: the data root's) and tag it.

    ``settings`` gives the default store and the registry settings (default: the environment's).
    Returns ids: the image id, the tag, the downloaded and already-present layer digests.
    ``progress`` hears of each layer (``quiet`` silences it).
    """
    parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
    settings = settings or Settings.from_env()
    store = store if store is not None else Store.default(settings)
    registry, repository = registry_repository(parsed)
    client = client if client is not None else RegistryClient(registry, settings=settings.registries)
    what = str(parsed)
    show = None if quiet else progress
    manifest = client.resolve(repository, parsed.ident)
    record = _image_record(client, repository, manifest, what)
    created_by = layer_created_by(record)
    downloaded: list[str] = []
    present: list[str] = []
    parent: str | None = None
    count = len(record.layers)
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, record.layers, strict=True), 1):
        if store.has_layer(diff_id):
            present.append(diff_id)
            if show is not None:
                show.note(f"pull {what} layer {i}/{count} {diff_id[7:19]} already present")
        else:
            layer = show.layer(i, count, desc.digest, desc.size) if show else contextlib.nullcontext()
            with store.tempdir() as tmp, open(os.path.join(tmp, "blob"), "w+b") as blob:
                with layer as update:
                    client.fetch_blob(repository, desc, blob, update)
                blob.seek(0)
                store.add_layer_tar(
                    blob, expected_diff_id=diff_id, created_by=created_by[i - 1], parent=parent
                )
            downloaded.append(diff_id)
        parent = diff_id
    image_id = store.put_image(record)
    tag = None
    if parsed.tag is not None or parsed.digest is None:
        tag = store.tag(Reference(parsed.registry, parsed.repository, parsed.effective_tag), image_id)
    if show is not None:
        show.note(f"pulled {what}: image {image_id[:19]}, manifest {manifest.digest[:19]}")
    return PullResult(image_id, tag, manifest.digest, tuple(downloaded), tuple(present))


def push(
    ref: str | Reference,
    store: Store | None = None,
    *,
    client: RegistryClient | None = None,
    quiet: bool = False,
    progress: TransferProgress | None = None,
    settings: Settings | None = None,
) -> PushResult:
    """Push the stored image ``[registry/]name[:tag]`` to its registry (an OCI manifest, gzip layers).

    Blobs the registry has already are not uploaded again.  Images on the host base cannot be
    pushed (their lowest layer is this host).
    """
    parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
    if parsed.digest:
        raise InvalidSpecError(f"push {ref}: push a name[:tag], not a digest")
    settings = settings or Settings.from_env()
    store = store if store is not None else Store.default(settings)
    record = store.resolve(parsed)
    config = config_from_record(record, [store.tar_digest(d) for d in record.layers])
    registry, repository = registry_repository(parsed)
    client = client if client is not None else RegistryClient(registry, settings=settings.registries)
    what = str(parsed)
    show = None if quiet else progress
    descs: list[Descriptor] = []
    uploaded: list[str] = []
    present: list[str] = []
    for i, diff_id in enumerate(record.layers, 1):
        with store.tempdir() as tmp, open(os.path.join(tmp, "blob"), "w+b") as blob:
            with store.open_layer_tar(diff_id) as tar:
                gz = gzip_blob(tar, blob)
            layer = show.layer(i, len(record.layers), gz.diff_id, gz.size, "push") if show else None
            with layer or contextlib.nullcontext():
                sent = client.push_blob(repository, gz.diff_id, blob, gz.size)
        (uploaded if sent else present).append(gz.diff_id)
        descs.append(Descriptor(MEDIA_LAYER_GZIP, gz.diff_id, gz.size))
    raw_config = canonical_json(config)
    config_desc = Descriptor(MEDIA_CONFIG, sha256_digest(raw_config), len(raw_config))
    client.push_blob(repository, config_desc.digest, io.BytesIO(raw_config), len(raw_config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in descs],
    }
    tag = parsed.effective_tag or "latest"
    digest = client.put_manifest(repository, tag, canonical_json(manifest), MEDIA_MANIFEST)
    if show is not None:
        show.note(f"pushed {what}: manifest {digest}")
    return PushResult(digest, tuple(uploaded), tuple(present))
