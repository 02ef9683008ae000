"""molecule scenarios of the roles (default driver, no containers): converge, idempotence, verify.

The three scenarios run at once, in the background from the start of the session
(see ``molecule_runs`` in conftest.py), each in its own directory with its own free
ports; drtool_install builds a wheel from a snapshot of this checkout and installs it,
offline, into a fresh venv.  This file sorts last, so the other tests run meanwhile.
"""

from __future__ import annotations

import re

import pytest

from tests.ansible.conftest import MOLECULE_SCENARIOS

pytestmark = pytest.mark.slow

STEPS = ("converge", "idempotence", "verify")


@pytest.mark.parametrize("scenario", MOLECULE_SCENARIOS)
def test_molecule_scenario(molecule_runs, scenario):
    run = molecule_runs[scenario]
    rc = run.proc.wait(timeout=900)
    output = run.output()
    assert rc == 0, f"molecule test -s {scenario} failed (rc {rc}):\n{output[-8000:]}"
    for step in STEPS:
        done = re.search(rf"{scenario} (?:>|➜) {step}(?:\]|:) Executed: Successful", output)
        assert done, f"{step} did not run:\n{output[-4000:]}"
