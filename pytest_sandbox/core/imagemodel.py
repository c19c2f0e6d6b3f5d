"""The image model: what an image says about itself, and the records the store keeps (pure).

:class:`ImageConfig` and :class:`History` are what a user reads off an image (OCI config's Env,
WorkingDir, User, Cmd, Entrypoint; its build steps).  :class:`ImageRecord` is an image as the
store keeps it -- its id is the sha256 of its canonical JSON (:func:`canonical_json`) --
:class:`LayerInfo` one stored layer, :class:`StoredImage` a listing entry.  Stdlib only: the
store (:mod:`pytest_sandbox.images.store`), the archives and the registry client read and write
these, and :mod:`pytest_sandbox.image` hands them to users, without importing one another.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSpecError
from .reference import parse_digest

RECORD_SCHEMA = 1
# RFC 3339 as Go's time.Parse(time.RFC3339) reads it (skopeo, umoci, containerd): an OCI config's
# "created" must be this, or absent -- "" stops them with `parsing time "\"\""`.
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def is_rfc3339(value: str) -> bool:
    """Whether ``value`` is an RFC 3339 time (a real date and time of day, not just the shape)."""
    m = _RFC3339.fullmatch(value)
    if m is None:
        return False
    try:
        datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return True


def now_rfc3339(environ: Mapping[str, str] = os.environ) -> str:
    """When a record is made: now, or ``$SOURCE_DATE_EPOCH`` when set, so that the same inputs give
    the same image ids and exported digests (https://reproducible-builds.org/specs/source-date-epoch/)."""
    raw = environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 11:  # the spec: a whole number of seconds
        raise InvalidSpecError(
            f"SOURCE_DATE_EPOCH={raw!r}: expected a whole number of seconds since 1970-01-01 UTC, "
            "e.g. $(git log -1 --format=%ct)"
        )
    when = datetime.datetime.fromtimestamp(int(raw), datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_json(obj: Any) -> bytes:
    """``obj`` as the bytes its digest is taken of: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<64 hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageConfig:
    """What an image says about how to run it (OCI config's Env, WorkingDir, User, Cmd, Entrypoint).

    The options of run()/start() override it: ``env`` key by key, ``workdir`` and ``user`` whole.
    """

    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()


@dataclass(frozen=True)
class History:
    """One build step of an image (OCI config ``history``); ``empty_layer`` for config-only steps."""

    created: str = ""
    created_by: str = ""
    empty_layer: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"created": self.created, "created_by": self.created_by}
        if self.empty_layer:
            data["empty_layer"] = True
        return data

    @classmethod
    def from_json(cls, data: Any) -> History:
        if not isinstance(data, dict):
            raise InvalidSpecError(f"history entry {data!r}: expected a mapping")
        return cls(
            str(data.get("created") or ""), str(data.get("created_by") or ""), bool(data.get("empty_layer"))
        )


def config_to_json(config: ImageConfig) -> dict[str, Any]:
    return {
        "env": [[k, v] for k, v in config.env],
        "workdir": config.workdir,
        "user": config.user,
        "cmd": list(config.cmd),
        "entrypoint": list(config.entrypoint),
    }


def config_from_json(data: Mapping[str, Any]) -> ImageConfig:
    return ImageConfig(
        env=tuple((str(k), str(v)) for k, v in data.get("env") or ()),
        workdir=data.get("workdir") or None,
        user=data.get("user") or None,
        cmd=tuple(str(x) for x in data.get("cmd") or ()),
        entrypoint=tuple(str(x) for x in data.get("entrypoint") or ()),
    )


@dataclass(frozen=True)
class LayerInfo:
    """One stored layer: its digest (diff_id), where its directory is, and its metadata."""

    digest: str
    path: str
    parent: str | None = None
    created: str = ""
    created_by: str = ""
    size: int = 0
    tar_digest: str = ""  # the diff_id of the tar we write for it (see Store.tar_digest)


@dataclass(frozen=True)
class ImageRecord:
    """An image as the store keeps it: layer digests (bottom first), config, base, history.

    ``history`` may be given as dicts ``{created, created_by[, empty_layer]}``; entries that are
    not ``empty_layer`` match the layers one to one, bottom first.  ``parent`` is the image a
    build step or commit started from (kept so ``prune`` keeps the ancestors of tagged images).
    """

    layers: tuple[str, ...] = ()
    config: ImageConfig = field(default_factory=ImageConfig)
    host_base: bool = False
    created: str = ""
    history: tuple[History, ...] = ()
    parent: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(parse_digest(d, what="layer") for d in self.layers))
        object.__setattr__(
            self,
            "history",
            tuple(h if isinstance(h, History) else History.from_json(h) for h in self.history),
        )
        if self.parent is not None:
            parse_digest(self.parent, what="parent image")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": RECORD_SCHEMA,
            "layers": list(self.layers),
            "config": config_to_json(self.config),
            "host_base": self.host_base,
            "created": self.created,
            "history": [h.to_json() for h in self.history],
            "parent": self.parent,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageRecord:
        return cls(
            layers=tuple(data.get("layers") or ()),
            config=config_from_json(data.get("config") or {}),
            host_base=bool(data.get("host_base")),
            created=str(data.get("created") or ""),
            history=tuple(History.from_json(h) for h in data.get("history") or ()),
            parent=data.get("parent") or None,
        )

    def encode(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def id(self) -> str:
        """The image id: ``sha256:`` of the record's canonical JSON."""
        return sha256_digest(self.encode())


@dataclass(frozen=True)
class StoredImage:
    """An entry of :meth:`Store.images`: the image id, its record and the tags naming it."""

    id: str
    record: ImageRecord
    refs: tuple[str, ...]
