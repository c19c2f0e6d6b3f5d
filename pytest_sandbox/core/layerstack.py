"""What a container's root filesystem is made of: the layers value (pure, stdlib only).

A :class:`LayerStack` is the part of an image that starting a container needs -- the ordered
layer directories, whether the host base is under them, and the image's config -- and nothing
of the store, tags or build steps.  The composition modules that start containers
(:mod:`pytest_sandbox.sandbox`, :mod:`pytest_sandbox.container`, :mod:`pytest_sandbox.runtime`)
take this value; :class:`pytest_sandbox.Image` produces it (:meth:`ImageLike.layer_stack`), so
they never import the image facade and the facade can build on them (``image.run([...])``
starts a container) without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .imagemodel import ImageConfig


@dataclass(frozen=True)
class LayerStack:
    """Read-only layer directories (absolute, lowest first), on the host base unless ``host=False``.

    The default value is the host base alone (what a container runs on when no image is given).
    """

    layers: tuple[str, ...] = ()
    host: bool = True
    config: ImageConfig = field(default_factory=ImageConfig)

    def layer_stack(self) -> LayerStack:
        """Itself: a stack can be given wherever an image can (see :class:`ImageLike`)."""
        return self


@runtime_checkable
class ImageLike(Protocol):
    """What ``sandbox.run(image=...)`` accepts: an :class:`pytest_sandbox.Image`, or a LayerStack."""

    def layer_stack(self) -> LayerStack: ...
