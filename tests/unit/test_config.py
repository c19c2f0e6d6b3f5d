"""Settings (pytest_sandbox.config): precedence, typed errors, the README's table, a cheap import.

Pure: no root, no launcher, no container.
"""

from __future__ import annotations

import builtins
import dataclasses
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_sandbox
from pytest_sandbox.config import (
    DEFAULT_UID_BASE,
    SETTINGS,
    AddressPool,
    RegistrySettings,
    Settings,
    default_data_root,
)
from pytest_sandbox.core.errors import InvalidSpecError, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_any_source(tmp_path: Path) -> None:
    s = Settings.resolve(env={"XDG_CACHE_HOME": str(tmp_path)})
    assert s.data_root == str(tmp_path / "pytest-sandbox")
    assert s.store_root == str(tmp_path / "pytest-sandbox" / "store")
    assert s.uid_base == DEFAULT_UID_BASE
    assert s.cgroup_root == "/sys/fs/cgroup"
    assert s.address_pools == (AddressPool(ipaddress.IPv4Network("10.243.0.0/16"), 24),)
    assert s.registries == RegistrySettings()
    assert s.trace_file is None
    assert os.path.isabs(s.state_dir)


def test_option_beats_ini_beats_environment_beats_default(tmp_path: Path) -> None:
    env = {"PYTEST_SANDBOX_UID_BASE": "3000000", "PYTEST_SANDBOX_DATA_ROOT": str(tmp_path / "env")}
    ini = {"uid_base": "2000000", "data_root": str(tmp_path / "ini")}
    options = {"uid_base": "1000000"}
    assert Settings.resolve(options=options, ini=ini, env=env).uid_base == 1_000_000
    assert Settings.resolve(options={"uid_base": None}, ini=ini, env=env).uid_base == 2_000_000
    assert Settings.resolve(ini={"uid_base": ""}, env=env).uid_base == 3_000_000
    assert Settings.resolve(options=options, ini=ini, env=env).data_root == str(tmp_path / "ini")
    assert Settings.resolve(env=env).data_root == str(tmp_path / "env")
    assert Settings.resolve(env={}).uid_base == DEFAULT_UID_BASE


def test_from_env_reads_every_environment_variable(tmp_path: Path) -> None:
    env = {
        "PYTEST_SANDBOX_DATA_ROOT": str(tmp_path / "data"),
        "PYTEST_SANDBOX_STATE_DIR": str(tmp_path / "state"),
        "PYTEST_SANDBOX_UID_BASE": "200000",
        "PYTEST_SANDBOX_CGROUP_ROOT": str(tmp_path / "cg"),
        "PYTEST_SANDBOX_ADDRESS_POOLS": "base=10.82.0.0/16,size=27 base=192.168.0.0/16,size=24",
        "PYTEST_SANDBOX_INSECURE_REGISTRIES": "reg.example:5000, 10.0.0.0/8",
        "PYTEST_SANDBOX_REGISTRY_MIRRORS": "https://mirror.example, reg.example:5000=http://reg.example:5000",
        "PYTEST_SANDBOX_TRACE": str(tmp_path / "trace"),
        "PYTEST_SANDBOX_LOG_MAX_SIZE": "1.5m",
        "PYTEST_SANDBOX_LOG_MAX_FILE": "3",
        "PYTEST_SANDBOX_PIDS_LIMIT": "-1",
        "PYTEST_SANDBOX_WRITABLE_SIZE": "256m",
        "PYTEST_SANDBOX_MAX_LAYER_SIZE": "1g",
        "PYTEST_SANDBOX_SECCOMP": "unconfined",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        data_root=str(tmp_path / "data"),
        state_dir=str(tmp_path / "state"),
        uid_base=200_000,
        cgroup_root=str(tmp_path / "cg"),
        address_pools=(
            AddressPool(ipaddress.IPv4Network("10.82.0.0/16"), 27),
            AddressPool(ipaddress.IPv4Network("192.168.0.0/16"), 24),
        ),
        insecure_registries=("reg.example:5000", "10.0.0.0/8"),
        registry_mirrors=(("docker.io", "mirror.example"), ("reg.example:5000", "reg.example:5000")),
        trace_file=str(tmp_path / "trace"),
        log_max_size=3 << 19,
        log_max_file=3,
        pids_limit=None,
        writable_size=256 << 20,
        max_layer_size=1 << 30,
        seccomp="unconfined",
    )
    assert {e for s in SETTINGS for e in [s.env]} == set(env), "a setting's variable is missing here"


