"""The local image store: content-addressed layers, image records, tags, a build cache.

Layout under ``root`` (``<data_root>/store``; the data root is ini ``sandbox_data_root``, env
``PYTEST_SANDBOX_DATA_ROOT``, default ``~/.cache/pytest-sandbox``)::

    layers/sha256/<hex>/diff/        the layer, an overlay-format directory (an overlay lower)
    layers/sha256/<hex>/meta.json    {digest, parent, created, created_by, size}
    images/sha256/<hex>.json         an image record; the image id is sha256 of this file
    refs.json                        {"name:tag": "sha256:<image id>"}, many tags per image
    cache/dirs/<key>.json            stat snapshot of a directory -> its layer / content digest
    cache/build/<key>                build cache: (parent image, step, inputs) -> image id
    locks/<key>.lock                 per-key locks (a layer being imported, a step being built)
    lock                             the store-wide lock (refs.json, prune)
    tmp/psbx-<pid>-<start>/...       work in progress (layers, files being written), swept once
                                     its owner process is dead -- never while it lives

The root is 0700: layers hold setuid programs owned by (container) root (see
:func:`~pytest_sandbox.host.fstree.make_private`).

A layer's digest is its ``diff_id``: sha256 of the deterministic uncompressed tar
(:mod:`pytest_sandbox.images.layertar`) of the directory.  Ownership in layers is numeric and relative
to the container (uid 0 = container root; lower layers are idmapped when mounted).

Every write is made in the writer's ``tmp/`` directory and renamed into place, so a reader never
sees half a layer or half a record, and a writer killed midway leaves only what the next sweep
removes; a lock file per key (package ``filelock``) makes two xdist workers that ask for
the same layer (stored from a directory or pulled) or build step do the work once -- the second
waits, then finds it done.

Reusing an unchanged directory reads no file contents: its digest is cached against a *stat
snapshot* (every entry's name, inode, mode, size, mtime and ctime; any write, chmod, chown,
xattr change, rename or link changes a ctime or a directory's mtime).  That costs one lstat per
entry: ~25 ms for 10,000 files on a VM where lstat takes ~1.5 us (bench/store.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from ..config import Settings
from ..core import naming
from ..core.errors import (
    ImageNotFoundError,
    InvalidSpecError,
    LayerNotFoundError,
    LayerTarError,
)
from ..core.imagemodel import ImageRecord, LayerInfo, StoredImage, canonical_json, now_rfc3339, sha256_digest
from ..core.reference import Reference, is_digest, parse_digest, parse_reference
from ..host.cleanup import remove_tree

# The tree walks live with the host's filesystem code; re-exported (build steps copy with them).
from ..host.fstree import (
    OVERFLOW_ID,
    IdMap,
    check_dir,
    copy_file_at,
    copy_tree,
    make_private,
    root_needed_for_others_files,
    shift_ids,
    stat_snapshot,
    write_atomic,
)

# The records live in the pure core (the store, the archives and Image share them); the store
# re-exports them as its vocabulary.
from .snapcache import SnapshotCache

if TYPE_CHECKING:
    from filelock import FileLock

__all__ = [
    "OVERFLOW_ID",
    "IdMap",
    "ImageRecord",
    "LayerInfo",
    "Store",
    "StoredImage",
    "copy_file_at",
    "copy_tree",
    "now_rfc3339",
    "shift_ids",
    "stat_snapshot",
    "write_atomic",
]


# -- the store -----------------------------------------------------------------------------


class Store:
    """A local image store at ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        raw = os.fspath(root)
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise InvalidSpecError(f"store root {root!r}: expected a directory path")
        self.root = os.path.realpath(os.path.abspath(raw))
        self._ready = False
        self._owner_dir: tuple[int, str] | None = None
        self._snapshots = SnapshotCache(self._p("cache", "dirs"), self._write_atomic)

    @classmethod
    def default(cls, settings: Settings | None = None) -> Store:
        """The store under the settings' data root (default: the environment's, else ~/.cache)."""
        return cls((settings or Settings.from_env()).store_root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # -- paths and locks ---------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _ensure(self) -> None:
        if self._ready:
            return
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        make_private(self.root)
        for sub in ("layers/sha256", "images/sha256", "cache/dirs", "cache/build", "locks"):
            os.makedirs(self._p(sub), exist_ok=True)
        os.makedirs(self._p("tmp"), mode=0o700, exist_ok=True)
        self._sweep_tmp()
        self._ready = True

    def _sweep_tmp(self) -> None:
        for name in os.listdir(self._p("tmp")):
            if naming.parse_owner_tag(name) and not naming.owner_alive(name):
                with contextlib.suppress(OSError):
                    remove_tree(self._p("tmp", name))

    def _lock(self, key: str | None = None) -> FileLock:
        self._ensure()
        path = (
            self._p("lock") if key is None else self._p("locks", sha256_digest(key.encode())[7:39] + ".lock")
        )
        # Imported on first use, as hostbase and ipam do: `import pytest_sandbox` needs only the
        # stdlib (a non-root caller gets its clear SetupError even where filelock is missing).
        from filelock import FileLock

        return FileLock(path)

    def _owner_tmp(self) -> str:
        """``tmp/psbx-<pid>-<start>/``: this process's work in progress, swept once it is dead."""
        self._ensure()
        pid = os.getpid()
        # A forked child is another owner; a refused store removed it (root_needed_for_others_files).
        if self._owner_dir is None or self._owner_dir[0] != pid or not os.path.isdir(self._owner_dir[1]):
            path = self._p("tmp", naming.owner_tag(pid))
            os.makedirs(path, mode=0o700, exist_ok=True)
            self._owner_dir = (pid, path)
        return self._owner_dir[1]

    @contextlib.contextmanager
    def tempdir(self) -> Iterator[str]:
        """A fresh directory in the store's tmp/ (same filesystem as the store); removed on exit.
        Without root, someone else's files cannot be stored: nothing is left of the attempt."""
        path = tempfile.mkdtemp(dir=self._owner_tmp())
        try:
            with root_needed_for_others_files("storing a layer", tmp=path):
                yield path
        finally:
            remove_tree(path)

    def _write_atomic(self, path: str, data: bytes) -> None:
        # The temporary file goes in this process's owner directory, not loose in tmp/: if the
        # process dies before the rename, the next store user's sweep finds and removes it.
        write_atomic(path, data, tmp_dir=self._owner_tmp())

    # -- layers ------------------------------------------------------------------------------

    def _layer_dir(self, digest: str) -> str:
        return self._p("layers", "sha256", parse_digest(digest, what="layer")[7:])

    def layer_path(self, digest: str) -> str:
        """The layer's diff directory (an overlay lower)."""
        return os.path.join(self._layer_dir(digest), "diff")

    def has_layer(self, digest: str) -> bool:
        return os.path.isfile(os.path.join(self._layer_dir(digest), "meta.json"))

    def layer_info(self, digest: str) -> LayerInfo:
        try:
            with open(os.path.join(self._layer_dir(digest), "meta.json"), "rb") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise ImageNotFoundError(f"layer {digest} is not in the store at {self.root}") from None
        return LayerInfo(
            digest=digest,
            path=self.layer_path(digest),
            parent=meta.get("parent") or None,
            created=str(meta.get("created") or ""),
            created_by=str(meta.get("created_by") or ""),
            size=int(meta.get("size") or 0),
            tar_digest=str(meta.get("tar_digest") or digest),
        )

    def tar_digest(self, digest: str) -> str:
        """The diff_id of the tar :meth:`open_layer_tar` writes for a layer: ``digest`` itself,
        unless the layer was imported from a tar written by another tool (skopeo, umoci, docker,
        a registry), whose bytes -- entry order, headers -- our deterministic writer does not
        reproduce.  Exports and pushes list these digests in the image config."""
        return self.layer_info(digest).tar_digest

    def layer_digest_of(self, path: str) -> str | None:
        """The digest if ``path`` is one of this store's layer directories (checked by path)."""
        real = os.path.realpath(path)
        parent, diff = os.path.split(real)
        hexpart = os.path.basename(parent)
        digest = "sha256:" + hexpart
        if (
            diff == "diff"
            and os.path.dirname(parent) == os.path.realpath(self._p("layers", "sha256"))
            and is_digest(digest)
        ):
            return digest if self.has_layer(digest) else None
        return None

    def add_prepared_layer(self, tmp: str, *, created_by: str = "", parent: str | None = None) -> LayerInfo:
        """Move ``tmp/diff`` (an overlay-format tree made in :meth:`tempdir`) into the store."""
        from .layertar import digest_dir

        ld = digest_dir(os.path.join(tmp, "diff"))
        return self._install_layer(tmp, ld.diff_id, ld.size, created_by=created_by, parent=parent)

    def _install_layer(
        self,
        tmp: str,
        digest: str,
        size: int,
        *,
        created_by: str,
        parent: str | None,
        tar_digest: str | None = None,
    ) -> LayerInfo:
        if parent is not None:
            parse_digest(parent, what="parent layer")
        final = self._layer_dir(digest)
        if not self.has_layer(digest):
            meta = {
                "digest": digest,
                "parent": parent,
                "created": now_rfc3339(),
                "created_by": created_by,
                "size": size,
            }
            if tar_digest is not None and tar_digest != digest:
                meta["tar_digest"] = tar_digest
            with open(os.path.join(tmp, "meta.json"), "wb") as f:
                f.write(canonical_json(meta))
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)  # tempdir()'s cleanup then finds nothing to remove
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # another worker installed the same content first: ours is removed with tmp
        return self.layer_info(digest)

    def add_layer_dir(
        self, src_dir: str | os.PathLike[str], *, created_by: str = "", parent: str | None = None
    ) -> LayerInfo:
        """Store a copy of ``src_dir`` as a layer; an unchanged directory is a hit reading no contents."""
        src = check_dir(src_dir, "layer")
        own = self.layer_digest_of(src)
        if own is not None:
            return self.layer_info(own)
        self._ensure()
        key = "dir\0" + src
        snap = stat_snapshot(src)
        hit = self._snapshots.get(key, snap)
        if hit is not None and self.has_layer(hit):
            return self.layer_info(hit)
        with self._lock(key):
            hit = self._snapshots.get(key, snap)
            if hit is not None and self.has_layer(hit):
                return self.layer_info(hit)
            with self.tempdir() as tmp:
                copy_tree(src, os.path.join(tmp, "diff"))
                after = stat_snapshot(src)
                info = self.add_prepared_layer(
                    tmp, created_by=created_by or f"layer from {src}", parent=parent
                )
            if after == snap:  # unchanged while we copied: the snapshot names this content
                self._snapshots.put(key, snap, info.digest)
            return info

    def content_digest(self, path: str | os.PathLike[str], *, fd: int | None = None) -> str:
        """A digest of a file's or directory's content (what a COPY step's cache key holds).

        Cached on a stat snapshot like :meth:`add_layer_dir`: an unchanged source is not re-read.
        ``fd``: ``path`` (canonical) opened and checked already (``O_PATH`` will do): that very
        object is stat'ed and read, not whatever the path names by then.
        """
        raw = os.fspath(path)
        if fd is not None:
            real, st = raw, os.fstat(fd)
        else:
            real = os.path.realpath(raw)
            try:
                st = os.stat(real)
            except FileNotFoundError:
                raise LayerNotFoundError(f"{raw!r} does not exist", path=raw, errno=errno.ENOENT) from None
        self._ensure()
        return self._snapshots.content_digest(raw, real, st, fd)

    def add_layer_tar(
        self,
        stream: BinaryIO | IO[bytes],
        *,
        expected_diff_id: str | None = None,
        created_by: str = "",
        parent: str | None = None,
    ) -> LayerInfo:
        """Extract a layer tar (gzip or plain; hostile entries refused) and store it, verified."""
        if expected_diff_id is None:
            return self._extract_layer(stream, None, created_by=created_by, parent=parent)
        parse_digest(expected_diff_id, what="expected_diff_id")
        if self.has_layer(expected_diff_id):
            return self.layer_info(expected_diff_id)
        # Two workers pulling the same layer: the second waits here, then finds it stored.
        with self._lock("layer\0" + expected_diff_id):
            if self.has_layer(expected_diff_id):
                return self.layer_info(expected_diff_id)
            return self._extract_layer(stream, expected_diff_id, created_by=created_by, parent=parent)

    def _extract_layer(
        self, stream: BinaryIO | IO[bytes], expected: str | None, *, created_by: str, parent: str | None
    ) -> LayerInfo:
        from .layertar import digest_dir, extract_layer_tar

        with self.tempdir() as tmp:
            diff = os.path.join(tmp, "diff")
            os.mkdir(diff, 0o755)
            got = extract_layer_tar(stream, diff)  # type: ignore[arg-type]
            if expected is not None and got.diff_id != expected:
                raise LayerTarError(
                    f"layer digest mismatch: expected {expected}, the content is {got.diff_id}; not stored"
                )
            # What our writer makes of it, for export and push (see tar_digest): computed now, so
            # that open_layer_tar can still tell a modified store from a foreign tar.
            ours = digest_dir(diff).diff_id
            return self._install_layer(
                tmp, got.diff_id, got.size, created_by=created_by, parent=parent, tar_digest=ours
            )

    def open_layer_tar(self, digest: str) -> BinaryIO:
        """The layer as its deterministic uncompressed tar (whose sha256 is :meth:`tar_digest`), rewound."""
        from .layertar import write_layer_tar

        if not self.has_layer(digest):
            raise ImageNotFoundError(f"layer {digest} is not in the store at {self.root}")
        self._ensure()
        expected = self.tar_digest(digest)
        out = tempfile.TemporaryFile(dir=self._p("tmp"))  # noqa: SIM115 -- returned open
        try:
            got = write_layer_tar(self.layer_path(digest), out)
            if got.diff_id != expected:
                raise LayerTarError(
                    f"stored layer {digest} now hashes to {got.diff_id}: the store was modified",
                    hint=f"remove {self._layer_dir(digest)} and import or build the image again",
                )
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out

    # -- images ------------------------------------------------------------------------------

    def _image_path(self, image_id: str) -> str:
        return self._p("images", "sha256", parse_digest(image_id, what="image id")[7:] + ".json")

    def put_image(self, record: ImageRecord) -> str:
        """Store ``record`` (its layers must be in the store); its image id."""
        missing = [d for d in record.layers if not self.has_layer(d)]
        if missing:
            raise ImageNotFoundError(
                f"image record names layers that are not in the store: {', '.join(missing)}"
            )
        image_id = record.id
        path = self._image_path(image_id)
        if not os.path.exists(path):
            self._write_atomic(path, record.encode())
        return image_id

    def get_image(self, image_id: str) -> ImageRecord:
        path = self._image_path(image_id)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ImageNotFoundError(f"image {image_id} is not in the store at {self.root}") from None
        if sha256_digest(data) != image_id:
            raise ImageNotFoundError(
                f"image record {image_id} is corrupt (its content does not match its id)",
                hint=f"remove {path} and tag, build or pull the image again",
            )
        return ImageRecord.from_json(json.loads(data))

    def has_image(self, image_id: str) -> bool:
        return os.path.isfile(self._image_path(image_id))

    def _read_refs(self) -> dict[str, str]:
        try:
            with open(self._p("refs.json"), "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _write_refs(self, refs: Mapping[str, str]) -> None:
        self._write_atomic(self._p("refs.json"), json.dumps(dict(sorted(refs.items())), indent=1).encode())

    @staticmethod
    def check_tag(ref: str | Reference) -> str:
        """``ref`` normalised (``name`` -> ``name:latest``) if it can be a tag; InvalidSpecError if not."""
        parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
        if parsed.digest:
            raise InvalidSpecError(f"{ref!s}: a tag cannot carry a digest; give name[:tag]")
        return str(parsed)

    def tag(self, ref: str | Reference, image_id: str) -> str:
        """Point ``ref`` (``name[:tag]``) at the image; the normalised reference."""
        name = self.check_tag(ref)
        parse_digest(image_id, what="image id")
        if not self.has_image(image_id):
            raise ImageNotFoundError(f"image {image_id} is not in the store at {self.root}")
        with self._lock():
            # Again under the lock: remove() and prune() delete records under it, and a tag
            # written after that would name nothing.
            if not self.has_image(image_id):
                raise ImageNotFoundError(f"image {image_id} was removed from the store at {self.root}")
            refs = self._read_refs()
            if refs.get(name) != image_id:
                refs[name] = image_id
                self._write_refs(refs)
        return name

    def resolve_id(self, ref: str | Reference) -> str:
        """The image id ``ref`` names: a tag, ``name@sha256:<id>`` or ``sha256:<id>``."""
        if isinstance(ref, str) and ref.startswith("sha256:"):
            image_id = parse_digest(ref, what="image id")
        else:
            parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
            if parsed.digest:
                image_id = parsed.digest
            else:
                found = self._read_refs().get(str(parsed))
                if found is None:
                    raise ImageNotFoundError(
                        f"no image {str(parsed)!r} in the store at {self.root}",
                        hint="pull it (pytest-sandbox pull REF), import it, or build and tag it",
                    )
                image_id = found
        if not self.has_image(image_id):
            raise ImageNotFoundError(f"image {image_id} is not in the store at {self.root}")
        return image_id

    def resolve(self, ref: str | Reference) -> ImageRecord:
        return self.get_image(self.resolve_id(ref))

    def refs(self) -> dict[str, str]:
        """Every tag and the image id it names."""
        return self._read_refs()

    def images(self) -> list[StoredImage]:
        """Every image record in the store (tagged ones with their tags), newest first."""
        if not os.path.isdir(self._p("images", "sha256")):
            return []
        by_id: dict[str, list[str]] = {}
        for name, image_id in self._read_refs().items():
            by_id.setdefault(image_id, []).append(name)
        out = []
        for fname in os.listdir(self._p("images", "sha256")):
            image_id = "sha256:" + fname.removesuffix(".json")
            if not fname.endswith(".json") or not is_digest(image_id):
                continue
            with contextlib.suppress(ImageNotFoundError):
                out.append(
                    StoredImage(image_id, self.get_image(image_id), tuple(sorted(by_id.get(image_id, ()))))
                )
        out.sort(key=lambda s: (s.record.created, s.id), reverse=True)
        return out

    def untag(self, ref: str | Reference) -> str:
        """Remove the tag ``ref``; the image id it named."""
        name = self.check_tag(ref)
        with self._lock():
            refs = self._read_refs()
            if name not in refs:
                raise ImageNotFoundError(f"no image {name!r} in the store at {self.root}")
            image_id = refs.pop(name)
            self._write_refs(refs)
        return image_id

    def remove(self, ref: str | Reference) -> list[str]:
        """``rmi``: untag ``ref``; the image record goes with its last tag (layers go at prune).

        ``sha256:<id>`` removes every tag of that image and the record.  The removed tags.
        """
        by_id = isinstance(ref, str) and ref.startswith("sha256:")
        # Both checked before the lock, which creates the store: bad input creates nothing.
        name = parse_digest(ref, what="image id") if by_id else self.check_tag(ref)
        with self._lock():
            refs = self._read_refs()
            if by_id:
                image_id = name
                if not self.has_image(image_id):
                    raise ImageNotFoundError(f"image {image_id} is not in the store at {self.root}")
                removed = [n for n, i in refs.items() if i == image_id]
            else:
                if name not in refs:
                    raise ImageNotFoundError(f"no image {name!r} in the store at {self.root}")
                image_id, removed = refs[name], [name]
            for n in removed:
                del refs[n]
            self._write_refs(refs)
            if image_id not in refs.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._image_path(image_id))
        return removed

    def prune(self) -> list[str]:
        """Remove untagged images (but not ancestors of tagged ones), then unreferenced layers.

        Returns the digests of the removed layers.  Layers in use by a running container of an
        untagged image are removed too: prune between test runs, not during one.
        """
        self._ensure()
        removed: list[str] = []
        with self._lock():
            refs = self._read_refs()
            records = {s.id: s.record for s in self.images()}
            keep: set[str] = set()
            todo = [i for i in refs.values() if i in records]
            while todo:
                image_id = todo.pop()
                if image_id in keep:
                    continue
                keep.add(image_id)
                parent = records[image_id].parent
                if parent is not None and parent in records:
                    todo.append(parent)
            for image_id in set(records) - keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._image_path(image_id))
            build = self._p("cache", "build")
            for fname in os.listdir(build):
                with contextlib.suppress(OSError), open(os.path.join(build, fname)) as f:
                    target = f.read().strip()
                if target not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(build, fname))
            used = {d for i in keep for d in records[i].layers}
            for hexname in os.listdir(self._p("layers", "sha256")):
                digest = "sha256:" + hexname
                if not is_digest(digest) or digest in used:
                    continue
                with self.tempdir() as tmp:
                    os.rename(self._layer_dir(digest), os.path.join(tmp, "gone"))
                removed.append(digest)
        return sorted(removed)

    # -- build cache -------------------------------------------------------------------------

    @staticmethod
    def build_key(parent: str, step: str, inputs: Sequence[Any]) -> str:
        return sha256_digest(canonical_json([parent, step, list(inputs)]))[7:]

    def _build_path(self, key: str) -> str:
        return self._p("cache", "build", key)

    def build_cache_get(self, key: str) -> str | None:
        try:
            with open(self._build_path(key)) as f:
                image_id = f.read().strip()
        except FileNotFoundError:
            return None
        return image_id if is_digest(image_id) and self.has_image(image_id) else None

    def build_cache_put(self, key: str, image_id: str) -> None:
        self._write_atomic(self._build_path(key), image_id.encode())

    def build_lock(self, key: str) -> FileLock:
        return self._lock("build\0" + key)
