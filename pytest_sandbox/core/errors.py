"""The one error tree of pytest_sandbox (pure: no imports beyond the stdlib, usable in the launcher).

Every error is a :class:`SandboxError` *and* the builtin a caller would naturally catch
(``ValueError`` for bad input, ``OSError`` for the kernel, ``TimeoutError`` for waits), so
``except ValueError`` keeps working.  ``hint`` tells the user how to fix their host or their call
when that is the cause.  Errors cross the launcher socket as plain dicts (:func:`to_wire` /
:func:`from_wire`), so the class is chosen by name from this module only.
"""

from __future__ import annotations

from typing import Any

# Every error class and the wire helpers (pytest_sandbox.errors, the flat layout's address, re-exports it).
__all__ = [
    "BuildError",
    "CgroupUnavailableError",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "ContainerNotRunningError",
    "ContainerStateError",
    "ImageNotFoundError",
    "InvalidSignalError",
    "InvalidSpecError",
    "LauncherError",
    "LayerError",
    "LayerNotADirectoryError",
    "LayerNotFoundError",
    "LayerPermissionError",
    "LayerTarError",
    "LayerTooLargeError",
    "NetworkError",
    "ReadinessError",
    "RegistryAuthError",
    "RegistryConnectionError",
    "RegistryDigestError",
    "RegistryError",
    "RegistryNotFoundError",
    "RootRequiredError",
    "SandboxError",
    "SandboxTimeoutError",
    "SeccompUnavailableError",
    "SettingsError",
    "SetupError",
    "UserNotFoundError",
    "from_wire",
    "to_wire",
]


