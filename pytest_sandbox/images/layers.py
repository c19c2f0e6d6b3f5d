"""Layers as the store keeps them: records of layer stacks, and a container's writable layer captured.

Build steps (:mod:`pytest_sandbox.build`) and ``Container.commit`` both turn a container's upper
(writable) directory into a new stored layer with :func:`commit_upper`: deletions there are
overlayfs whiteouts already; files belong to the container's host ids (``uid_base + N``) and are
shifted back to N; the files the launcher writes itself (``/etc/hostname``, ``/etc/hosts``) and
the empty mount points the setup made are left out.  Both then put the layer on top of the image
the container ran with (:func:`child_record`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence

from ..core.errors import LayerNotFoundError, LayerTooLargeError
from ..core.imagemodel import History, ImageRecord
from ..core.layerstack import LayerStack
from ..core.spec import ContainerSpec
from ..core.units import format_size
from ..host.cleanup import remove_tree
from ..host.rootfs import ContainerDirs, open_held_writable
from .store import Store, copy_tree, now_rfc3339, shift_ids

# Directories the container's setup makes in its upper layer, always covered by a mount.
MOUNT_POINTS = ("dev", "proc", "sys", "tmp")
_UPPER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def stack_of(store: Store, record: ImageRecord) -> LayerStack:
    """The layer stack a stored record describes: the store's layer directories, lowest first."""
    return LayerStack(tuple(store.layer_path(d) for d in record.layers), record.host_base, record.config)


def record_of(store: Store, stack: LayerStack, history: Sequence[History], parent: str | None) -> ImageRecord:
    """The store record of ``stack``, storing its layer directories first (cached by stat snapshot)."""
    digests: list[str] = []
    for path in stack.layers:
        own = store.layer_digest_of(path)
        digests.append(own or store.add_layer_dir(path, parent=digests[-1] if digests else None).digest)
    steps = list(history)
    missing = len(digests) - sum(not h.empty_layer for h in steps)
    if missing > 0:  # a stack made directly from directories: its lowest layers have no history
        steps[:0] = [History(created_by="layer")] * missing
    created = max((h.created for h in steps), default="")
    return ImageRecord(tuple(digests), stack.config, stack.host, created, tuple(steps), parent=parent)


def child_record(parent: ImageRecord, parent_id: str, digest: str, created_by: str) -> ImageRecord:
    """``parent`` with one more layer on top, made now by ``created_by``."""
    now = now_rfc3339()
    return ImageRecord(
        (*parent.layers, digest),
        parent.config,
        parent.host_base,
        now,
        (*parent.history, History(now, created_by)),
        parent_id,
    )


def make_parents(root: str, rel: str, mtime_ns: int) -> str:
    """``root/rel``'s missing directories, 0755 and owned by container root, with a fixed mtime."""
    path = root
    made = []
    for part in [p for p in rel.split("/") if p]:
        path = os.path.join(path, part)
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
            os.chown(path, 0, 0)
            made.append(path)
    for p in made:
        os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    return path


def check_state_dir(name: str, directory: str) -> None:
    """A typed error if a container's state directory (its upper layer) is gone."""
    if not os.path.isdir(directory):
        raise LayerNotFoundError(
            f"container {name}: its state directory {directory!r} is gone", path=directory, errno=2
        )
    with held_writable(name, directory):
        pass


@contextlib.contextmanager
def held_writable(name: str, directory: str) -> Iterator[int]:
    """The container's writable tmpfs as an fd checked to be it (see rootfs.open_held_writable):
    what a capture copies from, never the path again."""
    held = ContainerDirs(directory).held_writable
    try:
        fd = open_held_writable(ContainerDirs(directory))
    except (OSError, ValueError) as e:  # ValueError: a garbled identity record
        raise LayerNotFoundError(
            f"container {name}: its writable layer is not reachable at {held!r} ({e}; the container's "
            "setup did not get that far, or the launcher that held it has exited)",
            path=held,
            errno=getattr(e, "errno", None) or errno.ENOENT,
        ) from None
    try:
        yield fd
    finally:
        os.close(fd)


