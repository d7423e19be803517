"""Fixtures shared by the fault tests that run the whole service."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from tests.faults.service_env import ServiceEnv


@pytest.fixture
def make_service(tmp_path, upstream):
    """``make_service(server=None, **options)``: a started `ServiceEnv` in a fresh folder,
    proxying *server* (default: the ``upstream`` fixture); every one is stopped at teardown."""
    started: list[ServiceEnv] = []

    def make(server=None, **options) -> defer.Deferred[ServiceEnv]:
        folder = tmp_path / f"service{len(started)}"
        folder.mkdir()
        env = ServiceEnv(folder, server or upstream, **options)
        started.append(env)
        return defer.ensureDeferred(env.start())

    yield make
    for env in started:
        pytest_twisted.blockon(defer.ensureDeferred(env.stop()))


@pytest.fixture
def log_events():
    """Every twisted.logger event emitted during the test, as text (message, fields, failure)."""
    events: list[str] = []

    def observe(event: dict) -> None:
        text = [formatEvent(event) or "", repr(event)]
        failure = event.get("log_failure")
        if failure is not None:
            text.append(failure.getTraceback())
        events.append("\n".join(text))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
