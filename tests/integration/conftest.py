"""Fixtures for the store tests: a controllable clock and a store that uses it."""

from __future__ import annotations

import pytest

from hivemind.store import AwsClients, Store

# 2023-11-14T22:13:20Z
T0 = 1_700_000_000


class FakeClock:
    """Integer Unix seconds that only move when a test says so."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_store(aws: AwsClients, clock: FakeClock) -> Store:
    return Store(aws, clock=clock)
