"""Build steps (composition: store + sandbox): each step makes a config, or a stored layer and image id.

``Image.from_layers(d).copy(src, "/app").env(K="v").workdir("/app").run([...]).tag("app:1")``;
:mod:`pytest_sandbox.image` wraps what these steps return into images:

- config steps (``env``, ``workdir``, ``user``) only change the image's config and history; they
  touch no layer and need no store (:func:`env_config`, :func:`workdir_config`, :func:`user_config`);
- layer steps (``copy``, ``run``: a :class:`LayerStep`) are cached on (parent image id, step,
  inputs) -- for ``copy`` the digest of the copied content, itself cached on a stat snapshot -- so
  building an unchanged image again reads no layer content and starts no container.  A miss
  builds under a per-step lock: two xdist workers building the same step build it once
  (:func:`add_layer`);
- ``run`` starts a container of the parent image (:class:`pytest_sandbox.Sandbox`), waits, and
  captures its writable (upper) layer as the new layer (:func:`pytest_sandbox.images.layers.commit_upper`,
  which ``Container.commit`` uses too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shlex
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .core.errors import BuildError, InvalidSpecError, LayerNotFoundError, SandboxTimeoutError, SetupError
from .core.imagemodel import ImageConfig, ImageRecord
from .core.spec import container_path, parse_argv, parse_env, parse_timeout, parse_user
from .host import libc
from .host.fstree import copy_open_file, root_required
from .images.layers import child_record, commit_upper, make_parents, stack_of
from .images.store import Store, copy_tree
from .sandbox import Sandbox

if TYPE_CHECKING:
    from .container import Container

# -- config steps: the new config and the history line ---------------------------------------


def env_config(config: ImageConfig, env: Mapping[str, str]) -> tuple[ImageConfig, str]:
    if not env:
        raise InvalidSpecError("env(): give at least one variable, e.g. .env(DEBUG='1')")
    given = dict(parse_env(env))
    new = {k: given[k] for k in env}
    merged = {**dict(config.env), **new}
    line = "ENV " + " ".join(f"{k}={shlex.quote(v)}" for k, v in new.items())
    return dataclasses.replace(config, env=tuple(merged.items())), line


def workdir_config(config: ImageConfig, path: str) -> tuple[ImageConfig, str]:
    workdir = container_path(path, what="workdir")
    return dataclasses.replace(config, workdir=workdir), f"WORKDIR {workdir}"


def user_config(config: ImageConfig, user: str | int) -> tuple[ImageConfig, str]:
    parsed = parse_user(user)
    return dataclasses.replace(config, user=parsed), f"USER {parsed}"


# -- layer steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStep:
    """One validated layer step: its cache key (``name``, ``inputs``) and how to make its layer."""

    name: str
    inputs: tuple[Any, ...]
    created_by: str
    make: Callable[[Store, ImageRecord], str]  # on a cache miss: the new layer's digest


def add_layer(store: Store, parent: ImageRecord, parent_id: str, step: LayerStep) -> str:
    """The id of the image ``parent`` + the step's layer; cached on (parent id, step, inputs)."""
    key = Store.build_key(parent_id, step.name, list(step.inputs))
    hit = store.build_cache_get(key)
    if hit is None:
        with store.build_lock(key):
            hit = store.build_cache_get(key)
            if hit is None:
                digest = step.make(store, parent)
                hit = store.put_image(child_record(parent, parent_id, digest, step.created_by))
                store.build_cache_put(key, hit)
    return hit


def copy_step(store: Store, src: object, dst: str) -> LayerStep:
    """COPY ``src`` (a host file or directory) to ``dst``; its content digest comes from ``store``."""
    raw = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    if not raw or "\0" in raw:
        raise InvalidSpecError(f"copy(src={src!r}): expected a host file or directory path")
    target = container_path(dst, what="copy(dst)")
    into = dst.endswith("/")
    real = _canonical_source(raw)
    # Looked up once: its type is checked, and its content hashed, through this one descriptor.
    with _opened_source(raw, real, None) as src_fd:
        st_src = os.fstat(src_fd)
        is_dir = stat.S_ISDIR(st_src.st_mode)
        if not is_dir and not stat.S_ISREG(st_src.st_mode):
            raise InvalidSpecError(
                f"copy(src={raw!r}) is a {_file_kind(st_src.st_mode)}: only files and directories "
                "can be copied"
            )
        if is_dir and real == "/":
            raise InvalidSpecError(f"copy(src={raw!r}): refusing to copy the host's root")
        if not is_dir and into:
            target = os.path.join(target, os.path.basename(real))
        if os.geteuid() != 0:  # the copy is owned by container root (host uid 0): chown(2) needs root
            raise root_required(f"copy(src={raw!r})")
        digest = _content_digest(store, raw, real, src_fd)
    mtime = st_src.st_mtime_ns
    identity = (st_src.st_dev, st_src.st_ino)

    def make(st: Store, parent: ImageRecord) -> str:
        with st.tempdir() as tmp, _opened_source(raw, real, identity) as src_fd:
            diff = os.path.join(tmp, "diff")
            rel = target.strip("/")
            if is_dir and not rel:
                copy_tree(real, diff, owner=(0, 0), src_fd=src_fd)
            else:
                os.mkdir(diff, 0o755)
                os.chmod(diff, 0o755)
                parent_dir = make_parents(diff, os.path.dirname(rel), mtime)
                if is_dir:
                    copy_tree(real, os.path.join(diff, rel), owner=(0, 0), src_fd=src_fd)
                else:
                    _copy_one_file(src_fd, real, parent_dir, os.path.basename(rel))
                if parent_dir != diff:  # the copy made in it changed its mtime: the layer's digest
                    os.utime(parent_dir, ns=(mtime, mtime), follow_symlinks=False)
            top = parent.layers[-1] if parent.layers else None
            return st.add_prepared_layer(tmp, created_by=f"COPY {raw} {dst}", parent=top).digest

    return LayerStep("copy", (digest, target, is_dir), f"COPY {shlex.quote(raw)} {shlex.quote(dst)}", make)


