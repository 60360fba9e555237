"""Fixtures shared by the discovery tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from .fakeapi import FakeAPIServer


@pytest.fixture
def api() -> Iterator[FakeAPIServer]:
    """A loopback server speaking the API's list/watch protocol (see fakeapi.py)."""
    a = FakeAPIServer()
    try:
        yield a
    finally:
        a.close()
