"""The registry client: manifests and blobs of one registry, read through its mirrors.

Manifests: OCI image manifests and Docker v2 schema 2 manifests; an OCI image index or a Docker
manifest list is resolved to the entry for this host's platform (:func:`..manifest.select_platform`).
A manifest's sha256 is checked against the digest it was asked for, and against
``Docker-Content-Digest``.  Blobs are streamed while their sha256 and size are checked
(:class:`..manifest.VerifiedReader`): a blob that does not match its descriptor raises
:class:`~pytest_sandbox.core.errors.RegistryDigestError`.  Push uploads monolithically (``POST``
then ``PUT ?digest=``), skipping blobs the registry already has (``HEAD``).  Answers are capped:
manifests 4 MiB, configs 16 MiB, blobs their descriptor's size.
"""

from __future__ import annotations

import io
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, TypeVar

from ...core.errors import (
    InvalidSpecError,
    RegistryDigestError,
    RegistryError,
    RegistryNotFoundError,
)
from ...core.imagemodel import sha256_digest
from ...core.reference import is_digest
from ..manifest import (
    CHUNK,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MEDIA_INDEX,
    MEDIA_MANIFEST,
    Descriptor,
    VerifiedReader,
    check_digest,
    loads_json,
    select_platform,
)
from .auth import Auth, docker_credentials
from .http import DEFAULT_TIMEOUT, Body, Endpoint
from .settings import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    RegistrySettings,
    canonical_registry,
    check_host,
    mirror_host,
)

MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit
MAX_CONFIG_BYTES = 16 << 20
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

