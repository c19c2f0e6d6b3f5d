"""user= resolution against an image's /etc/passwd and /etc/group text (launcher/process.py), pure.

Issue 9, item 5: an id outside the container's map -- -1 and 4294967295 are (uid_t)-1, which
setresuid(2) reads as "leave unchanged" -- would have run the command as root.  Every uid and gid
that resolution returns is in 0..MAX_MAPPED_ID, or it raises UserNotFoundError naming the line.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.core.errors import InvalidSpecError, UserNotFoundError
from pytest_sandbox.core.spec import MAX_MAPPED_ID, parse_user
from pytest_sandbox.launcher.process import parse_db, resolve_user_in

PASSWD = b"root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nextra:x:2000:app,other\n"


def test_valid_entries_resolve_to_their_ids() -> None:
    """Names, numbers and name:group resolve as Docker does; supplementary groups from /etc/group."""
    assert resolve_user_in("app", PASSWD, GROUP) == (1000, 1000, [1000, 2000], "/home/app")
    assert resolve_user_in("app:root", PASSWD, GROUP) == (1000, 0, [0, 2000], "/home/app")
    assert resolve_user_in("4242:7", PASSWD, GROUP) == (4242, 7, [7], "/")
    assert resolve_user_in(None, PASSWD, GROUP) == (0, 0, [0], "/root")
    assert resolve_user_in(str(MAX_MAPPED_ID), b"", b"") == (MAX_MAPPED_ID, 0, [0], "/")


def test_db_lines_are_numbered_from_one_skipping_comments() -> None:
    assert parse_db(PASSWD) == [
        (1, ["root", "x", "0", "0", "root", "/root", "/bin/sh"]),
        (3, ["app", "x", "1000", "1000", "", "/home/app", "/bin/sh"]),
    ]


@pytest.mark.parametrize("bad", ["-1", "4294967295", "65536", "", "1e3", "+5", " 5", "٣", "²", "0x10"])
def test_passwd_uid_outside_the_map_names_the_line(bad: str) -> None:
    """app:x:<bad>:1000 in /etc/passwd: UserNotFoundError naming /etc/passwd line 2, never uid 0."""
    passwd = b"root:x:0:0::/root:/bin/sh\napp:x:" + bad.encode() + b":1000::/:/bin/sh\n"
    with pytest.raises(UserNotFoundError, match=r"/etc/passwd line 2: uid .* is not an id") as e:
        resolve_user_in("app", passwd, GROUP)
    assert e.value.filename == "/etc/passwd"


@pytest.mark.parametrize("bad", ["-1", "4294967295", "65536"])
def test_passwd_gid_outside_the_map_names_the_line(bad: str) -> None:
    passwd = b"app:x:1000:" + bad.encode() + b"::/:/bin/sh\n"
    with pytest.raises(UserNotFoundError, match=r"/etc/passwd line 1: gid '.*' is not an id"):
        resolve_user_in("app", passwd, GROUP)


def test_named_group_outside_the_map_names_the_line() -> None:
    group = b"root:x:0:\nevil:x:4294967295:\n"
    with pytest.raises(UserNotFoundError, match=r"/etc/group line 2: gid '4294967295'") as e:
        resolve_user_in("app:evil", PASSWD, group)
    assert e.value.filename == "/etc/group"


def test_supplementary_group_outside_the_map_names_the_line() -> None:
    """A group listing the user with gid -1: a typed error naming the line, not setgroups' EINVAL."""
    group = b"root:x:0:\napp:x:1000:\nwheel:x:-1:app\n"
    with pytest.raises(UserNotFoundError, match=r"/etc/group line 3: gid '-1'"):
        resolve_user_in("app", PASSWD, group)
    # A bad line that does not concern the user is no reason to refuse.
    assert resolve_user_in("root", PASSWD, group)[:3] == (0, 0, [0])


@pytest.mark.parametrize("user", ["4294967295", "65536", "1000:65536", "0:4294967295"])
def test_numeric_user_outside_the_map_refused_in_launcher(user: str) -> None:
    """A numeric user= that bypassed parse_user (an image's config User): refused, naming the value."""
    with pytest.raises(UserNotFoundError, match=r"user='.*': [ug]id '\d+' is not an id"):
        resolve_user_in(user, b"", b"")


@pytest.mark.parametrize("user", ["4294967295", "65536", "1000:65536", "-1", "²", "app:-1"])
def test_numeric_user_outside_the_map_refused_in_spec(user: str) -> None:
    """The same values given to run()/exec(): InvalidSpecError before anything is created."""
    with pytest.raises(InvalidSpecError):
        parse_user(user)
