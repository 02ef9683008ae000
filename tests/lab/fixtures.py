"""The ``lab`` pytest fixture, as a plugin module so tests outside tests/lab/ can load it too
(``pytest_plugins = ["tests.lab.fixtures"]`` in the root conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_root, require_tool
from tests.lab.lab import REQUIRED_TOOLS, Lab, find_tool, running_lab


def require_lab_tools() -> None:
    """Skip (fail under CI=true) unless this process can build a lab."""
    require_root()
    missing = [name for name in REQUIRED_TOOLS if find_tool(name) is None]
    if missing:  # sshd may live in /usr/sbin, off a non-root PATH: only these go to require_tool
        require_tool(*missing)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """One two-host lab for the whole session, torn down at its end (also on Ctrl-C/SIGTERM).

    Session-scoped so module- and session-scoped fixtures (a deployed drtool, say) can use it.
    Tests that cut a host must restore it (``with lab.partitioned("primary"): ...`` does).
    """
    require_lab_tools()
    with running_lab() as instance:
        yield instance
