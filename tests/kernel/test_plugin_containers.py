"""The pytest layer with containers (pytester): fixture scopes, marker defaults, report sections, the hook.

Each test runs a child pytest session in this process (``runpytest``): its fixtures start real
containers; the child's own assertions check what it can see from inside, the outcome is checked
here.  The settings-only tests (usage errors, options) are in tests/unit/test_plugin.py.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

RECORDING_CONFTEST = """
import json

STARTED = []  # (fixture name, container) in start order, from the hook


def pytest_sandbox_container_started(container, request):
    STARTED.append((request.fixturename, container))


def removed(fixturename):
    return [c.removed for name, c in STARTED if name == fixturename]


def pytest_sessionfinish(session):
    # Session-scoped fixtures are torn down with the last test: all is removed by now.
    with open("after-session.json", "w") as f:
        json.dump({name: c.removed for name, c in STARTED}, f)
"""


def test_each_fixture_scope_removes_its_containers_at_its_end(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORDING_CONFTEST)
    pkg = pytester.mkpydir("pkg")
    (pkg / "test_a_scopes.py").write_text(
        """
from conftest import STARTED, removed

SLEEP = ["sleep", "60"]


def test_function(sandbox):
    sandbox.start(SLEEP)
    assert removed("sandbox") == [False]


def test_function_scope_ended():
    assert removed("sandbox") == [True]


class TestClass:
    def test_one(self, sandbox_class):
        sandbox_class.start(SLEEP)

    def test_two(self, sandbox_class):
        assert removed("sandbox_class") == [False]  # still running: same class


def test_class_scope_ended():
    assert removed("sandbox_class") == [True]


def test_wider_scopes(sandbox_module, sandbox_package, sandbox_session):
    for handle in (sandbox_module, sandbox_package, sandbox_session):
        handle.start(SLEEP)


def test_same_module():
    assert removed("sandbox_module") == [False]
"""
    )
    (pkg / "test_b_after.py").write_text(
        """
from conftest import removed


def test_module_scope_ended_package_scope_not():
    assert removed("sandbox_module") == [True]
    assert removed("sandbox_package") == [False]
"""
    )
    pytester.makepyfile(
        test_z_outside="""
from conftest import removed


def test_package_scope_ended_session_scope_not():
    assert removed("sandbox_package") == [True]
    assert removed("sandbox_session") == [False]
"""
    )
    result = pytester.runpytest("-p", "no:randomly", "-v")
    result.assert_outcomes(passed=9)
    after = (pytester.path / "after-session.json").read_text()
    assert after == (
        '{"sandbox": true, "sandbox_class": true, "sandbox_module": true, '
        '"sandbox_package": true, "sandbox_session": true}'
    )


def test_marker_defaults_merge_with_call_options(pytester: pytest.Pytester) -> None:
    """Per option: the call's value wins over the function marker's, which wins over the class's."""
    pytester.makepyfile(
        """
import pytest

CMD = ["sh", "-c", "hostname; echo $A $B; cat /sys/fs/cgroup/pids.max 2>/dev/null || true"]


@pytest.mark.sandbox(hostname="from-marker", env={"A": "marker"})
def test_marker_only(sandbox):
    out = sandbox.run(CMD).stdout.split()
    assert out[:2] == [b"from-marker", b"marker"]


@pytest.mark.sandbox(hostname="from-marker", env={"A": "marker"})
def test_call_wins(sandbox):
    out = sandbox.run(CMD, env={"B": "call"}).stdout.split()
    assert out[:2] == [b"from-marker", b"call"]  # env replaced as a whole, hostname kept
    assert sandbox.run(["hostname"], hostname="from-call").stdout == b"from-call\\n"


@pytest.mark.sandbox(hostname="from-class", env={"A": "class"})
class TestNested:
    @pytest.mark.sandbox(hostname="from-method")
    def test_method_marker_wins_per_option(self, sandbox):
        out = sandbox.run(CMD).stdout.split()
        assert out[:2] == [b"from-method", b"class"]


def test_no_marker(sandbox):
    assert sandbox.defaults == {}


@pytest.mark.sandbox("positional")
def test_positional_is_refused(sandbox):
    pass
"""
    )
    result = pytester.runpytest("-p", "no:randomly", "--continue-on-collection-errors")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.sandbox('positional'): takes keyword arguments only*"])


def test_a_failing_test_reports_its_containers_output(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
def test_fails(sandbox):
    sandbox.start(["sh", "-c", "echo from-the-started-container; sleep 60"]).wait_for_log("from-the")
    r = sandbox.run(["sh", "-c", "echo run-output; echo run-error >&2; exit 3"])
    assert r.exit_code == 0


def test_passes(sandbox):
    sandbox.run(["sh", "-c", "echo quiet-when-passing"])
"""
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=1)
    lines = result.stdout.lines
    started = next(
        i for i, line in enumerate(lines) if line.startswith("- sandbox ") and "sleep 60']" in line
    )
    assert lines[started + 1] == "from-the-started-container"
    run = lines.index("- sandbox run ['sh', '-c', 'echo run-output; echo run-error >&2; exit 3'] -> exit 3 -")
    assert lines[run + 1 : run + 3] == ["run-output", "run-error"]
    result.stdout.no_fnmatch_line("*quiet-when-passing*")


def test_the_hook_fires_once_per_started_container(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
SEEN = []


def pytest_sandbox_container_started(container, request):
    assert container.running
    SEEN.append((request.scope, request.fixturename, container.name))
"""
    )
    pytester.makepyfile(
        """
from conftest import SEEN


def test_start(sandbox):
    c = sandbox.start(["sleep", "60"])
    sandbox.run(["true"])  # run() is not a start: no hook
    assert SEEN == [("function", "sandbox", c.name)]


def test_session_handle(sandbox_session):
    c = sandbox_session.start(["sleep", "60"])
    assert SEEN[-1] == ("session", "sandbox_session", c.name)
    assert len(SEEN) == 2
"""
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)
