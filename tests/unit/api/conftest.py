"""Fixtures shared by the data-access unit tests: a real access token from the emulator and
a DataClient on it with the fast retry policy (tests/unit/api/support.py)."""

from __future__ import annotations

import pytest

from tests.unit.api.support import TokenSource, data_client


@pytest.fixture
def tokens(emulator):
    return TokenSource(emulator)


@pytest.fixture
def client(emulator, tokens):
    c = data_client(emulator, tokens)
    yield c
    c.close()
