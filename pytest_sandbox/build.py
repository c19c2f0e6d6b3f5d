"""Build steps, storing images, and committing containers (composition: image + store + sandbox).

``Image.from_layers(d).copy(src, "/app").env(K="v").workdir("/app").run([...]).tag("app:1")``:

- config steps (``env``, ``workdir``, ``user``) only change the image's config and history; they
  touch no layer and need no store;
- layer steps (``copy``, ``run``) are cached on (parent image id, step, inputs) -- for ``copy``
  the digest of the copied content, itself cached on a stat snapshot -- so building an unchanged
  image again reads no layer content and starts no container.  A miss builds under a per-step
  lock: two xdist workers building the same step build it once;
- ``run`` starts a container of the parent image (:class:`pytest_sandbox.Sandbox`), waits, and
  captures its writable (upper) layer as the new layer -- deletions are overlayfs whiteouts
  already.  Files there belong to the container's host ids (uid_base + N); they are shifted back
  to N, and the files the launcher writes itself (``/etc/hostname``, ``/etc/hosts``) are left out.

``Container.commit(ref)`` uses the same capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .core.errors import BuildError, InvalidSpecError, LayerNotFoundError, SandboxTimeoutError
from .core.spec import container_path, parse_argv, parse_env, parse_timeout, parse_user
from .host.cleanup import remove_tree
from .host.rootfs import ContainerDirs
from .image import History, Image, ImageConfig
from .images.store import ImageRecord, Store, copy_tree, now_rfc3339, shift_ids

if TYPE_CHECKING:
    from .container import Container

MOUNT_POINTS = ("dev", "proc", "sys", "tmp")


def store_of(image: Image, store: Store | None = None) -> Store:
    return store or image.store or Store.default()


def image_record(image: Image, store: Store) -> ImageRecord:
    """The store record of ``image``, storing its layer directories first (cached by stat snapshot)."""
    if image.image_id is not None and image.store == store and store.has_image(image.image_id):
        return store.get_image(image.image_id)
    digests: list[str] = []
    for path in image.layers:
        own = store.layer_digest_of(path)
        digests.append(own or store.add_layer_dir(path, parent=digests[-1] if digests else None).digest)
    history = list(image.history)
    missing = len(digests) - sum(not h.empty_layer for h in history)
    if missing > 0:  # an Image made directly from directories: its lowest layers have no history
        history[:0] = [History(created_by="layer")] * missing
    created = max((h.created for h in history), default="")
    return ImageRecord(
        tuple(digests), image.config, image.host, created, tuple(history), parent=image.parent_id
    )


def save_image(image: Image, store: Store | None = None) -> Image:
    """``image`` stored: its layers are the store's directories and it has an image id."""
    st = store_of(image, store)
    if image.image_id is not None and image.store == st and st.has_image(image.image_id):
        return image
    record = image_record(image, st)
    return Image.from_record(record, st, st.put_image(record))


def tag_image(image: Image, ref: str, store: Store | None = None) -> Image:
    Store.check_tag(ref)  # before anything is stored
    saved = save_image(image, store)
    assert saved.store is not None
    assert saved.image_id is not None
    saved.store.tag(ref, saved.image_id)
    return saved


# -- config steps ---------------------------------------------------------------------------


def _config_step(image: Image, config: ImageConfig, created_by: str) -> Image:
    return dataclasses.replace(
        image,
        config=config,
        history=(*image.history, History(created_by=created_by, empty_layer=True)),
        image_id=None,
        parent_id=image.image_id or image.parent_id,
    )


def env_step(image: Image, env: Mapping[str, str]) -> Image:
    if not env:
        raise InvalidSpecError("env(): give at least one variable, e.g. .env(DEBUG='1')")
    given = dict(parse_env(env))
    new = {k: given[k] for k in env}
    merged = {**dict(image.config.env), **new}
    line = "ENV " + " ".join(f"{k}={shlex.quote(v)}" for k, v in new.items())
    return _config_step(image, dataclasses.replace(image.config, env=tuple(merged.items())), line)


