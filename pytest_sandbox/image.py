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
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import build
from .core.errors import InvalidSpecError

# The model types live in the pure core; re-exported here, where users have always found them.
from .core.imagemodel import History, ImageConfig, ImageRecord
from .core.layerstack import ImageLike, LayerStack
from .host.overlays import check_layer, check_layers, check_not_nested
from .images.layers import captured_upper, child_record, record_of
from .images.store import Store
from .runtime import current_settings

if TYPE_CHECKING:
    from .config import Settings
    from .container import Container

__all__ = ["DEFAULT_BASE", "History", "Image", "ImageConfig", "PathLike", "check_layer", "commit_container"]

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
        check_not_nested(image.layers)
        return image

    # -- the store -------------------------------------------------------------------------

    @classmethod
    def load(cls, ref: str, *, store: Store | None = None) -> Image:
        """The image ``ref`` (``name[:tag]``, ``name@sha256:..`` or ``sha256:<id>``) from the store."""
        st = store or Store.default(current_settings())
        image_id = st.resolve_id(ref)
        return cls.from_record(st.get_image(image_id), st, image_id)

    @classmethod
    def pull(cls, ref: str) -> Image:
        """Pull ``ref`` from its registry into the default store (skipping layers already there).

        The store and the registry settings (insecure registries, mirrors) are the session's.
        """
        from .images.registry import pull

        settings = current_settings()
        result = pull(ref, settings=settings)  # ids: the registry client knows nothing of Image
        return cls.load(result.ref or result.image_id, store=Store.default(settings))

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

    def layer_stack(self) -> LayerStack:
        """What a container of this image is made of (what sandbox.run(image=) reads)."""
        return LayerStack(self.layers, self.host, self.config)

    def save(self, *, store: Store | None = None) -> Image:
        """This image, stored (layers copied in unless they are already there): it has an image_id."""
        st = self._store(store)
        if self._stored_in(st):
            return self
        record = self._record(st)
        return Image.from_record(record, st, st.put_image(record))

    def tag(self, ref: str, *, store: Store | None = None) -> Image:
        """Store this image and name it ``ref`` (``name[:tag]``); the stored image."""
        Store.check_tag(ref)  # before anything is stored
        saved = self.save(store=store)
        assert saved.store is not None
        assert saved.image_id is not None
        saved.store.tag(ref, saved.image_id)
        return saved

    # -- build steps (each returns a new image; cached on parent, step and inputs) ---------

    def copy(self, src: PathLike, dst: str) -> Image:
        """A layer with ``src`` (a host file or directory) at ``dst`` in the image, owned by root.

        As Dockerfile's COPY: a directory's *contents* go into ``dst``; a file goes to ``dst``,
        or into it when ``dst`` ends with ``/``.
        """
        st = self._store()
        return self._with_layer(st, build.copy_step(st, src, dst))

    def env(self, env: Mapping[str, str] | None = None, /, **kwargs: str) -> Image:
        """The image with environment variables set (``.env(K="v")`` or ``.env({"K": "v"})``)."""
        return self._with_config(*build.env_config(self.config, {**(env or {}), **kwargs}))

    def workdir(self, path: str) -> Image:
        """The image with its working directory set (absolute, inside the container)."""
        return self._with_config(*build.workdir_config(self.config, path))

    def user(self, user: str | int) -> Image:
        """The image with its default user set (``"1000"``, ``"1000:1000"``, ``"app"``...)."""
        return self._with_config(*build.user_config(self.config, user))

    def run(self, cmd: Sequence[str], *, timeout: float | None = None) -> Image:
        """Run ``cmd`` in a container of this image; what it wrote becomes a new layer.

        Deletions become whiteouts.  A command that fails raises BuildError with its output.
        """
        step = build.run_step(cmd, timeout=timeout)
        return self._with_layer(self._store(), step)

    def check(self) -> None:
        """Raise a typed error if any layer is gone or unreadable (before a container starts)."""
        check_layers(self.layer_stack())

    def __repr__(self) -> str:
        base = "host base" if self.host else "no base"
        return f"Image({', '.join(repr(x) for x in self.layers)}{', ' if self.layers else ''}{base})"

    # -- storing -----------------------------------------------------------------------------

    def _store(self, store: Store | None = None) -> Store:
        return store or self.store or Store.default(current_settings())

    def _stored_in(self, store: Store) -> bool:
        return self.image_id is not None and self.store == store and store.has_image(self.image_id)

    def _record(self, store: Store) -> ImageRecord:
        """This image's store record, storing its layer directories first (cached by stat snapshot)."""
        if self._stored_in(store):
            assert self.image_id is not None
            return store.get_image(self.image_id)
        return record_of(store, self.layer_stack(), self.history, self.parent_id)

    def _with_config(self, config: ImageConfig, created_by: str) -> Image:
        return dataclasses.replace(
            self,
            config=config,
            history=(*self.history, History(created_by=created_by, empty_layer=True)),
            image_id=None,
            parent_id=self.image_id or self.parent_id,
        )

    def _with_layer(self, store: Store, step: build.LayerStep) -> Image:
        parent = self._record(store)
        image_id = build.add_layer(store, parent, store.put_image(parent), step)
        return Image.from_record(store.get_image(image_id), store, image_id)


def _as_image(source: ImageLike) -> Image:
    """The image a container was started from (a bare LayerStack becomes an unstored image)."""
    if isinstance(source, Image):
        return source
    stack = source.layer_stack()
    return Image(stack.layers, stack.host, stack.config)


def commit_container(
    container: Container,
    ref: str,
    *,
    settings: Settings,
    store: Store | None = None,
) -> Image:
    """``docker commit``: the container's writable layer on top of its image, tagged ``ref``.

    ``settings``: the container's runtime's (its uid base, ini ``sandbox_max_layer_size``).
    """
    Store.check_tag(ref)
    base = _as_image(container.image)
    st = base._store(store)
    line = f"commit {container.name}: {shlex.join(container.spec.process.argv)}"
    # Captured first: a layer refused (too large, or gone) leaves nothing in the store, not even
    # the parent.
    with (
        build.launcher_checked(container),
        captured_upper(
            st,
            container.dir,
            container.spec,
            uid_base=settings.uid_base,
            created_by=line,
            max_bytes=settings.max_layer_size,
        ) as tmp,
    ):
        parent = base._record(st)
        parent_id = st.put_image(parent)
        top = parent.layers[-1] if parent.layers else None
        digest = st.add_prepared_layer(tmp, created_by=line, parent=top).digest
    record = child_record(parent, parent_id, digest, line)
    image_id = st.put_image(record)
    st.tag(ref, image_id)
    return Image.from_record(record, st, image_id)
