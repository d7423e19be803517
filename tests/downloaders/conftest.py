"""Fixtures of the downloaders tests: a real squid forward proxy (started once per session);
tests using ``http_client`` (the ``agent`` fixture does) run over both HTTP clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted

from tests.support.fixtures import parametrize_http_client
from tests.support.squid import Squid, squid_available

pytest_generate_tests = parametrize_http_client


@pytest.fixture(scope="session")
def squid() -> Iterator[Squid]:
    """A running squid with an open port and a port requiring proxy credentials."""
    reason = squid_available()
    if reason is not None:
        pytest.skip(reason)
    proxy = Squid()
    try:
        pytest_twisted.blockon(proxy.start())
        yield proxy
    finally:
        pytest_twisted.blockon(proxy.stop())
