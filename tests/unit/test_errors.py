"""The error tree: each typed error is also the builtin callers catch, keeps Docker's exit codes,
shows its hint, and survives the launcher protocol's wire form intact; a closed handle refuses work."""

from __future__ import annotations

import pytest

from pytest_sandbox import (
    CommandNotExecutableError,
    CommandNotFoundError,
    InvalidSpecError,
    LayerNotADirectoryError,
    LayerNotFoundError,
    Sandbox,
    SandboxError,
    UserNotFoundError,
)
from pytest_sandbox.core.errors import CgroupUnavailableError, LauncherError, SetupError, from_wire, to_wire


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (InvalidSpecError("x"), ValueError),
        (LayerNotFoundError("x", path="/l", errno=2), FileNotFoundError),
        (LayerNotADirectoryError("x", path="/l", errno=20), NotADirectoryError),
        (CommandNotFoundError("x", call="execve", path="/p", errno=2), FileNotFoundError),
        (CommandNotExecutableError("x", call="execve", path="/p", errno=13), PermissionError),
        (UserNotFoundError("x", path="/etc/passwd", errno=2), LookupError),
        (CgroupUnavailableError("x", hint="delegate it"), OSError),
        (LauncherError("x"), OSError),
    ],
)
def test_errors_are_builtins_and_cross_the_wire(error: SandboxError, builtin: type[Exception]) -> None:
    """Each error is also the builtin callers catch, and survives the launcher protocol intact."""
    assert isinstance(error, builtin)
    assert isinstance(error, SandboxError)
    back = from_wire(to_wire(error))
    assert type(back) is type(error)
    assert back.message == error.message
    assert back.hint == error.hint
    assert getattr(back, "filename", None) == getattr(error, "filename", None)


def test_exit_code_conventions() -> None:
    """Docker's conventions: 125 setup failed, 126 not executable, 127 not found."""
    assert SetupError("x").exit_code == 125
    assert CommandNotExecutableError("x").exit_code == 126
    assert CommandNotFoundError("x").exit_code == 127


def test_hint_is_shown() -> None:
    """A hint is part of the message users see."""
    shown = str(SetupError("mount failed", hint="enable overlayfs"))
    assert shown == "mount failed\n  hint: enable overlayfs"


def test_an_error_message_shows_control_characters_escaped() -> None:
    """Issue 9, item 11: a message quoting a container's output or a name from its image
    (CommandNotFoundError of an image's symlink, a readiness error's log tail) reaches the
    terminal with \\x1b, not ESC; the message itself keeps the text as it was."""
    error = CommandNotFoundError("exec /bin/app\x1b[2J\x1b]52;c;eA==\x07: not found", hint="see\rhere")
    assert str(error) == "exec /bin/app\\x1b[2J\\x1b]52;c;eA==\\x07: not found\n  hint: see\\rhere"
    assert error.message.startswith("exec /bin/app\x1b[2J")
    assert from_wire(to_wire(error)).message == error.message


def test_closed_handle_refuses_work() -> None:
    """A closed handle (its fixture scope ended) refuses new containers; closing twice is silent."""
    sb = Sandbox()
    sb.close()
    sb.close()
    with pytest.raises(SandboxError, match="closed"):
        sb.run(["true"])


def test_the_error_tree_keeps_its_old_address() -> None:
    """``pytest_sandbox.errors`` (the flat layout's module) still names the same classes."""
    import pytest_sandbox
    from pytest_sandbox import errors
    from pytest_sandbox.core import errors as core_errors

    assert errors.SandboxError is core_errors.SandboxError is pytest_sandbox.SandboxError
    assert all(getattr(errors, name) is getattr(core_errors, name) for name in errors.__all__)
    defined = {n for n, v in vars(core_errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined <= set(errors.__all__)  # a new error class is listed in core.errors.__all__ too
