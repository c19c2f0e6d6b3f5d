"""What every image import does with its layers: read them with progress, verify, store.

Shared by the OCI layout (:mod:`.ocilayout`) and ``docker save`` (:mod:`.dockerarchive`) readers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.imagemodel import ImageRecord
from .manifest import Readable, layer_created_by
from .store import Store

MAX_JSON = 8 << 20  # an image's JSON documents (index, manifest, config) are read up to this
PROGRESS_STEP = 1 << 20  # a progress callback hears of every MiB read, and of the end
Progress = Callable[[str, int, int], None]
"""``progress(layer, bytes_done, bytes_total)``: ``layer`` is the layer's blob digest (OCI layout),
its diff_id (docker archive) or the archive's name while a gzip archive is decompressed; called
with ``bytes_done == 0`` first, then at least every :data:`PROGRESS_STEP` bytes, and with
``bytes_done == bytes_total`` once it is done (at once for a layer already in the store)."""


class _ProgressReader:
    """Passes reads through, telling ``progress`` how far it got (every PROGRESS_STEP bytes)."""

    def __init__(self, f: Readable, name: str, total: int, progress: Progress) -> None:
        self.f = f
        self.name = name
        self.total = total
        self.progress = progress
        self.done = self.reported = 0
        self.ended = False
        progress(name, 0, total)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.done += len(data)
        if not data:
            self.end()
        elif self.done - self.reported >= PROGRESS_STEP:
            self.reported = self.done
            self.progress(self.name, self.done, self.total)
        return data

    def end(self) -> None:
        """The last call: all of it was read (or it was not needed after all)."""
        if not self.ended:
            self.ended = True
            self.progress(self.name, max(self.done, self.total), self.total)


def with_progress(f: Any, name: str, total: int, progress: Progress | None) -> Any:
    return f if progress is None else _ProgressReader(f, name, total, progress)


@dataclass(frozen=True)
class LayerSource:
    """Where one layer of an image being imported is read from: ``open()`` gives its bytes."""

    name: str  # what progress calls it: the blob digest (layout) or the diff_id (docker archive)
    size: int
    open: Callable[[], contextlib.AbstractContextManager[Readable]]


def store_layers(
    store: Store, record: ImageRecord, layers: Sequence[LayerSource], progress: Progress | None
) -> None:
    """Store each layer the store does not have yet, verified against the record's diff_id.

    A layer refused after earlier ones were stored leaves those, verified, in the store
    unreferenced (until :meth:`Store.prune`).
    """
    created_by = layer_created_by(record)
    parent: str | None = None
    for i, (layer, diff_id) in enumerate(zip(layers, record.layers, strict=True)):
        if store.has_layer(diff_id):
            if progress is not None:
                progress(layer.name, layer.size, layer.size)
        else:
            with layer.open() as raw:
                reader = with_progress(raw, layer.name, layer.size, progress)
                store.add_layer_tar(reader, expected_diff_id=diff_id, created_by=created_by[i], parent=parent)
                if progress is not None:
                    reader.end()
        parent = diff_id
