"""Fixtures for real-client tests: ``make_mirror(files, behaviours=None)`` starts a synced
`Mirror` that is stopped at teardown."""

from __future__ import annotations

import itertools

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.clients.mirror import Mirror


@pytest.fixture
def make_mirror(tmp_path, upstream):
    started: list[Mirror] = []
    counter = itertools.count()

    def make(files, behaviours=None, policy="on_demand") -> defer.Deferred[Mirror]:
        folder = tmp_path / f"mirror{next(counter)}"
        folder.mkdir()
        mirror = Mirror(folder, upstream, files, behaviours, policy)
        started.append(mirror)
        return defer.ensureDeferred(mirror.start())

    yield make
    for mirror in started:
        pytest_twisted.blockon(defer.ensureDeferred(mirror.stop()))