def test_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = Settings.resolve(ini={"data_root": "rel", "state_dir": "~/state"}, env={})
    assert s.data_root == str(tmp_path / "rel")
    assert s.state_dir == str(tmp_path / "home" / "state")


def test_lines_and_repeated_options_are_lists() -> None:
    """An ini linelist (pools) and a repeated command-line option (registries) give lists."""
    s = Settings.resolve(
        ini={"address_pools": ["base=10.10.0.0/16,size=24", "base=10.11.0.0/16,size=28"]},
        options={"insecure_registries": ["a.example", "b.example:5000"]},
        env={},
    )
    assert [str(p) for p in s.address_pools] == ["base=10.10.0.0/16,size=24", "base=10.11.0.0/16,size=28"]
    assert s.insecure_registries == ("a.example", "b.example:5000")


@pytest.mark.parametrize(
    ("where", "name", "raw", "source", "fragment"),
    [
        ("ini", "uid_base", "0", "sandbox_uid_base", "expected a host uid from 1 to"),
        ("env", "uid_base", "many", "PYTEST_SANDBOX_UID_BASE", "'many'"),
        ("options", "uid_base", "-1", "--sandbox-uid-base", "'-1'"),
        ("ini", "address_pools", "nonsense", "sandbox_address_pools", "'nonsense'"),
        ("env", "address_pools", "base=8.8.0.0/16,size=24", "PYTEST_SANDBOX_ADDRESS_POOLS", "not a private"),
        ("ini", "insecure_registries", "not a host!", "sandbox_insecure_registries", "not a registry host"),
        ("env", "registry_mirrors", "ftp://m.example", "PYTEST_SANDBOX_REGISTRY_MIRRORS", "a mirror is"),
        ("ini", "data_root", "a\0b", "sandbox_data_root", "NUL"),
        ("ini", "log_max_size", "lots", "sandbox_log_max_size", "invalid size"),
        ("env", "log_max_size", "1k", "PYTEST_SANDBOX_LOG_MAX_SIZE", "at least 4k"),
        ("options", "log_max_file", "0", "--sandbox-log-max-file", "from 1 to 100"),
        ("ini", "log_max_file", "two", "sandbox_log_max_file", "'two'"),
    ],
)
def test_a_bad_value_names_its_source_and_the_expected_form(
    where: str, name: str, raw: str, source: str, fragment: str
) -> None:
    env_name = next(s.env for s in SETTINGS if s.name == name)
    sources = {
        "options": {"options": {name: raw}, "env": {}},
        "ini": {"ini": {name: raw}, "env": {}},
        "env": {"env": {env_name: raw}},
    }[where]
    with pytest.raises(SettingsError) as info:
        Settings.resolve(**sources)
    assert info.value.source == source
    assert info.value.message.startswith(source)
    assert fragment in info.value.message
    assert info.value.expected == next(s.expected for s in SETTINGS if s.name == name)
    assert isinstance(info.value, InvalidSpecError)  # and a ValueError, as every bad input


