"""Deleting a container's state directory, whatever the container left in it (stdlib only).

A container's upper layer holds what its processes wrote: directories nested thousands deep,
mode 000 directories, files of 65,536 different owners, fifos, sockets.  ``shutil.rmtree``
recurses once per level and raised RecursionError at ~1,000 levels before Python 3.12.4 -- which
killed the launcher's cleaner and then the launcher.  This walk is iterative and fd-based: it
holds one directory fd at a time, climbs back with ``..`` (the tree is no longer anyone's: the
container is gone, nothing renames under us), never follows a symlink, and keeps only a stack of
names, so depth costs neither recursion nor fds nor PATH_MAX.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> None:
    """Delete ``path`` and everything below it; a missing path is not an error.

    Raises OSError (naming the entry) for what cannot be deleted even by root, e.g. an immutable
    file -- which a container cannot create (CAP_LINUX_IMMUTABLE in the host's namespace).
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):  # ELOOP: a symlink (O_NOFOLLOW)
            raise
        os.unlink(path)
        return
    _empty_dir(fd)
    os.rmdir(path)


def remove_tree_at(dir_fd: int, name: str | bytes) -> None:
    """Delete the directory ``name`` of ``dir_fd`` and everything below it (it must exist and
    be a directory, not a symlink to one)."""
    _empty_dir(os.open(name, _DIR_FLAGS, dir_fd=dir_fd))
    os.rmdir(name, dir_fd=dir_fd)


def _empty_dir(fd: int) -> None:
    """Delete everything in the directory open as ``fd``, then close it."""
    names: list[str] = []  # the directories we are inside, below the one we started in
    try:
        while True:
            child = _empty_or_first_subdir(fd)
            if child is not None:
                sub = os.open(child, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
                names.append(child)
                continue
            if not names:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)


def _empty_or_first_subdir(fd: int) -> str | None:
    """Unlink every non-directory in ``fd``'s directory; the name of a subdirectory, if any."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                is_dir = stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
            if is_dir:
                return entry.name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=fd)
    return None