T = TypeVar("T")


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as fetched: its media type, digest, exact bytes and parsed JSON."""

    media_type: str
    digest: str
    raw: bytes
    data: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes, content_type: str, what: str) -> Manifest:
        data = loads_json(raw, f"{what}: the manifest", RegistryError)
        if not isinstance(data, dict):
            raise RegistryError(f"{what}: the manifest is not a JSON object")
        media_type = data.get("mediaType") or content_type.split(";", maxsplit=1)[0].strip()
        if not media_type and isinstance(data.get("manifests"), list):
            media_type = MEDIA_INDEX
        if not media_type and "config" in data:
            media_type = MEDIA_MANIFEST
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            hint = ""
            if data.get("schemaVersion") == 1:
                hint = "Docker schema 1 manifests are deprecated and not supported: push the image again"
            raise RegistryError(f"{what}: unsupported manifest type {media_type!r}", hint=hint)
        if data.get("schemaVersion") != 2:
            raise RegistryError(f"{what}: schemaVersion {data.get('schemaVersion')!r}, expected 2")
        return cls(str(media_type), sha256_digest(raw), raw, data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def config(self) -> Descriptor:
        return Descriptor.from_json(self.data.get("config"), f"manifest {self.digest} config", RegistryError)

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self._descriptors("layers", f"manifest {self.digest}", "layer")

    @property
    def manifests(self) -> tuple[Descriptor, ...]:
        return self._descriptors("manifests", f"index {self.digest}", "entry")

    def _descriptors(self, key: str, what: str, item: str) -> tuple[Descriptor, ...]:
        entries = self.data.get(key)
        if not isinstance(entries, list):
            raise RegistryError(f"{what}: {key!r} is not a list")
        return tuple(
            Descriptor.from_json(d, f"{what} {item} {i}", RegistryError) for i, d in enumerate(entries)
        )


ProgressFn = Callable[[int], None]


class RegistryClient:
    """A client of one registry (``host[:port]``; None or docker.io for Docker Hub), with its mirrors.

    ``insecure`` overrides the settings for this registry (None: as configured); ``mirrors`` replaces
    the configured mirrors (None: as configured).  Reads try the mirrors first, then the registry;
    writes go to the registry.
    """

    def __init__(
        self,
        host: str | None = None,
        *,
        insecure: bool | None = None,
        mirrors: Sequence[str] | None = None,
        settings: RegistrySettings | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        settings = settings or RegistrySettings.from_env()
        self.registry = canonical_registry(host or DOCKER_HUB)
        api_host = DOCKER_HUB_API if self.registry == DOCKER_HUB else check_host(self.registry, "registry")

        def endpoint(h: str, is_insecure: bool) -> Endpoint:
            creds = (
                (credentials or docker_credentials(self.registry)) if h == api_host else docker_credentials(h)
            )
            return Endpoint(
                h,
                insecure=is_insecure,
                timeout=timeout,
                auth=Auth(h, creds),
                insecure_host=settings.is_insecure,
            )

        self.origin = endpoint(
            api_host, settings.is_insecure(self.registry) if insecure is None else insecure
        )
        mirror_hosts = settings.mirrors_for(self.registry) if mirrors is None else list(mirrors)
        self.mirrors = [
            endpoint(h, settings.is_insecure(h))
            for h in (mirror_host(m, settings, "mirror") for m in mirror_hosts)
        ]
        self._preferred: Endpoint | None = None
        #: The endpoints that answered reads, in order (which mirror served what).
        self.served_by: list[str] = []

    def __repr__(self) -> str:
        return f"RegistryClient({self.registry!r}, mirrors={[m.host for m in self.mirrors]!r})"

    def _read_endpoints(self) -> list[Endpoint]:
        order = [*self.mirrors, self.origin]
        if self._preferred is not None:
            order.remove(self._preferred)
            order.insert(0, self._preferred)
        return order

    def _read(self, fn: Callable[[Endpoint], T]) -> T:
        """Run ``fn`` on the mirrors, then the registry, until one answers.

        The endpoint that answered last is tried first next time (blobs come from where the
        manifest came from).  If none answers, the registry's own error is raised, naming what
        the mirrors said.
        """
        failures: list[tuple[Endpoint, RegistryError]] = []
        for ep in self._read_endpoints():
            try:
                result = fn(ep)
            except RegistryError as e:
                failures.append((ep, e))
                continue
            self._preferred = ep
            self.served_by.append(ep.host)
            return result
        error = next(e for ep, e in failures if ep is self.origin)
        others = [f"{ep.host}: {e.message}" for ep, e in failures if ep is not self.origin]
        if others:
            error.message += " (also tried: " + "; ".join(others) + ")"
        raise error

    @staticmethod
    def _scope(repository: str, push: bool = False) -> str:
        if not _REPOSITORY.fullmatch(repository) or len(repository) > 255:
            raise InvalidSpecError(f"{repository!r} is not a repository name (lowercase, a-z0-9._-/)")
        return f"repository:{repository}:{'pull,push' if push else 'pull'}"

    # -- reads

    def ping(self) -> None:
        """``GET /v2/`` on the registry (not the mirrors); authenticates if it asks."""
        self.origin.request("GET", "/v2/", scope="registry:catalog:*").close()

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """The manifest or index ``repository:reference`` (a tag or a digest), checked."""
        scope = self._scope(repository)
        if reference.startswith("sha256:"):
            check_digest(reference, "manifest reference", RegistryError)
        elif not _TAG.fullmatch(reference):
            raise InvalidSpecError(f"{reference!r} is neither a tag nor a sha256 digest")
        what = f"{self.registry}/{repository}:{reference}"

        def fetch(ep: Endpoint) -> Manifest:
            accept = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
            with ep.request(
                "GET", f"/v2/{repository}/manifests/{reference}", scope=scope, headers={"Accept": accept}
            ) as resp:
                raw = ep.read(
                    resp, MAX_MANIFEST_BYTES + 1, f"{ep.base}/v2/{repository}/manifests/{reference}"
                )
                content_type = resp.headers.get("Content-Type", "")
                header_digest = resp.headers.get("Docker-Content-Digest", "")
            if len(raw) > MAX_MANIFEST_BYTES:
                raise RegistryDigestError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            manifest = Manifest.parse(raw, content_type, what)
            if reference.startswith("sha256:") and manifest.digest != reference:
                raise RegistryDigestError(f"{what}: manifest digest is {manifest.digest}, not {reference}")
            if is_digest(header_digest) and header_digest != manifest.digest:
                raise RegistryDigestError(
                    f"{what}: manifest digest is {manifest.digest}, the registry says {header_digest}"
                )
            return manifest

        return self._read(fetch)

    def resolve(self, repository: str, reference: str, want: tuple[str, str] | None = None) -> Manifest:
        """The image manifest for this platform: an index is followed to its matching entry."""
        manifest = self.get_manifest(repository, reference)
        if manifest.is_index:
            entry = select_platform(
                manifest.manifests, f"index {manifest.digest}", want, RegistryNotFoundError
            )
            manifest = self.get_manifest(repository, entry.digest)
            if manifest.is_index:
                raise RegistryError(
                    f"{repository}@{manifest.digest}: an index inside an index is not supported"
                )
        return manifest

    def fetch_blob(
        self, repository: str, desc: Descriptor, out: BinaryIO, progress: ProgressFn | None = None
    ) -> None:
        """Stream blob ``desc`` into ``out`` (from its current position), checking size and sha256.

        On a mismatch RegistryDigestError is raised; ``out`` then holds rejected bytes: callers
        write to a temporary file and drop it.
        """
        scope = self._scope(repository)
        check_digest(desc.digest, "blob", RegistryError)
        start = out.tell()

        def fetch(ep: Endpoint) -> None:
            out.seek(start)
            out.truncate()
            path = f"/v2/{repository}/blobs/{desc.digest}"
            what = f"{ep.host}/{repository} blob {desc.digest}"
            with ep.request("GET", path, scope=scope) as resp:
                body = Body(ep, resp, ep.base + path)
                reader = VerifiedReader(body, desc.digest, desc.size, what, RegistryDigestError)
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
                    if progress is not None:
                        progress(reader.seen)

        self._read(fetch)

    def read_blob(self, repository: str, desc: Descriptor, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (an image config) in memory, checked like :meth:`fetch_blob`."""
        if desc.size > limit:
            raise RegistryDigestError(
                f"blob {desc.digest} is {desc.size} bytes, more than {limit} allowed here"
            )
        buf = io.BytesIO()
        self.fetch_blob(repository, desc, buf)
        return buf.getvalue()

    # -- writes (the registry itself, never a mirror)

    def has_blob(self, repository: str, digest: str) -> bool:
        try:
            self.origin.request(
                "HEAD",
                f"/v2/{repository}/blobs/{check_digest(digest, 'blob', RegistryError)}",
                scope=self._scope(repository, True),
            ).close()
        except RegistryNotFoundError:
            return False
        return True

    def push_blob(self, repository: str, digest: str, src: IO[bytes], size: int) -> bool:
        """Upload ``size`` bytes of ``src`` as blob ``digest``; False if the registry had it already."""
        scope = self._scope(repository, True)
        if self.has_blob(repository, digest):
            return False
        with self.origin.request(
            "POST", f"/v2/{repository}/blobs/uploads/", scope=scope, body=b"", ok=(202,)
        ) as resp:
            location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.registry}: upload started without a Location header")
        url = urllib.parse.urljoin(self.origin.base + "/", location)
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        self.origin.request("PUT", url, scope=scope, headers=headers, body=src, ok=(201, 204)).close()
        return True

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """Store a manifest under ``reference`` (a tag or its digest); returns its digest."""
        if not reference.startswith("sha256:") and not _TAG.fullmatch(reference):
            raise InvalidSpecError(f"{reference!r} is neither a tag nor a sha256 digest")
        digest = sha256_digest(raw)
        self.origin.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scope=self._scope(repository, True),
            headers={"Content-Type": media_type},
            body=raw,
            ok=(201, 200),
        ).close()
        return digest
