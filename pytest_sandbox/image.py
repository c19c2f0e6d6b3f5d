"""Images: ordered read-only layer directories, stacked with overlayfs (the seed's union filesystem).

An :class:`Image` is a tuple of host directories, lowest first, optionally on top of the host base
(:mod:`pytest_sandbox.hostbase`).  Layer directories are never modified: each container gets its
own writable upper layer.  Layers are checked when the image is made *and* when a container
starts (a directory may vanish in between), always before anything is created.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidSpecError, LayerNotADirectoryError, LayerNotFoundError, LayerPermissionError
from .hostbase import HostLayout
from .spec import OverlaySpec

PathLike = str | os.PathLike[str]


class _Default:
    def __repr__(self) -> str:
        return "<the host base>"


DEFAULT_BASE = _Default()


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
class Image:
    """A stack of read-only layer directories (lowest first), on the host base unless ``host=False``."""

    layers: tuple[str, ...] = ()
    host: bool = True
    config: ImageConfig = field(default_factory=ImageConfig)

    @classmethod
    def host_base(cls) -> Image:
        """The embedded default: the host's /usr and libraries, read-only, with a minimal /etc."""
        return cls((), True)

    @classmethod
    def from_layers(cls, *dirs: PathLike, base: Image | _Default | None = DEFAULT_BASE) -> Image:
        """Stack ``dirs`` (lowest first) on ``base``: the host base by default, None for nothing.

        ``Image.from_layers(busybox_dir, base=None)`` is an image made only of that layer.
        """
        if isinstance(base, _Default):
            base = cls.host_base()
        if base is not None and not isinstance(base, Image):
            raise InvalidSpecError(
                f"base={base!r}: expected an Image, or None for an image of only these layers"
            )
        layers = tuple(check_layer(d, i) for i, d in enumerate(dirs))
        if base is None:
            if not layers:
                raise InvalidSpecError(
                    "an image needs at least one layer: pass a directory, or keep the host base"
                )
            image = cls(layers, False)
        else:
            image = cls(base.layers + layers, base.host)
        _check_not_nested(image.layers)
        return image

    def check(self) -> None:
        """Raise a typed error if any layer is gone or unreadable (before a container starts)."""
        for i, layer in enumerate(self.layers):
            check_layer(layer, i)

    def overlays(self, skeleton: str | None, layout: HostLayout | None) -> tuple[OverlaySpec, ...]:
        """The overlay mounts that build this image's rootfs; lowers are listed topmost first."""
        top_first = tuple(reversed(self.layers))
        if not self.host:
            return (OverlaySpec("", top_first),)
        if skeleton is None or layout is None:
            raise ValueError("an image on the host base needs the host skeleton and layout")
        plan = [OverlaySpec("", (*top_first, skeleton))]
        for name in layout.dirs:
            own = tuple(_system_subdir(layer, name) for layer in top_first)
            plan.append(OverlaySpec(name, (*(d for d in own if d), "/" + name)))
        return tuple(plan)

    def __repr__(self) -> str:
        base = "host base" if self.host else "no base"
        return f"Image({', '.join(repr(x) for x in self.layers)}{', ' if self.layers else ''}{base})"


def _system_subdir(layer: str, name: str) -> str:
    """``layer/name`` if the layer adds to the host's /name; "" if it has no such entry.

    On the host base, /usr (and the like) is an overlay of its own whose lowest layer is the
    host's; what a layer puts there must be a directory.  A symlink would be followed on the host
    when the layer is mounted -- ``usr -> /root`` in a lower layer, hidden in the merged view by
    a real ``usr/`` above it, would mount the host's /root into the container.  (lstat, not
    isdir: never follow it.)
    """
    path = os.path.join(layer, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    if not stat.S_ISDIR(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a directory"
        raise InvalidSpecError(
            f"layer {layer!r}: /{name} is {kind}; on the host base /{name} is the host's, and a layer "
            f"may only add to it with a directory (or use base=None for an image of its own)"
        )
    return path


def check_layer(path: PathLike, index: int) -> str:
    """The absolute, resolved path of one layer directory, or a typed error naming it."""
    raw = os.fspath(path)
    if not isinstance(raw, str) or not raw:
        raise InvalidSpecError(f"layer {index}: {path!r} is not a directory path")
    real = os.path.realpath(raw)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise LayerNotFoundError(f"layer {index}: {raw!r} does not exist", path=raw, errno=2) from None
    if not stat.S_ISDIR(st.st_mode):
        raise LayerNotADirectoryError(
            f"layer {index}: {raw!r} is not a directory (a layer is a directory holding a filesystem tree)",
            path=raw,
            errno=20,
        )
    if not os.access(real, os.R_OK | os.X_OK):
        raise LayerPermissionError(
            f"layer {index}: {raw!r} cannot be read by uid {os.geteuid()}", path=raw, errno=13
        )
    if real == "/":
        raise InvalidSpecError(
            f"layer {index}: {raw!r} is the host's root; use the default host base instead of stacking '/'"
        )
    return real


def _check_not_nested(layers: Iterable[str]) -> None:
    """overlayfs refuses layers inside one another (ELOOP); say which, before the kernel does."""
    paths = [Path(p) for p in layers]
    for i, a in enumerate(paths):
        for j, b in enumerate(paths):
            if i < j and a == b:
                raise InvalidSpecError(f"layers {i} and {j} are the same directory ({str(a)!r})")
            if i != j and a != b and b.is_relative_to(a):
                raise InvalidSpecError(
                    f"layer {j} ({str(b)!r}) is inside layer {i} ({str(a)!r}); "
                    "overlayfs needs disjoint layers"
                )
