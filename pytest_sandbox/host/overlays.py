"""Layer directories as overlayfs lowers: the checks overlayfs needs, and the overlay plan.

A layer is a host directory; before anything is created, each one is checked to exist, be a
readable directory and not be ``/`` (:func:`check_layer`), and no two may be nested
(:func:`check_not_nested`): overlayfs refuses both with errors that do not name the layer.
:func:`plan_overlays` turns a :class:`~pytest_sandbox.core.layerstack.LayerStack` into the overlay
mounts that build a container's root (mounted by :mod:`pytest_sandbox.host.rootfs`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import InvalidSpecError, LayerNotADirectoryError, LayerNotFoundError, LayerPermissionError
from ..core.layerstack import LayerStack
from ..core.spec import OverlaySpec
from .hostbase import HostLayout

PathLike = str | os.PathLike[str]


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


def check_layers(stack: LayerStack) -> None:
    """Raise a typed error if any layer is gone or unreadable (a directory may vanish before a start)."""
    for i, layer in enumerate(stack.layers):
        check_layer(layer, i)


def check_not_nested(layers: Iterable[str]) -> None:
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


def plan_overlays(stack: LayerStack, host_base: tuple[str, HostLayout] | None) -> tuple[OverlaySpec, ...]:
    """The overlay mounts that build ``stack``'s rootfs; lowers are listed topmost first.

    ``host_base`` is the host skeleton and layout (:func:`pytest_sandbox.host.hostbase.ensure_skeleton`),
    needed when the stack is on the host base.  A layer that appears twice (stored images repeat
    the empty layer of metadata-only steps) is mounted once, at its topmost place: overlayfs
    refuses the same lower twice (ELOOP), and the lower copy adds nothing -- every entry and
    whiteout it has, the upper copy has.
    """
    top_first = tuple(dict.fromkeys(reversed(stack.layers)))
    if not stack.host:
        return (OverlaySpec("", top_first),)
    if host_base is None:
        raise ValueError("an image on the host base needs the host skeleton and layout")
    skeleton, layout = host_base
    plan = [OverlaySpec("", (*top_first, skeleton))]
    for name in layout.dirs:
        own = tuple(_system_subdir(layer, name) for layer in top_first)
        plan.append(OverlaySpec(name, (*(d for d in own if d), "/" + name)))
    return tuple(plan)


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
