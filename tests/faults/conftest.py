"""Fixtures shared by the fault tests (``make_service`` comes from tests.support.service)."""

from __future__ import annotations

import pytest
from twisted.logger import formatEvent, globalLogPublisher


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
