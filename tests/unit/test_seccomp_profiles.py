"""The ``seccomp=`` option (issue 9, item 10): Docker's profile format parsed with typed errors, and
the embedded default profile, resolved for our containers, checked against Docker's JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.config import Settings
from pytest_sandbox.core.errors import InvalidSpecError, SettingsError
from pytest_sandbox.core.seccomp import (
    CAPABILITY_NAMES,
    DEFAULT_PROFILE_FILE,
    default_profile,
    load_profile,
    parse_profile,
    parse_seccomp,
)
from pytest_sandbox.core.spec import ProcessSpec, parse_options
from pytest_sandbox.host import seccomp as host_seccomp
from pytest_sandbox.launcher.process import DEFAULT_CAPS

# sha256 of moby/profiles v0.2.3 default.json, as json.dumps(sort_keys=True, separators=(",", ":"))
MOBY_DEFAULT_SHA256 = "9da637d2ab0a204fcbd91bd88f1be9e004a3acab61c571a9f5b8870e588a17d2"
PODMAN_DEFAULT_CAPS = {
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
}


def _raw_default() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(DEFAULT_PROFILE_FILE).read_text())
    return doc


def test_the_embedded_default_is_dockers_profile_unmodified() -> None:
    """The data file is moby's default.json plus one "comment" key: its attribution (Apache-2.0)."""
    doc = _raw_default()
    comment = doc.pop("comment")
    assert "Copyright The Moby Authors" in comment
    assert "Apache-2.0" in comment
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(canonical).hexdigest() == MOBY_DEFAULT_SHA256


def test_our_capability_names_are_podmans_default_set() -> None:
    assert {CAPABILITY_NAMES[c] for c in DEFAULT_CAPS} == PODMAN_DEFAULT_CAPS


def _docker_rules(doc: dict[str, Any], caps: set[str], native: str) -> list[tuple[str, str, Any, Any]]:
    """moby's setupSeccomp, written out again for this test: (name, action, errnoRet, args)."""
    out = []
    for call in doc["syscalls"]:
        inc, exc = call.get("includes") or {}, call.get("excludes") or {}
        if native in exc.get("arches", []) or set(exc.get("caps", [])) & caps:
            continue
        if inc.get("arches") and native not in inc["arches"]:
            continue
        if not set(inc.get("caps", [])) <= caps:
            continue
        # minKernel: 4.8 is the only one, and every supported kernel is newer
        out += [(n, call["action"], call.get("errnoRet"), call.get("args") or []) for n in call["names"]]
    return out


def test_the_resolved_default_matches_dockers_json_for_our_capabilities() -> None:
    """Item 10: the rules our containers get are Docker's for podman's capability set on amd64."""
    resolved = default_profile().resolve(DEFAULT_CAPS, machine="x86_64", kernel="6.1.0")
    ours = [
        (
            n,
            r.action,
            r.errno_ret,
            [
                {"index": a.index, "value": a.value, "op": a.op}
                | ({"valueTwo": a.value_two} if a.value_two else {})
                for a in r.args
            ],
        )
        for r in resolved.rules
        for n in r.names
    ]
    assert ours == _docker_rules(_raw_default(), PODMAN_DEFAULT_CAPS, "amd64")
    assert resolved.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
    assert (resolved.default_action, resolved.default_errno) == ("SCMP_ACT_ERRNO", 1)


REFUSED = [
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "perf_event_open",
    "mount",
    "umount2",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "swapon",
    "swapoff",
    "reboot",
    "pivot_root",
    "open_by_handle_at",
    "acct",
    "settimeofday",
    "clock_settime",
    "syslog",
    "quotactl",
    "kcmp",
    "pidfd_getfd",
]


@pytest.mark.parametrize("name", REFUSED)
def test_the_default_profile_allows_none_of_these(name: str) -> None:
    """Item 10: without CAP_SYS_ADMIN and the other caps, no rule allows them: EPERM (the default)."""
    resolved = default_profile().resolve(DEFAULT_CAPS, machine="x86_64", kernel="6.1.0")
    assert not [r for r in resolved.rules if name in r.names and r.action == "SCMP_ACT_ALLOW"]