def workdir_step(image: Image, path: str) -> Image:
    workdir = container_path(path, what="workdir")
    return _config_step(image, dataclasses.replace(image.config, workdir=workdir), f"WORKDIR {workdir}")


def user_step(image: Image, user: str | int) -> Image:
    parsed = parse_user(user)
    return _config_step(image, dataclasses.replace(image.config, user=parsed), f"USER {parsed}")


# -- layer steps ----------------------------------------------------------------------------


def _layer_step(
    image: Image,
    step: str,
    inputs: Sequence[Any],
    make_layer: Callable[[Store, Image, ImageRecord], str],
    created_by: str,
) -> Image:
    """Cached on (parent image id, step, inputs); ``make_layer`` returns the new layer's digest."""
    st = store_of(image)
    parent = image_record(image, st)
    parent_id = st.put_image(parent)
    key = Store.build_key(parent_id, step, inputs)
    hit = st.build_cache_get(key)
    if hit is None:
        with st.build_lock(key):
            hit = st.build_cache_get(key)
            if hit is None:
                digest = make_layer(st, Image.from_record(parent, st, parent_id), parent)
                hit = st.put_image(child_record(parent, parent_id, digest, created_by))
                st.build_cache_put(key, hit)
    return Image.from_record(st.get_image(hit), st, hit)


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


def _makedirs(root: str, rel: str, mtime_ns: int) -> str:
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


def copy_step(image: Image, src: object, dst: str) -> Image:
    raw = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    if not raw or "\0" in raw:
        raise InvalidSpecError(f"copy(src={src!r}): expected a host file or directory path")
    target = container_path(dst, what="copy(dst)")
    into = dst.endswith("/")
    real = os.path.realpath(raw)
    try:
        st_src = os.stat(real)
    except FileNotFoundError:
        raise LayerNotFoundError(f"copy(src={raw!r}): does not exist", path=raw, errno=2) from None
    is_dir = stat.S_ISDIR(st_src.st_mode)
    if not is_dir and not stat.S_ISREG(st_src.st_mode):
        raise InvalidSpecError(f"copy(src={raw!r}): only files and directories can be copied")
    if is_dir and real == "/":
        raise InvalidSpecError(f"copy(src={raw!r}): refusing to copy the host's root")
    if not is_dir and into:
        target = os.path.join(target, os.path.basename(real))
    store = store_of(image)
    digest = store.content_digest(real)
    mtime = st_src.st_mtime_ns

    def make(st: Store, base: Image, parent: ImageRecord) -> str:
        with st.tempdir() as tmp:
            diff = os.path.join(tmp, "diff")
            rel = target.strip("/")
            if is_dir and not rel:
                copy_tree(real, diff, owner=(0, 0))
            else:
                os.mkdir(diff, 0o755)
                os.chmod(diff, 0o755)
                parent_dir = _makedirs(diff, os.path.dirname(rel), mtime)
                if is_dir:
                    copy_tree(real, os.path.join(diff, rel), owner=(0, 0))
                else:
                    _copy_one_file(real, parent_dir, os.path.basename(rel))
            top = parent.layers[-1] if parent.layers else None
            return st.add_prepared_layer(tmp, created_by=f"COPY {raw} {dst}", parent=top).digest

    return _layer_step(
        image, "copy", [digest, target, is_dir], make, f"COPY {shlex.quote(raw)} {shlex.quote(dst)}"
    )


