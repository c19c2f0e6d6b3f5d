"""Images: ordered read-only layer directories, stacked with overlayfs (the seed's union filesystem).

An :class:`Image` is a tuple of host directories, lowest first, optionally on top of the host base
(:mod:`pytest_sandbox.host.hostbase`).  Layer directories are never modified: each container gets its
own writable upper layer.  Layers are checked when the image is made *and* when a container
starts (a directory may vanish in between), always before anything is created.

Images also live in the local store (:mod:`pytest_sandbox.images.store`): ``Image.load("app:1")``,
``image.tag("app:1")``, ``Image.pull(ref)``.  A stored image's layers are the store's layer
directories, so an image stays "a stack of dirs".  ``from_layers`` never copies anything;
storing happens when an image is tagged, built upon (build steps: :mod:`pytest_sandbox.build`),
committed or exported.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core.errors import InvalidSpecError, LayerNotADirectoryError, LayerNotFoundError, LayerPermissionError

# The model types live in the pure core; re-exported here, where users have always found them.
from .core.imagemodel import History, ImageConfig, ImageRecord
from .core.spec import OverlaySpec
from .host.hostbase import HostLayout

if TYPE_CHECKING:
    from .images.store import Store

__all__ = ["DEFAULT_BASE", "History", "Image", "ImageConfig", "PathLike", "check_layer"]

PathLike = str | os.PathLike[str]


class _Default:
    def __repr__(self) -> str:
        return "<the host base>"


DEFAULT_BASE = _Default()


@dataclass(frozen=True)
class Image:
    """A stack of read-only layer directories (lowest first), on the host base unless ``host=False``.

    ``history`` describes the lowest layers (and config steps) when the image came from the store
    or a build; ``store`` and ``image_id`` are set on images loaded, built or tagged there.
    """

    layers: tuple[str, ...] = ()
    host: bool = True
    config: ImageConfig = field(default_factory=ImageConfig)
    history: tuple[History, ...] = ()
    store: Store | None = field(default=None, compare=False, repr=False)
    image_id: str | None = field(default=None, compare=False)
    # The stored image a config step (env, workdir, user) started from: the record's parent
    # once this one is stored, so that prune and `images` know it as a step of a build.
    parent_id: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def host_base(cls) -> Image:
        """The embedded default: the host's /usr and libraries, read-only, with a minimal /etc."""
        return cls((), True)

    @classmethod
    def from_layers(
        cls, *dirs: PathLike, base: Image | _Default | None = DEFAULT_BASE, store: Store | None = None
    ) -> Image:
        """Stack ``dirs`` (lowest first) on ``base``: the host base by default, None for nothing.

        ``Image.from_layers(busybox_dir, base=None)`` is an image made only of that layer;
        ``base`` may be any image (loaded, pulled, imported, built): its config comes along.
        Nothing is copied.  ``store`` is where tag() and build steps keep it (default: the
        store under the data root, or the base's).
        """
        if isinstance(base, _Default):
            base = cls.host_base()
        if base is not None and not isinstance(base, Image):
            raise InvalidSpecError(
                f"base={base!r}: expected an Image, or None for an image of only these layers"
            )
        layers = tuple(check_layer(d, i) for i, d in enumerate(dirs))
        added = tuple(History(created_by="from_layers") for _ in layers)
        if base is None:
            if not layers:
                raise InvalidSpecError(
                    "an image needs at least one layer: pass a directory, or keep the host base"
                )
            image = cls(layers, False, history=added, store=store)
        elif not layers:
            return base if store is None or store == base.store else dataclasses.replace(base, store=store)
        else:
            image = cls(
                base.layers + layers, base.host, base.config, base.history + added, store=store or base.store
            )
        _check_not_nested(image.layers)
        return image

    # -- the store -------------------------------------------------------------------------

    @classmethod
    def load(cls, ref: str, *, store: Store | None = None) -> Image:
        """The image ``ref`` (``name[:tag]``, ``name@sha256:..`` or ``sha256:<id>``) from the store."""
        from .images.store import Store

        st = store or Store.default()
        image_id = st.resolve_id(ref)
        return cls.from_record(st.get_image(image_id), st, image_id)

    @classmethod
    def pull(cls, ref: str) -> Image:
        """Pull ``ref`` from its registry into the default store (skipping layers already there)."""
        from .images.registry import pull_image

        return pull_image(ref)

    @classmethod
    def from_record(cls, record: ImageRecord, store: Store, image_id: str | None = None) -> Image:
        """The image a store record describes (its layers are the store's layer directories)."""
        return cls(
            tuple(store.layer_path(d) for d in record.layers),
            record.host_base,
            record.config,
            record.history,
            store=store,
            image_id=image_id or record.id,
        )

    def save(self, *, store: Store | None = None) -> Image:
        """This image, stored (layers copied in unless they are already there): it has an image_id."""
        from .build import save_image

        return save_image(self, store)

    def tag(self, ref: str, *, store: Store | None = None) -> Image:
        """Store this image and name it ``ref`` (``name[:tag]``); the stored image."""
        from .build import tag_image

        return tag_image(self, ref, store)

    # -- build steps (each returns a new image; cached on parent, step and inputs) ---------

    def copy(self, src: PathLike, dst: str) -> Image:
        """A layer with ``src`` (a host file or directory) at ``dst`` in the image, owned by root.

        As Dockerfile's COPY: a directory's *contents* go into ``dst``; a file goes to ``dst``,
        or into it when ``dst`` ends with ``/``.
        """
        from .build import copy_step

        return copy_step(self, src, dst)

    def env(self, env: Mapping[str, str] | None = None, /, **kwargs: str) -> Image:
        """The image with environment variables set (``.env(K="v")`` or ``.env({"K": "v"})``)."""
        from .build import env_step

        return env_step(self, {**(env or {}), **kwargs})

    def workdir(self, path: str) -> Image:
        """The image with its working directory set (absolute, inside the container)."""
        from .build import workdir_step

        return workdir_step(self, path)

    def user(self, user: str | int) -> Image:
        """The image with its default user set (``"1000"``, ``"1000:1000"``, ``"app"``...)."""
        from .build import user_step

        return user_step(self, user)

    def run(self, cmd: Sequence[str], *, timeout: float | None = None) -> Image:
        """Run ``cmd`` in a container of this image; what it wrote becomes a new layer.

        Deletions become whiteouts.  A command that fails raises BuildError with its output.
        """
        from .build import run_step

        return run_step(self, cmd, timeout=timeout)

    def check(self) -> None:
        """Raise a typed error if any layer is gone or unreadable (before a container starts)."""
        for i, layer in enumerate(self.layers):
            check_layer(layer, i)

    def overlays(self, skeleton: str | None, layout: HostLayout | None) -> tuple[OverlaySpec, ...]:
        """The overlay mounts that build this image's rootfs; lowers are listed topmost first.

        A layer that appears twice (stored images repeat the empty layer of metadata-only steps)
        is mounted once, at its topmost place: overlayfs refuses the same lower twice (ELOOP),
        and the lower copy adds nothing -- every entry and whiteout it has, the upper copy has.
        """
        top_first = tuple(dict.fromkeys(reversed(self.layers)))
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