def test_clone_is_allowed_without_namespace_flags_and_clone3_gets_enosys() -> None:
    resolved = default_profile().resolve(DEFAULT_CAPS, machine="x86_64", kernel="6.1.0")
    (clone,) = [r for r in resolved.rules if "clone" in r.names]
    (arg,) = clone.args
    assert (arg.index, arg.op, arg.value_two) == (0, "SCMP_CMP_MASKED_EQ", 0)
    assert arg.value == 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
    (clone3,) = [r for r in resolved.rules if "clone3" in r.names]
    assert (clone3.action, clone3.errno_ret) == ("SCMP_ACT_ERRNO", 38)


def test_only_the_builtin_default_on_x86_64_refuses_i386_socketcall_socket() -> None:
    """i386 socketcall(SYS_SOCKET) gets ENOSYS (its family is in memory, the filter cannot check it);
    the guard is BPF put before libseccomp's program, 7 instructions (kernel test: test_seccomp.py)."""
    resolved = default_profile().resolve(DEFAULT_CAPS, machine="x86_64", kernel="6.1.0")
    assert resolved.i386_socketcall_refusals == ((1, 38),)  # (SYS_SOCKET, ENOSYS)
    assert not default_profile().resolve(DEFAULT_CAPS, machine="aarch64").i386_socketcall_refusals
    copy = load_profile(DEFAULT_PROFILE_FILE)  # the same JSON as a custom profile: taken as written
    assert not copy.resolve(DEFAULT_CAPS, machine="x86_64").i386_socketcall_refusals
    unguarded = dataclasses.replace(resolved, i386_socketcall_refusals=())
    with_guard, without = host_seccomp.compile_profile(resolved), host_seccomp.compile_profile(unguarded)
    assert with_guard.endswith(without)
    assert len(with_guard) - len(without) == 7 * host_seccomp.BPF_INSTRUCTION_BYTES


def test_with_cap_sys_admin_the_mount_family_would_be_allowed() -> None:
    """The includes/excludes really are evaluated (the same JSON, a bounding set with SYS_ADMIN)."""
    caps = frozenset(DEFAULT_CAPS | {CAPABILITY_NAMES.index("CAP_SYS_ADMIN")})
    resolved = default_profile().resolve(caps, machine="x86_64", kernel="6.1.0")
    allowed = {n for r in resolved.rules if r.action == "SCMP_ACT_ALLOW" and not r.args for n in r.names}
    assert {"mount", "unshare", "setns", "clone3"} <= allowed


def test_option_values() -> None:
    assert parse_seccomp("unconfined") is None
    assert parse_seccomp("default") is default_profile()
    assert parse_options().seccomp is default_profile()
    assert parse_options(seccomp="unconfined").seccomp is None
    with pytest.raises(InvalidSpecError, match="expected 'default', 'unconfined'"):
        parse_options(seccomp="strict")
    with pytest.raises(InvalidSpecError, match="cannot read the profile"):
        parse_seccomp("/nonexistent/profile.json")


