"""The embedded default base image: the host itself, read-only, with a minimal generated /etc.

A container on the host base sees the host's ``/usr`` (and ``/bin``, ``/lib*`` where the host is
not usr-merged) -- so ``python3``, ``redis-server`` or ``postgres`` installed on the host run with
no download -- but not ``/home``, ``/root``, ``/var``, ``/tmp`` or the host's secrets.

The base is two things:

- a *skeleton* layer, generated once per host state into the data root: the usr-merge symlinks,
  empty mount points, a fresh ``/var``, and ``/etc`` made of an allow-list of the host's
  configuration (passwd and group, the dynamic linker's cache, alternatives, CA certificates,
  locale and time zone...); never ``shadow``, ssh host keys or ``ssl/private``;
- the host's system directories, each stacked as the lowest layer of its own overlay mounted at
  that path, so image layers can still add to ``/usr`` and the container can write there (into its
  own upper layer) while the host's files stay untouched.

The skeleton's directory name is the digest of everything copied into it, so a change on the host
(a new user in /etc/passwd, a new CA) yields a new skeleton; building it is atomic (temp dir +
rename, under a file lock) so xdist workers build it once.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

# Top-level host directories that make up "the host's programs and libraries".
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

# /etc entries copied into the skeleton: what programs need to start and behave like on the host,
# nothing that holds secrets (so no pam.d/security: security/opasswd keeps old password hashes).
# Directories are copied whole, minus EXCLUDED; names may be glob patterns.
ETC_ALLOW = (
    "passwd",
    "group",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "protocols",
    "services",
    "networks",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "locale.alias",
    "locale.conf",
    "default/locale",
    "os-release",
    "debian_version",
    "lsb-release",
    "issue",
    "mime.types",
    "mailcap",
    "magic",
    "magic.mime",
    "profile",
    "profile.d",
    "bash.bashrc",
    "inputrc",
    "shells",
    "login.defs",
    "python3*",
    "perl",
    "bindresvport.blacklist",
    "xattr.conf",
    "mke2fs.conf",
    "terminfo",
    "manpath.config",
    "selinux/config",
)
EXCLUDED = ("ssl/private",)
_MAX_FILE = 8 << 20


@dataclass(frozen=True)
class HostLayout:
    """Which host top-level entries are real directories (stacked) and which are symlinks (copied)."""

    dirs: tuple[str, ...]
    links: tuple[tuple[str, str], ...]


def host_layout(root: str = "/") -> HostLayout:
    dirs, links = [], []
    for name in SYSTEM_DIRS:
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            links.append((name, os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            dirs.append(name)
    return HostLayout(tuple(dirs), tuple(links))


def _allowed_names(etc: str) -> list[str]:
    names: list[str] = []
    for pattern in ETC_ALLOW:
        if any(c in pattern for c in "*?["):
            names.extend(sorted(os.path.relpath(p, etc) for p in glob.glob(os.path.join(etc, pattern))))
        else:
            names.append(pattern)
    return list(dict.fromkeys(names))


def _etc_entries(etc: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every allowed /etc entry, recursively, in a stable order."""
    for name in _allowed_names(etc):
        top = os.path.join(etc, name)
        try:
            st = os.lstat(top)
        except OSError:
            continue
        yield name, st
        if stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(top):
                rel_dir = os.path.relpath(dirpath, etc)
                dirnames[:] = sorted(d for d in dirnames if os.path.join(rel_dir, d) not in EXCLUDED)
                for entry in sorted(dirnames + filenames):
                    rel = os.path.join(rel_dir, entry)
                    try:
                        yield rel, os.lstat(os.path.join(etc, rel))
                    except OSError:
                        continue


def fingerprint(layout: HostLayout, etc: str = "/etc") -> str:
    """Digest of everything the skeleton would contain; names the skeleton's directory."""
    h = hashlib.sha256(b"psbx-hostbase-v2\0")  # bump when what is copied changes
    h.update(repr(layout).encode())
    for rel, st in _etc_entries(etc):
        h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0".encode())
        path = os.path.join(etc, rel)
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(path).encode())
        elif stat.S_ISREG(st.st_mode) and st.st_size <= _MAX_FILE:
            # size + mtime stand for the content: hashing every byte of /etc/ssl at each session
            # start would cost more than the whole container start.
            h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def build_skeleton(dest: str, layout: HostLayout, etc: str = "/etc") -> None:
    """Write the skeleton into the empty directory ``dest``."""
    for name in layout.dirs:
        os.mkdir(os.path.join(dest, name), 0o755)
    for name, target in layout.links:
        os.symlink(target, os.path.join(dest, name))
    for d, mode in (
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("run", 0o755),
        ("run/lock", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/cache", 0o755),
        ("var/spool", 0o755),
        ("var/mail", 0o2775),
        ("root", 0o700),
        ("home", 0o755),
        ("mnt", 0o755),
        ("media", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
        ("etc", 0o755),
    ):
        path = os.path.join(dest, d)
        os.mkdir(path)
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask; these must be exact
    os.symlink("../run", os.path.join(dest, "var/run"))
    os.symlink("../run/lock", os.path.join(dest, "var/lock"))
    for rel, st in _etc_entries(etc):
        src, dst = os.path.join(etc, rel), os.path.join(dest, "etc", rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISDIR(st.st_mode):
            os.makedirs(dst, exist_ok=True)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode) and st.st_size <= _MAX_FILE:
            shutil.copy2(src, dst, follow_symlinks=False)
        else:
            continue
        os.lchown(dst, st.st_uid, st.st_gid)


def ensure_skeleton(data_root: str) -> tuple[str, HostLayout]:
    """The skeleton for the host as it is now; built once, shared by every worker and session."""
    from filelock import FileLock

    layout = host_layout()
    digest = fingerprint(layout)
    # Canonical: containers mount it as a layer, and a layer path must hold no symlink (rootfs).
    base_dir = os.path.join(os.path.realpath(data_root), "base")
    final = os.path.join(base_dir, f"host-{digest}")
    if os.path.isdir(final):
        return final, layout
    os.makedirs(base_dir, exist_ok=True)
    with FileLock(os.path.join(base_dir, f".host-{digest}.lock")):
        if os.path.isdir(final):
            return final, layout
        tmp = tempfile.mkdtemp(prefix=f".host-{digest}.", dir=base_dir)
        try:
            os.chmod(tmp, 0o755)
            build_skeleton(tmp, layout)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, layout