def _file_kind(mode: int) -> str:
    """What a COPY source that is neither a file nor a directory is, for its error."""
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"))
    return next((name for test, name in kinds if test(mode)), "block device")


def _content_digest(store: Store, raw: str, real: str, src_fd: int) -> str:
    try:
        return store.content_digest(real, fd=src_fd)
    except LayerNotFoundError:
        raise
    except OSError as e:  # a directory swapped for a symlink while it is read: ENOTDIR, ELOOP, EINVAL
        raise InvalidSpecError(f"copy(src={raw!r}): changed while it was read ({e.strerror})") from None


def _canonical_source(raw: str) -> str:
    """``raw`` made absolute; refused if a symlink is on its way (as bind sources are, core/spec).

    A container with a read-write bind of a parent directory could have planted one
    (``ln -s /etc shared/app``): followed, the host's files would be copied into the image.
    """
    try:
        real = os.path.realpath(raw)
    except OSError as e:  # readlink of a symlink swapped for a directory meanwhile: EINVAL
        raise InvalidSpecError(f"copy(src={raw!r}): changed while resolved ({e.strerror})") from None
    if real != os.path.normpath(os.path.abspath(raw)):
        raise InvalidSpecError(
            f"copy(src={raw!r}) goes through a symlink (it resolves to {real!r}); give the resolved "
            "path: a copy source is never followed through a symlink, which a container writing a "
            "parent directory could have planted"
        )
    return real


@contextlib.contextmanager
def _opened_source(raw: str, real: str, identity: tuple[int, int] | None) -> Iterator[int]:
    """An O_PATH fd of a COPY source, the object resolved when the step was made, or refused
    (``identity`` None: when the step is made; LayerNotFoundError if there is none).

    The copy runs later, maybe while a container writes a directory above the source: a
    symlink swapped in there would copy whatever it names on the host into the image (issue 9,
    item 1's pattern).  ``real`` is canonical, so no symlink may be followed on the way.
    """
    try:
        fd = libc.open_no_symlinks(real)
    except SetupError as e:
        if identity is None and e.errno == errno.ENOENT:
            raise LayerNotFoundError(f"copy(src={raw!r}): does not exist", path=raw, errno=2) from None
        when = "since the step was made" if identity is not None else "while it was looked up"
        raise InvalidSpecError(
            f"copy(src={raw!r}): {real!r} changed {when} ({os.strerror(e.errno or 0)})"
        ) from None
    try:
        st = os.fstat(fd)
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise InvalidSpecError(f"copy(src={raw!r}): {real!r} was replaced since the step was made")
        yield fd
    finally:
        os.close(fd)


def _copy_one_file(src_fd: int, src: str, dest_dir: str, name: str) -> None:
    """The regular file ``src_fd`` (see _opened_source) into ``dest_dir/name``, owned by container root."""
    # Reopened through its own fd (the /proc/self/fd magic link is that very file, not a new
    # lookup of ``src``); O_NONBLOCK, so even a FIFO could not block the open (copy_open_file refuses it).
    sfd = os.open(f"/proc/self/fd/{src_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        dfd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            copy_open_file(sfd, src, dfd, name, owner=(0, 0))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


@contextlib.contextmanager
def launcher_checked(container: Container) -> Iterator[None]:
    """A capture of the container's writable layer, which is reached through its launcher's fd
    (rootfs.open_held_writable): LauncherError, not a missing layer, once that launcher is gone."""
    container._client.check_alive()
    try:
        yield
    except LayerNotFoundError:
        container._client.check_alive()  # it died while we read: say that
        raise


def run_step(cmd: Sequence[str], *, timeout: float | None = None) -> LayerStep:
    """RUN ``cmd`` in a container of the parent image; what it wrote becomes the layer."""
    argv = parse_argv(cmd)
    limit = parse_timeout(timeout)
    line = "RUN " + shlex.join(argv)

    def make(st: Store, parent: ImageRecord) -> str:
        with Sandbox() as sb:
            container = sb.start(list(argv), image=stack_of(st, parent))
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
            settings = sb.runtime.settings
            with launcher_checked(container):
                return commit_upper(
                    st,
                    container.dir,
                    container.spec,
                    uid_base=settings.uid_base,
                    parent=parent,
                    created_by=line,
                    max_bytes=settings.max_layer_size,
                )

    return LayerStep("run", tuple(argv), line, make)
