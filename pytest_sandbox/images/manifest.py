"""The OCI model shared by the archives (:mod:`.archive`) and the registry client (:mod:`.registry`).

One place for what both read and write: media types, content descriptors, the choice of an
image index's entry for this host, digest checks, the reader that verifies a blob while it
streams, the deterministic gzip writer, and the image config <-> store record mapping.  Stdlib
and :mod:`pytest_sandbox.core` only.

Both sides read untrusted input (a layout someone handed us, a registry on the network) and
raise their own error type -- :class:`~pytest_sandbox.core.errors.LayerTarError` for archives,
:class:`~pytest_sandbox.core.errors.RegistryError` and its kin for a registry -- so every check
here takes the ``error`` class to raise.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.errors import InvalidSpecError, LayerTarError, SandboxError
from ..core.imagemodel import History, ImageConfig, ImageRecord, is_rfc3339
from ..core.reference import is_digest

# Media types (OCI image-spec and Docker's image manifest v2 schema 2).
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = (MEDIA_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (MEDIA_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (MEDIA_CONFIG, DOCKER_CONFIG)
# the layer media types imported: plain and gzip tars (zstd and others are refused)
LAYER_TYPES = (
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le"}
_HOSTILE_HINT = "the image is corrupt or hostile; re-create it with skopeo or docker"

ErrorType = type[SandboxError]


class Readable(Protocol):
    """What a blob or a tar is read from: a file, a response body, a decompressor."""

    def read(self, n: int = -1, /) -> bytes: ...


class Sink(Protocol):
    """What a blob or a tar is written to."""

    def write(self, data: bytes, /) -> object: ...


def host_arch() -> str:
    """The host's architecture in OCI (Go) spelling: ``amd64``, ``arm64``, ..."""
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def host_platform() -> tuple[str, str]:
    """(os, architecture) in the OCI/Go spelling: ("linux", "amd64") on x86-64."""
    return "linux", host_arch()


# -- digests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDigest:
    """A blob's sha256 digest and its size in bytes (for a layer tar: its OCI ``diff_id``)."""

    diff_id: str
    size: int


def check_digest(value: object, what: str, error: ErrorType = LayerTarError) -> str:
    """``value`` if it is ``sha256:<64 lowercase hex>``; ``error`` if not (digests become paths)."""
    if not isinstance(value, str) or not is_digest(value):
        raise error(
            f"{what}: {str(value)[:100]!r} is not a sha256 digest ('sha256:' and 64 lowercase hex digits)",
            hint=_HOSTILE_HINT + "; only sha256 digests are supported",
        )
    return value


