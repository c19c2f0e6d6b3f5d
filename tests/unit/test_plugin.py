"""The pytest layer without containers (pytester): settings errors, options, marker, hook spec, header.

Tests that start containers through the fixtures are in tests/kernel/test_plugin_containers.py.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _no_sandbox_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child sessions' settings come from what each test gives them only."""
    for name in [
        "PYTEST_SANDBOX_DATA_ROOT",
        "PYTEST_SANDBOX_UID_BASE",
        "PYTEST_SANDBOX_ADDRESS_POOLS",
        "PYTEST_SANDBOX_INSECURE_REGISTRIES",
        "PYTEST_SANDBOX_REGISTRY_MIRRORS",
        "PYTEST_ADDOPTS",
    ]:
        monkeypatch.delenv(name, raising=False)


def test_a_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_uid_base = zero\n")
    pytester.makepyfile("def test_never():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # 4
    result.stderr.fnmatch_lines(
        [
            "ERROR: pytest_sandbox: bad setting sandbox_uid_base: sandbox_uid_base='zero': expected*",
            "  expected: a host uid from 1 to *",
        ]
    )
    result.stdout.no_fnmatch_line("*test_never*")


def test_a_bad_pool_names_the_ini_key_and_the_form(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_address_pools =\n    base=10.1.0.0/16,size=24\n    nonsense\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*sandbox_address_pools: 'nonsense': expected 'base=A.B.C.D/N,size=M'*"])


def test_the_option_beats_the_ini_file_and_names_itself(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsandbox_uid_base = 2000000\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-uid-base=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad setting --sandbox-uid-base: --sandbox-uid-base='0'*"])


def test_a_bad_environment_variable_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_INSECURE_REGISTRIES", "not a host!")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad setting PYTEST_SANDBOX_INSECURE_REGISTRIES:*not a registry host*"])


def test_the_settings_are_on_the_stash_as_resolved(pytester: pytest.Pytester) -> None:
    """ini > environment; the header names the data root; a test reads the settings from the stash."""
    pytester.makeini(f"[pytest]\nsandbox_data_root = {pytester.path / 'data'}\nsandbox_uid_base = 2000000\n")
    pytester.makepyfile(
        """
        from pytest_sandbox.plugin import SETTINGS_KEY

        def test_stash(request):
            settings = request.config.stash[SETTINGS_KEY]
            assert settings.uid_base == 2000000
            assert settings.data_root.endswith("/data")
            assert settings.address_pools[0].size == 27
        """
    )
    env = {"PYTEST_SANDBOX_UID_BASE": "3000000", "PYTEST_SANDBOX_ADDRESS_POOLS": "base=10.9.0.0/16,size=27"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([f"sandbox: cgroup *; data root {pytester.path / 'data'}"])
    result.assert_outcomes(passed=1)


def test_help_lists_every_option_and_ini_key(pytester: pytest.Pytester) -> None:
    from pytest_sandbox.config import SETTINGS

    result = pytester.runpytest_subprocess("--help")
    text = result.stdout.str()
    for s in SETTINGS:
        assert not s.option or s.option in text
        assert not s.ini or s.ini in text


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.sandbox(**options): default options*"])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(memory="64m")
        def test_marked():
            pass
        """
    )
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)


def test_the_hook_spec_is_registered(pytester: pytest.Pytester) -> None:
    """pluggy checks an implementation against the spec: an unknown argument is refused."""
    pytester.makeconftest("def pytest_sandbox_container_started(container, request, extra):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*pytest_sandbox_container_started*", "*extra*"])


def test_a_bad_marker_option_is_a_collection_error_naming_the_test(pytester: pytest.Pytester) -> None:
    """Issue 9, item 15: a typo in a marker (memroy=), a bad value (memory="lots") or a positional
    argument is reported when the test is collected -- naming the test, the marker and the closest
    valid option -- not at its first run(); the other tests, of the same module too, are kept."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(memroy="64m")
        def test_typo(sandbox):
            raise AssertionError("never runs")

        @pytest.mark.sandbox(pids=8)
        class TestValues:
            @pytest.mark.sandbox(memory="lots")
            def test_bad_value(self):
                raise AssertionError("never runs")

            def test_class_marker_is_fine(self):
                pass

        @pytest.mark.sandbox("64m")
        def test_positional():
            raise AssertionError("never runs")

        @pytest.mark.sandbox(memory="64m", cpus=0.5, env={"A": "1"}, mounts={"/made/at/run": "/m"})
        def test_fine():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # as a bad parametrize: nothing ran
    result.stdout.fnmatch_lines(
        [
            "test_a_bad_marker_option_is_a_collection_error_naming_the_test.py::test_typo: "
            "@pytest.mark.sandbox(memroy='64m'): unknown option 'memroy' (did you mean 'memory'?); "
            "the options are: *",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*::TestValues::test_bad_value: @pytest.mark.sandbox(memory='lots'): memory='lots': invalid size*"]
    )
    result.stdout.fnmatch_lines(
        ["*::test_positional: @pytest.mark.sandbox('64m'): takes keyword arguments only, e.g. memory='64m'"]
    )
    result.stdout.fnmatch_lines(["*Interrupted: 3 errors during collection*"])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--continue-on-collection-errors")
    result.assert_outcomes(passed=2, errors=3)
