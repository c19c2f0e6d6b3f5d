"""The host uids that own containers' user namespaces (core/naming; issue 9, item 3), pure.

One per live container, OWNER_UID_BASE + its init's host pid: never one of any container's mapped
ids, never 0, and a uid_base whose range would overlap them is refused.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.config import DEFAULT_UID_BASE, parse_uid_base
from pytest_sandbox.core.errors import InvalidSpecError
from pytest_sandbox.core.naming import (
    ID_RANGE,
    OWNER_UID_BASE,
    OWNER_UID_COUNT,
    namespace_owner_uid,
    overlaps_owner_uids,
)


def test_owner_range_sits_right_above_the_default_id_range() -> None:
    assert OWNER_UID_BASE == DEFAULT_UID_BASE + ID_RANGE
    assert OWNER_UID_BASE + OWNER_UID_COUNT < (1 << 32) - 1  # (uid_t)-1 is no uid
    assert not overlaps_owner_uids(DEFAULT_UID_BASE)


def test_owner_uid_is_unique_per_pid_within_the_range() -> None:
    assert namespace_owner_uid(1) == OWNER_UID_BASE + 1
    assert namespace_owner_uid(OWNER_UID_COUNT - 1) == OWNER_UID_BASE + OWNER_UID_COUNT - 1
    for pid in (0, -1, OWNER_UID_COUNT):
        with pytest.raises(ValueError, match="PID_MAX_LIMIT"):
            namespace_owner_uid(pid)


@pytest.mark.parametrize(
    "base", [OWNER_UID_BASE - ID_RANGE + 1, OWNER_UID_BASE, OWNER_UID_BASE + OWNER_UID_COUNT - 1]
)
def test_uid_base_overlapping_the_owner_range_is_refused(base: int) -> None:
    with pytest.raises(InvalidSpecError, match="overlaps the host uids that own containers' user namespaces"):
        parse_uid_base(str(base), what="sandbox_uid_base")


@pytest.mark.parametrize("base", [100_000, OWNER_UID_BASE - ID_RANGE, OWNER_UID_BASE + OWNER_UID_COUNT])
def test_uid_base_beside_the_owner_range_is_accepted(base: int) -> None:
    assert parse_uid_base(str(base), what="sandbox_uid_base") == base