def test_an_http_mirror_must_be_insecure_whichever_source_lists_it() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.resolve(ini={"registry_mirrors": "http://m.example:5000"}, env={})
    assert info.value.source == "sandbox_registry_mirrors"
    assert "PYTEST_SANDBOX_INSECURE_REGISTRIES=m.example:5000" in info.value.hint
    s = Settings.resolve(
        ini={"registry_mirrors": "http://m.example:5000"},
        env={"PYTEST_SANDBOX_INSECURE_REGISTRIES": "m.example:5000"},
    )
    assert s.registries.mirrors_for("docker.io") == ["m.example:5000"]
    assert s.registries.is_insecure("m.example:5000")


def test_the_command_line_tool_names_its_own_options() -> None:
    names = {"insecure_registries": "--insecure-registry"}
    with pytest.raises(SettingsError, match=r"^--insecure-registry: 'bad host!'"):
        Settings.resolve(options={"insecure_registries": ["bad host!"]}, env={}, option_names=names)


def test_settings_are_frozen_values() -> None:
    s = Settings.resolve(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.uid_base = 5  # type: ignore[misc]
    assert s == Settings.resolve(env={})
    assert hash(s) == hash(Settings.resolve(env={}))


def test_default_data_root_follows_xdg(tmp_path: Path) -> None:
    assert default_data_root({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "pytest-sandbox")


def test_the_readme_table_lists_every_setting() -> None:
    """README "Configuration": one row per setting, with its ini key, option, variable, daemon.json key."""
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ")]
    for s in SETTINGS:
        row = next((r for r in rows if f"`{s.env}`" in r), None)
        assert row is not None, f"README has no table row for {s.env}"
        for part in (s.ini, s.option):
            assert not part or f"`{part}`" in row, f"{s.name}: {part} missing from {row!r}"
        docker_key = re.split(r"[ (/]", s.docker)[0]
        assert docker_key in row, f"{s.name}: daemon.json key {docker_key} missing from {row!r}"


def _fresh_import(code: str) -> str:
    """Run ``code`` in a new interpreter (this checkout first on the path); its stdout."""
    argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def test_importing_the_package_imports_none_of_its_modules() -> None:
    """PEP 562: ``import pytest_sandbox`` is cheap; a public name imports its module on first use."""
    out = _fresh_import(
        "import pytest_sandbox as p\n"
        "mods = sorted(m for m in sys.modules if m.startswith('pytest_sandbox.'))\n"
        "print(mods); p.Limits; print('pytest_sandbox.core.limits' in sys.modules)"
    )
    first, second = out.splitlines()
    assert first == "[]"
    assert second == "True"


def test_every_public_name_resolves_and_dir_lists_it() -> None:
    for name in pytest_sandbox.__all__:
        assert getattr(pytest_sandbox, name).__name__ == name
        assert name in dir(pytest_sandbox)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pytest_sandbox.Nope  # noqa: B018


def test_every_error_the_readme_names_is_public() -> None:
    """The README's error tree is what a user catches: each name imports from the package itself
    (their modules moved in the re-layout; the package is the one address that does not)."""
    text = (ROOT / "README.md").read_text()
    errors = text[text.index("**Errors** are one tree") : text.index("**Configuration.**")]
    named = {n for n in re.findall(r"`(\w+Error)`", errors) if not hasattr(builtins, n)}
    assert "RegistryError" in named
    assert named <= set(pytest_sandbox.__all__)
    assert issubclass(pytest_sandbox.RegistryError, OSError)


def test_the_plugin_imports_no_container_code() -> None:
    """What every pytest run loads: the plugin, its hook specs and the settings -- nothing else."""
    out = _fresh_import(
        "import pytest, pytest_sandbox.plugin\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('pytest_sandbox', 'pyroute2', "
        "'filelock')))))"
    )
    assert set(out.split()) <= {
        "pytest_sandbox",
        "pytest_sandbox.plugin",
        "pytest_sandbox.hookspecs",
        "pytest_sandbox.config",
        "pytest_sandbox.core",
        "pytest_sandbox.core.errors",
        "pytest_sandbox.core.naming",
    }