def _copy_one_file(src: str, dest_dir: str, name: str) -> None:
    """One regular file into ``dest_dir/name``, owned by container root (store.copy_tree's rules)."""
    from .images.store import copy_file_at

    sfd = os.open(os.path.dirname(src), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dfd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        copy_file_at(sfd, os.path.basename(src), dfd, name, owner=(0, 0))
    finally:
        os.close(sfd)
        os.close(dfd)


def run_step(image: Image, cmd: Sequence[str], *, timeout: float | None = None) -> Image:
    argv = parse_argv(cmd)
    limit = parse_timeout(timeout)
    line = "RUN " + shlex.join(argv)

    def make(st: Store, base: Image, parent: ImageRecord) -> str:
        from .sandbox import Sandbox

        with Sandbox() as sb:
            container = sb.start(list(argv), image=base)
            try:
                result = container.wait(limit)
            except SandboxTimeoutError:
                result = container.stop(0.1)
                raise BuildError(
                    f"build step {line!r} did not finish in {timeout} s; killed\n"
                    f"--- output (last lines) ---\n{container.log_tail()}",
                    result=result,
                    hint="raise run(..., timeout=), or check the command is not waiting for input",
                ) from None
            if not result.ok:
                how = f"signal {result.signal}" if result.signal else f"exit code {result.exit_code}"
                raise BuildError(
                    f"build step {line!r} failed with {how}\n"
                    f"--- output (last lines) ---\n{container.log_tail()}",
                    result=result,
                )
            with st.tempdir() as tmp:
                capture_upper(container, os.path.join(tmp, "diff"), uid_base=sb.runtime.config.uid_base)
                top = parent.layers[-1] if parent.layers else None
                return st.add_prepared_layer(tmp, created_by=line, parent=top).digest

    return _layer_step(image, "run", list(argv), make, line)


# -- capturing a container's writable layer ---------------------------------------------------


def capture_upper(container: Container, dest: str, *, uid_base: int) -> None:
    """Copy the container's upper layer(s) to ``dest`` as one overlay-format layer directory.

    On the host base, /usr (and the like) are overlays of their own with their own upper
    directory: those go under ``usr/`` (...) in the layer.  Host ids ``uid_base + N`` become N.
    """
    _check_state_dir(container)
    dirs = ContainerDirs(container.dir)
    ids = shift_ids(uid_base)
    etc_files = {"etc/" + name for name, _ in container.spec.etc_files}
    copy_tree(dirs.upper(0), dest, ids=ids, skip=etc_files.__contains__)
    # Directories the setup made in the upper layer (mount points; /etc for the files above):
    # always covered by a mount, or left empty.  Empty and not opaque, they carry nothing.
    for name in ("etc", *MOUNT_POINTS):
        path = os.path.join(dest, name)
        with contextlib.suppress(OSError):  # absent, not empty or not a directory: kept
            if not os.listdir(path) and _xattr(path, "trusted.overlay.opaque") != b"y":
                os.rmdir(path)
    for index, overlay in enumerate(container.spec.overlays):
        if index == 0 or not overlay.target:
            continue
        upper = dirs.upper(index)
        if not os.path.isdir(upper) or not os.listdir(upper):
            continue
        rel = overlay.target.strip("/")
        where = os.path.join(dest, rel)
        if os.path.lexists(where):
            remove_tree(where)  # hidden in the container by this overlay: its upper is what was seen
        _makedirs(dest, os.path.dirname(rel), 0)
        copy_tree(upper, where, ids=ids)


def _check_state_dir(container: Container) -> None:
    if not os.path.isdir(container.dir):
        raise LayerNotFoundError(
            f"container {container.name}: its state directory {container.dir!r} is gone",
            path=container.dir,
            errno=2,
        )


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def commit_container(container: Container, ref: str, *, uid_base: int, store: Store | None = None) -> Image:
    """``docker commit``: the container's writable layer on top of its image, tagged ``ref``."""
    Store.check_tag(ref)
    _check_state_dir(container)  # before the parent image is stored
    st = store_of(container.image, store)
    parent = image_record(container.image, st)
    parent_id = st.put_image(parent)
    with st.tempdir() as tmp:
        capture_upper(container, os.path.join(tmp, "diff"), uid_base=uid_base)
        line = f"commit {container.name}: {shlex.join(container.spec.process.argv)}"
        top = parent.layers[-1] if parent.layers else None
        digest = st.add_prepared_layer(tmp, created_by=line, parent=top).digest
    record = child_record(parent, parent_id, digest, line)
    image_id = st.put_image(record)
    st.tag(ref, image_id)
    return Image.from_record(record, st, image_id)