def _profile(**syscall: Any) -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", **syscall}],
    }


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"syscalls": []}, r"defaultAction=None: expected one of"),
        ({"defaultAction": "SCMP_ACT_NOTIFY"}, r"defaultAction: SCMP_ACT_NOTIFY .* not supported"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, r"defaultErrnoRet: only SCMP_ACT_ERRNO"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1}, r"defaultErrnoRet=-1"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultAction2": 1}, r"unknown field 'defaultAction2'"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["x86_64"]}, r"architectures: 'x86_64'"),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "archMap": [{"architecture": "SCMP_ARCH_X86_64"}],
            },
            r"'architectures' or 'archMap'",
        ),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"architecture": "amd64"}]},
            r"archMap\[0\]: architecture",
        ),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, r"syscalls: expected a list"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock"}, r"listenerPath"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}, r"flags"),
        (_profile(names=[]), r"syscalls\[0\]: names: expected at least one"),
        (_profile(names=["mk dir"]), r"syscalls\[0\]: names: 'mk dir'"),
        (_profile(name="mkdir"), r"syscalls\[0\]: give 'name' or 'names'"),
        (_profile(action="SCMP_ACT_DENY"), r"syscalls\[0\]: action='SCMP_ACT_DENY'"),
        (_profile(action="SCMP_ACT_ALLOW", errnoRet=1), r"syscalls\[0\]: errnoRet: only"),
        (_profile(errnoRet=5000), r"syscalls\[0\]: errnoRet=5000"),
        (_profile(args=[{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]), r"args\[0\]: index=6"),
        (_profile(args=[{"index": 0, "value": 1, "op": "EQ"}]), r"args\[0\]: op='EQ'"),
        (_profile(args=[{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]), r"args\[0\]: value=-1"),
        (_profile(args=[{"index": 0, "valueTwo": 1 << 64, "op": "SCMP_CMP_EQ"}]), r"args\[0\]: valueTwo="),
        (_profile(args=[{"index": 0, "op": "SCMP_CMP_EQ", "mask": 1}]), r"args\[0\]: unknown field 'mask'"),
        (_profile(includes={"caps": ["SYS_ADMIN"]}), r"includes: caps: 'SYS_ADMIN'"),
        (_profile(excludes={"arches": ["x86_64"]}), r"excludes: arches: 'x86_64'"),
        (_profile(includes={"minKernel": "4"}), r"includes: minKernel='4'"),
        (_profile(includes={"minKernel": "0.0"}), r"includes: minKernel='0.0'"),
        (_profile(includes={"kernel": "4.8"}), r"includes: unknown field 'kernel'"),
        (_profile(comments="x"), r"syscalls\[0\]: unknown field 'comments'"),
    ],
)
def test_a_bad_profile_names_its_bad_field(profile: dict[str, Any], message: str) -> None:
    """Item 10: InvalidSpecError naming the field (and the entry), before anything is created."""
    with pytest.raises(InvalidSpecError, match=message):
        parse_seccomp(profile)


def test_a_profile_file_is_read_and_named(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(InvalidSpecError, match=r"p\.json.*not valid JSON"):
        parse_seccomp(str(path))
    path.write_text(json.dumps(_profile(action="SCMP_ACT_X")))
    with pytest.raises(InvalidSpecError, match=r"seccomp='.*p\.json': syscalls\[0\]: action"):
        parse_seccomp(path)
    path.write_text(json.dumps(_profile()))
    profile = parse_seccomp(path)
    assert profile is not None
    assert not profile.is_default


def test_docker_features_that_are_kept() -> None:
    """``name`` (the old form), ``comment``, null subArchitectures, minKernel and several args."""
    profile = parse_profile(
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": None}],
            "syscalls": [
                {"name": "read", "action": "SCMP_ACT_ALLOW", "comment": "why"},
                {"names": ["write"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
                {
                    "names": ["socket"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [
                        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                        {"index": 1, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"},
                    ],
                },
            ],
        },
        source="test",
    )
    resolved = profile.resolve(DEFAULT_CAPS, machine="x86_64", kernel="6.1.0")
    assert [r.names for r in resolved.rules] == [("read",), ("socket",)]  # write needs kernel 99.0
    assert resolved.architectures == ("SCMP_ARCH_X86_64",)
    assert resolved.default_errno == 38


def test_the_compiled_filter_crosses_the_wire() -> None:
    spec = ProcessSpec(argv=("true",), env=(), seccomp=b"\x06\0\0\0\0\0\xff\x7f", seccomp_in_init=True)
    assert ProcessSpec.from_wire(json.loads(json.dumps(spec.to_wire()))) == spec
    assert ProcessSpec.from_wire(ProcessSpec(argv=("true",), env=()).to_wire()).seccomp is None


def test_the_setting(tmp_path: Path) -> None:
    """ini sandbox_seccomp / $PYTEST_SANDBOX_SECCOMP: the default of seccomp=; a file is checked at once."""
    assert Settings.resolve(env={}).seccomp == "default"
    assert Settings.resolve(ini={"seccomp": "unconfined"}, env={}).seccomp == "unconfined"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_profile()))
    assert Settings.resolve(env={"PYTEST_SANDBOX_SECCOMP": str(path)}).seccomp == str(path)
    path.write_text(json.dumps(_profile(action="nope")))
    with pytest.raises(SettingsError, match=r"sandbox_seccomp.*syscalls\[0\]: action"):
        Settings.resolve(ini={"seccomp": str(path)}, env={})
    with pytest.raises(SettingsError, match="PYTEST_SANDBOX_SECCOMP"):
        Settings.resolve(env={"PYTEST_SANDBOX_SECCOMP": "strict"})
