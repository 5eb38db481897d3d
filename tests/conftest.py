"""Shared fixtures: a running emulator (fast timings) and an openai client bound to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from batchops.emulator import EmulatorServer, Scenario
from batchops.emulator.testing import DEFAULT_KEY, FAST


def _fast(scenario: Scenario | None, **kwargs: Any) -> Scenario:
    if scenario is not None:
        return scenario.updated(**kwargs) if kwargs else scenario
    return Scenario(**{**FAST, **kwargs})


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., EmulatorServer]]:
    """Start emulators: `emulator_factory(Scenario(...))` or `emulator_factory(**knobs)`
    (knobs default to the fast timings). All are stopped at teardown."""
    started: list[EmulatorServer] = []

    def make(scenario: Scenario | None = None, **kwargs: Any) -> EmulatorServer:
        server = EmulatorServer(scenario=_fast(scenario, **kwargs)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def emulator(emulator_factory: Callable[..., EmulatorServer]) -> EmulatorServer:
    """A running emulator with the fast default scenario (0.05 / 0.2 / 0.05 s)."""
    return emulator_factory()


@pytest.fixture
def openai_client(emulator: EmulatorServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.base_url, api_key=DEFAULT_KEY, max_retries=0)