def capture_upper(
    directory: str, spec: ContainerSpec, dest: str, *, uid_base: int, max_bytes: int | None = None
) -> None:
    """Copy the upper layer(s) of the container in ``directory`` to ``dest`` as one layer directory.

    On the host base, /usr (and the like) are overlays of their own with their own upper
    directory: those go under ``usr/`` (...) in the layer.  Host ids ``uid_base + N`` become N.
    Sparse files keep their holes; ``max_bytes`` bounds the layer's tar size (see copy_tree).
    """
    dirs = ContainerDirs(directory)
    ids = shift_ids(uid_base)
    etc_files = {"etc/" + name for name, _ in spec.etc_files}
    with held_writable(spec.id, directory) as root, _upper_fd(root, 0) as upper:
        used = copy_tree(
            dirs.upper(0), dest, ids=ids, skip=etc_files.__contains__, src_fd=upper, max_bytes=max_bytes
        )
        # Directories the setup made in the upper layer (mount points; /etc for the files above):
        # always covered by a mount, or left empty.  Empty and not opaque, they carry nothing.
        for name in ("etc", *MOUNT_POINTS):
            path = os.path.join(dest, name)
            with contextlib.suppress(OSError):  # absent, not empty or not a directory: kept
                if not os.listdir(path) and _xattr(path, "trusted.overlay.opaque") != b"y":
                    os.rmdir(path)
        for index, overlay in enumerate(spec.overlays):
            if index == 0 or not overlay.target:
                continue
            with _upper_fd(root, index, missing_ok=True) as ufd:
                if ufd is None or not os.listdir(ufd):
                    continue
                rel = overlay.target.strip("/")
                where = os.path.join(dest, rel)
                if os.path.lexists(where):
                    remove_tree(where)  # hidden in the container by this overlay: its upper is what was seen
                make_parents(dest, os.path.dirname(rel), 0)
                left = None if max_bytes is None else max_bytes - used
                used += copy_tree(dirs.upper(index), where, ids=ids, src_fd=ufd, max_bytes=left)


@contextlib.contextmanager
def _upper_fd(root: int, index: int, *, missing_ok: bool = False) -> Iterator[int | None]:
    """Overlay ``index``'s upper directory, opened relative to the checked tmpfs fd ``root``."""
    try:
        # O_NOFOLLOW: upper.N is the first process's mkdir, never a link to follow.
        fd = os.open(f"upper.{index}", _UPPER_FLAGS, dir_fd=root)
    except FileNotFoundError:
        if not missing_ok:
            raise
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def captured_upper(
    store: Store,
    directory: str,
    spec: ContainerSpec,
    *,
    uid_base: int,
    created_by: str,
    max_bytes: int | None,
) -> Iterator[str]:
    """A temporary directory of ``store`` whose ``diff/`` is the container's captured upper layer.

    Over ``max_bytes`` (ini ``sandbox_max_layer_size``): :class:`LayerTooLargeError`, and the
    temporary copy goes with its directory -- nothing reaches the store.
    """
    check_state_dir(spec.id, directory)
    with store.tempdir() as tmp:
        try:
            capture_upper(directory, spec, os.path.join(tmp, "diff"), uid_base=uid_base, max_bytes=max_bytes)
        except LayerTooLargeError as e:
            raise _too_large(created_by, e) from None
        yield tmp


def commit_upper(
    store: Store,
    directory: str,
    spec: ContainerSpec,
    *,
    uid_base: int,
    parent: ImageRecord,
    created_by: str,
    max_bytes: int | None = None,
) -> str:
    """The digest of a new stored layer holding what the container in ``directory`` wrote."""
    with captured_upper(
        store, directory, spec, uid_base=uid_base, created_by=created_by, max_bytes=max_bytes
    ) as tmp:
        top = parent.layers[-1] if parent.layers else None
        return store.add_prepared_layer(tmp, created_by=created_by, parent=top).digest


def _too_large(created_by: str, e: LayerTooLargeError) -> LayerTooLargeError:
    return LayerTooLargeError(
        f"{created_by}: the layer is over the limit of {format_size(e.limit)} ({e.limit} bytes, ini "
        f"sandbox_max_layer_size): its tar would have more than {e.size} bytes (counted as far as "
        f"{e.filename}; a sparse file counts in full, as it does in a tar); nothing was stored",
        size=e.size,
        limit=e.limit,
        path=e.filename,
        hint="delete what the layer need not keep before capturing it, or raise ini sandbox_max_layer_size "
        "(--sandbox-max-layer-size, PYTEST_SANDBOX_MAX_LAYER_SIZE)",
    )


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None