class SandboxError(Exception):
    """Base of every error raised by pytest_sandbox."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        # What pytest prints: a message may quote a container's output or a name from its image,
        # so no control character in it reaches the terminal raw (issue 9, item 11).  Imported
        # here: the plugin imports this module at every pytest start (bench/plugin_import.py).
        from .terminal import escape_controls

        return escape_controls(f"{self.message}\n  hint: {self.hint}" if self.hint else self.message)


class InvalidSpecError(SandboxError, ValueError):
    """A value given to run()/start()/Image was wrong; raised before anything is created."""


class SettingsError(InvalidSpecError):
    """A setting (ini key, command-line option or environment variable) has a value of the wrong form.

    ``source`` names where the value came from (``sandbox_uid_base``, ``--sandbox-uid-base``,
    ``PYTEST_SANDBOX_UID_BASE``) and ``expected`` the form it should have; the pytest plugin turns
    this into a ``pytest.UsageError`` (exit code 4).
    """

    def __init__(self, message: str, *, source: str = "", expected: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.source = source
        self.expected = expected


class InvalidSignalError(InvalidSpecError):
    """A signal name or number that does not exist."""


class LayerTarError(InvalidSpecError):
    """A layer tar or image archive was refused: a hostile or malformed entry, or a digest mismatch."""


class LayerError(SandboxError, OSError):
    """A layer directory cannot be used."""

    def __init__(self, message: str, *, errno: int = 0, path: str = "", hint: str = "") -> None:
        SandboxError.__init__(self, message, hint=hint)
        self.errno = errno
        self.filename = path


class LayerNotFoundError(LayerError, FileNotFoundError):
    """A layer directory does not exist."""


class LayerNotADirectoryError(LayerError, NotADirectoryError):
    """A layer path exists but is not a directory."""


class LayerPermissionError(LayerError, PermissionError):
    """A layer directory cannot be read."""


class LayerTooLargeError(LayerError):
    """A captured layer (``commit()``, a build ``run`` step) is over ini ``sandbox_max_layer_size``.

    ``size`` is what was found so far (bytes: the apparent sizes of its files), ``limit`` the
    setting's value; ``errno`` is EFBIG.  Nothing was stored.
    """

    def __init__(
        self, message: str, *, size: int = 0, limit: int = 0, path: str = "", hint: str = ""
    ) -> None:
        super().__init__(message, errno=27, path=path, hint=hint)  # EFBIG
        self.size = size
        self.limit = limit


class ImageNotFoundError(SandboxError, LookupError):
    """The local image store has no image (or layer) by that reference or digest."""


class BuildError(SandboxError, RuntimeError):
    """A build step failed (a ``run`` step's command exited non-zero).  ``result`` holds its Result."""

    def __init__(self, message: str, *, result: Any = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.result = result


class SetupError(SandboxError, OSError):
    """The container could not be set up (Docker's exit status 125): a syscall failed.

    ``call`` names the syscall, ``path`` the path it worked on, ``errno`` the kernel's answer.
    """

    exit_code = 125

    def __init__(
        self, message: str, *, call: str = "", path: str = "", errno: int = 0, hint: str = ""
    ) -> None:
        SandboxError.__init__(self, message, hint=hint)
        self.call = call
        self.errno = errno
        self.filename = path
        self.strerror = message


class CommandNotFoundError(SetupError, FileNotFoundError):
    """The command does not exist in the image (Docker's 127)."""

    exit_code = 127


class CommandNotExecutableError(SetupError, PermissionError):
    """The command exists but cannot be executed (Docker's 126)."""

    exit_code = 126


class RootRequiredError(SetupError, PermissionError):
    """Needs root, and this process is not: making a container or a network, or storing a layer
    (its files are owned by container root, host uid 0).  Rootless mode is not supported yet."""


class UserNotFoundError(SetupError, LookupError):
    """``user=`` names a user or group the image's /etc/passwd or /etc/group does not know."""

    exit_code = 125


class CgroupUnavailableError(SandboxError, OSError):
    """A requested resource limit cannot be applied on this host; never run unlimited instead."""


class SeccompUnavailableError(SandboxError, OSError):
    """A seccomp profile cannot be compiled here (libseccomp is missing); never run unfiltered instead."""


class LauncherError(SandboxError, OSError):
    """The launcher (the per-pytest-process fork server) failed or died."""


class ContainerStateError(SandboxError, RuntimeError):
    """An operation that does not fit the container's state (e.g. exec into an exited container)."""


class ContainerNotRunningError(ContainerStateError):
    """The container has exited or was removed."""


class SandboxTimeoutError(SandboxError, TimeoutError):
    """A run, exec or wait did not finish in time.  ``result`` holds what was captured (if any)."""

    def __init__(self, message: str, *, result: Any = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.result = result


class NetworkError(SandboxError, OSError):
    """A private network could not be made or joined (netlink, namespaces, address pool)."""


class ReadinessError(SandboxTimeoutError):
    """A readiness wait failed: it timed out, or the container exited before it became ready."""


class RegistryError(SandboxError, OSError):
    """A registry (OCI distribution API) request failed.  ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int = 0, hint: str = "") -> None:
        SandboxError.__init__(self, message, hint=hint)
        self.status = status


class RegistryConnectionError(RegistryError, ConnectionError):
    """The registry could not be reached, or spoke a different protocol (http vs https)."""


class RegistryAuthError(RegistryError, PermissionError):
    """The registry refused the credentials (or asked for some and none were configured)."""


class RegistryNotFoundError(RegistryError, FileNotFoundError):
    """The registry does not know the repository, tag, manifest or blob."""


class RegistryDigestError(RegistryError):
    """Content from a registry does not match its digest (or its size): it was rejected, not stored."""


_WIRE_CLASSES: dict[str, type[SandboxError]] = {
    cls.__name__: cls
    for cls in (
        SandboxError,
        InvalidSpecError,
        SetupError,
        CommandNotFoundError,
        CommandNotExecutableError,
        UserNotFoundError,
        CgroupUnavailableError,
        LauncherError,
        ContainerNotRunningError,
        LayerNotFoundError,
        LayerNotADirectoryError,
    )
}


def to_wire(exc: BaseException) -> dict[str, Any]:
    """Describe an exception as a JSON-able dict for the launcher protocol."""
    if isinstance(exc, SandboxError):
        return {
            "type": type(exc).__name__ if type(exc).__name__ in _WIRE_CLASSES else "SandboxError",
            "message": exc.message,
            "hint": exc.hint,
            "call": getattr(exc, "call", ""),
            "path": getattr(exc, "filename", "") or "",
            "errno": getattr(exc, "errno", 0) or 0,
        }
    if isinstance(exc, OSError):
        return {
            "type": "SetupError",
            "message": str(exc),
            "hint": "",
            "call": "",
            "path": str(exc.filename or ""),
            "errno": exc.errno or 0,
        }
    return {"type": "SandboxError", "message": f"{type(exc).__name__}: {exc}", "hint": ""}


def from_wire(data: dict[str, Any]) -> SandboxError:
    """Rebuild the exception described by :func:`to_wire`."""
    cls = _WIRE_CLASSES.get(str(data.get("type")), SandboxError)
    message = str(data.get("message", "unknown error"))
    hint = str(data.get("hint", ""))
    if issubclass(cls, SetupError):
        return cls(
            message,
            call=str(data.get("call", "")),
            path=str(data.get("path", "")),
            errno=int(data.get("errno", 0) or 0),
            hint=hint,
        )
    if issubclass(cls, LayerError):
        return cls(message, path=str(data.get("path", "")), errno=int(data.get("errno", 0) or 0), hint=hint)
    return cls(message, hint=hint)
