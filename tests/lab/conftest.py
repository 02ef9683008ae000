"""Fixtures for the lab tests; the definitions live in fixtures.py so other test dirs can reuse them."""

from tests.lab.fixtures import lab  # noqa: F401  (re-exported fixture)
