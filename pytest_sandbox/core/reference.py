"""Image references and digests, parsed strictly before any filesystem or network access (pure).

The grammar is the distribution project's (``reference/regexp.go``)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] path-component ["/" path-component]*
    domain     := host [":" port]          (first component with a "." or ":", or "localhost")
    path-component := [a-z0-9]+ (([_.]|__|-+) [a-z0-9]+)*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex digits   (the only algorithm we store)

So ``../x``, ``sha256:../../x``, ``a//b``, ``UPPER`` and the empty string are refused with
:class:`InvalidSpecError` (identifiers are checked before they become paths).  ``str(ref)`` is the
normal form: ``name`` becomes ``name:latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidSpecError

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[_.]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?"
_TAG = r"[\w][\w.-]{0,127}"
_HEX64 = r"[0-9a-f]{64}"

PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
TAG_RE = re.compile(_TAG, re.ASCII)
DIGEST_RE = re.compile(rf"sha256:{_HEX64}", re.ASCII)
NAME_MAX = 255  # the distribution spec's limit on a repository name (domain included)


@dataclass(frozen=True)
class Reference:
    """``[registry/]repository[:tag][@digest]``; ``tag`` is None when not given (read: "latest")."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` (or just the repository): the repository's full name."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    @property
    def effective_tag(self) -> str | None:
        """The tag, ``latest`` when neither a tag nor a digest was given."""
        return self.tag if self.tag is not None or self.digest else "latest"

    @property
    def ident(self) -> str:
        """What a registry's manifest URL takes: the digest if there is one, else the tag."""
        return self.digest or self.effective_tag or "latest"

    def __str__(self) -> str:
        tag = self.effective_tag
        return self.name + (f":{tag}" if tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_digest(value: object, *, what: str = "digest") -> str:
    """``sha256:<64 lowercase hex>`` or InvalidSpecError: digests become file names in the store."""
    if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
        raise InvalidSpecError(
            f"{what}={value!r}: expected 'sha256:' followed by 64 lowercase hexadecimal digits"
        )
    return value


def is_digest(value: str) -> bool:
    return DIGEST_RE.fullmatch(value) is not None


def parse_reference(value: object) -> Reference:
    """Parse ``[registry-host[:port]/]name[:tag][@sha256:...]`` strictly; InvalidSpecError if not."""
    if not isinstance(value, str) or not value:
        raise InvalidSpecError(
            f"reference {value!r}: expected e.g. 'app:1', 'user/app:1' or 'host:5000/app:1'"
        )
    if len(value) > 512 or not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidSpecError(
            f"reference {value!r}: too long, or contains whitespace or non-ASCII characters"
        )
    rest, digest = value, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        parse_digest(digest, what=f"reference {value!r}: digest")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not TAG_RE.fullmatch(tag):
            raise InvalidSpecError(
                f"reference {value!r}: tag {tag!r} is not valid (letters, digits, '_', '.', '-'; "
                "at most 128; not starting with '.' or '-')"
            )
    registry = None
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        if not DOMAIN_RE.fullmatch(first):
            raise InvalidSpecError(f"reference {value!r}: registry host {first!r} is not a valid host[:port]")
        registry, rest = first, remainder
    if not PATH_RE.fullmatch(rest):
        raise InvalidSpecError(
            f"reference {value!r}: repository {rest!r} is not valid (lowercase letters and digits, "
            "separated by '.', '_', '__', '-' or '/')",
            hint="names are lowercase, e.g. 'user/app:1.0'",
        )
    if len(rest) + (len(registry) + 1 if registry else 0) > NAME_MAX:
        raise InvalidSpecError(f"reference {value!r}: the name is longer than {NAME_MAX} characters")
    return Reference(registry, rest, tag, digest)