def loads_json(data: bytes, what: str, error: ErrorType = LayerTarError) -> Any:
    """Parse a JSON document read from an image; ``error`` for anything but JSON."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what}: not valid JSON ({e})") from None
    except RecursionError:  # a few MiB of "[[[[..." nest deeper than the parser recurses
        raise error(f"{what}: JSON nested too deeply") from None


class HashingWriter:
    """A sink that sha256-hashes and counts what it is given, passing it on to ``out`` if any."""

    def __init__(self, out: Sink | None = None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    def digest(self) -> LayerDigest:
        return LayerDigest("sha256:" + self.sha.hexdigest(), self.size)


class VerifiedReader:
    """Reads a blob through, hashing and counting it; checks it against its descriptor.

    With a ``digest`` (and ``size``): more bytes than ``size`` are refused as soon as they come,
    and at the end of the stream the count and the sha256 must match -- else ``error``.
    Without, it only hashes (:meth:`digest`), as a layer tar of unknown digest is read.
    """

    def __init__(
        self,
        f: Readable,
        digest: str | None = None,
        size: int | None = None,
        what: str = "blob",
        error: ErrorType = LayerTarError,
    ) -> None:
        self.f = f
        self.expected = digest
        self.expected_size = size
        self.what = what
        self.error = error
        self.sha = hashlib.sha256()
        self.seen = 0
        self.done = False

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        data = self.f.read(CHUNK if n is None or n < 0 else n)
        self.sha.update(data)
        self.seen += len(data)
        if self.expected_size is not None and self.seen > self.expected_size:
            raise self.error(
                f"{self.what}: more than the {self.expected_size} bytes its descriptor declares; rejected"
            )
        if not data and n != 0:
            self.done = True
            self._check()
        return data

    def _check(self) -> None:
        if self.expected_size is not None and self.seen != self.expected_size:
            raise self.error(
                f"{self.what}: {self.seen} bytes, but its descriptor declares {self.expected_size}; "
                "rejected, nothing stored",
                hint="the image is truncated or corrupt; copy or pull it again",
            )
        got = "sha256:" + self.sha.hexdigest()
        if self.expected is not None and got != self.expected:
            raise self.error(
                f"{self.what}: digest mismatch (expected {self.expected}, the content is {got}); "
                "rejected, nothing stored",
                hint="the image is corrupt, or was altered on its way: copy or pull it again from its source",
            )

    def finish(self) -> None:
        """Read to the end (and so check it)."""
        while self.read(CHUNK):
            pass

    def digest(self) -> LayerDigest:
        return LayerDigest("sha256:" + self.sha.hexdigest(), self.seen)


def gzip_blob(src: Readable, out: Sink) -> LayerDigest:
    """Compress ``src`` into ``out``, deterministically (no name, mtime 0, level 6): the same tar
    always gives the same blob, so an unchanged layer is a blob a registry or layout already has.
    The digest and size of the gzip stream."""
    sink = HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz:
        while chunk := src.read(CHUNK):
            gz.write(chunk)
    sink.flush()
    return sink.digest()


# -- descriptors and platforms -----------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob or manifest is, its digest and its size."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict, compare=False)
    annotations: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, data: Any, what: str, error: ErrorType = LayerTarError) -> Descriptor:
        """A descriptor read from an image, checked: a digest is never a path, a size is a count."""
        if not isinstance(data, Mapping):
            raise error(f"{what}: a descriptor must be a JSON object, got {type(data).__name__}")
        digest = check_digest(data.get("digest"), f"{what}: digest", error)
        size, media_type = data.get("size"), data.get("mediaType", "")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise error(
                f"{what}: descriptor {digest} has no valid size ({size!r}, not a non-negative integer)"
            )
        if not isinstance(media_type, str):
            raise error(f"{what}: descriptor {digest}: mediaType must be a string")
        plat = data.get("platform") or {}
        annotations = data.get("annotations") or {}
        return cls(
            media_type,
            digest,
            size,
            dict(plat) if isinstance(plat, Mapping) else {},
            dict(annotations) if isinstance(annotations, Mapping) else {},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    @property
    def ref_name(self) -> str | None:
        """The ``org.opencontainers.image.ref.name`` annotation (an OCI layout's tag), if any."""
        name = self.annotations.get(REF_NAME)
        return name if isinstance(name, str) else None


def select_platform(
    entries: Sequence[Descriptor],
    what: str,
    want: tuple[str, str] | None = None,
    error: ErrorType = LayerTarError,
) -> Descriptor:
    """The entry of an image index to use here -- one rule for layouts and registries:

    the first entry whose platform is ``want`` (os and architecture; default: this host) and
    whose media type, when it gives one, is an image manifest (a nested index, an attestation
    or anything else is passed over); failing that, the only entry of an index that says
    nothing about platforms.  An entry for another platform is never taken: its programs would
    not run here.  None: ``error``, naming the platforms the index has.
    """
    os_name, arch = want or host_platform()
    seen = []
    for desc in entries:
        plat = desc.platform
        seen.append(f"{plat.get('os', '?')}/{plat.get('architecture', '?')}")
        if plat.get("os") == os_name and plat.get("architecture") == arch:
            if desc.media_type and desc.media_type not in MANIFEST_TYPES:
                continue
            return desc
    if len(entries) == 1 and not entries[0].platform:
        return entries[0]
    raise error(
        f"{what} has no image for {os_name}/{arch} (it has: {', '.join(seen) or 'none'})",
        hint="use an image built for this platform",
    )


# -- image config <-> store record -------------------------------------------------------------


def config_from_record(record: ImageRecord, diff_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """The OCI image config JSON of a stored image (refused for images on the host base).

    ``diff_ids``: the digests of the layer tars that go with it, when they are not the record's
    own -- an export or push writes :meth:`Store.tar_digest`'s tars.
    """
    if record.host_base:
        raise InvalidSpecError(
            "this image is on the host base: its lowest layer is this host's /usr, which cannot be "
            "exported, pushed or saved",
            hint="build the image from layers of its own: Image.from_layers(..., base=None) or a "
            "pulled/imported base image",
        )
    cfg = record.config
    run: dict[str, Any] = {}
    if cfg.env:
        run["Env"] = [f"{k}={v}" for k, v in cfg.env]
    if cfg.entrypoint:
        run["Entrypoint"] = list(cfg.entrypoint)
    if cfg.cmd:
        run["Cmd"] = list(cfg.cmd)
    if cfg.workdir:
        run["WorkingDir"] = cfg.workdir
    if cfg.user:
        run["User"] = cfg.user
    config: dict[str, Any] = {}
    if is_rfc3339(record.created):  # else left out (optional in OCI): see _history_json
        config["created"] = record.created
    config.update(
        {
            "architecture": host_arch(),
            "os": "linux",
            "config": run,
            "rootfs": {"type": "layers", "diff_ids": list(record.layers if diff_ids is None else diff_ids)},
        }
    )
    if record.history:
        config["history"] = [_history_json(h) for h in record.history]
    return config


def _history_json(step: History) -> dict[str, Any]:
    """A history entry of an OCI config.  A step with no time (from_layers, config steps: a time
    would change the image id at every build) or a foreign one not in RFC 3339 has no "created":
    it is optional, and skopeo and umoci refuse anything else, "" included."""
    data = step.to_json()
    if not is_rfc3339(step.created):
        del data["created"]
    return data


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise LayerTarError(f"image config: {what} must be a list of strings, not {value!r}"[:300])
    return tuple(value)


def _optional_str(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise LayerTarError(f"image config: {what} must be a string, not {value!r}"[:300])
    return value


def _diff_ids(config: Mapping[str, Any]) -> tuple[str, ...]:
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, Mapping) or rootfs.get("type") != "layers":
        raise LayerTarError("image config: rootfs must be {'type': 'layers', 'diff_ids': [...]}")
    diff_ids = _strings(rootfs.get("diff_ids"), "rootfs.diff_ids")
    for d in diff_ids:
        check_digest(d, "image config: diff_id")
    return diff_ids


def _run_config(config: Mapping[str, Any]) -> ImageConfig:
    run = config.get("config") or {}
    if not isinstance(run, Mapping):
        raise LayerTarError("image config: 'config' must be a JSON object")
    env = []
    for item in _strings(run.get("Env"), "config.Env"):
        key, _, value = item.partition("=")
        env.append((key, value))
    return ImageConfig(
        env=tuple(env),
        workdir=_optional_str(run.get("WorkingDir"), "config.WorkingDir"),
        user=_optional_str(run.get("User"), "config.User"),
        cmd=_strings(run.get("Cmd"), "config.Cmd"),
        entrypoint=_strings(run.get("Entrypoint"), "config.Entrypoint"),
    )


def record_from_config(config: Mapping[str, Any], *, host_base: bool = False) -> ImageRecord:
    """The store record of an OCI image config (the inverse of :func:`config_from_record`).

    ``rootfs.diff_ids`` must be ``sha256:<64 hex>`` each (they become store paths).
    """
    if not isinstance(config, Mapping):
        raise LayerTarError("image config: expected a JSON object")
    os_name = config.get("os", "linux")
    if os_name != "linux":
        raise LayerTarError(f"image config: os is {os_name!r}; only linux images run here")
    diff_ids = _diff_ids(config)
    run = _run_config(config)
    history = config.get("history") or []
    if not isinstance(history, list):
        raise LayerTarError("image config: history must be a list")
    created = config.get("created") or ""
    if not isinstance(created, str):
        raise LayerTarError("image config: created must be a string")
    try:
        hist = tuple(History.from_json(h) for h in history)
    except InvalidSpecError as e:
        raise LayerTarError(f"image config: {e.message}") from None
    return ImageRecord(layers=diff_ids, config=run, host_base=host_base, created=created, history=hist)


def layer_created_by(record: ImageRecord) -> list[str]:
    """Each layer's ``created_by`` from the history (all "" when the history does not match)."""
    steps = [h.created_by for h in record.history if not h.empty_layer]
    if len(steps) != len(record.layers):
        steps = [""] * len(record.layers)
    return steps
