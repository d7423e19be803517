"""Fixtures of the downloaders tests: a real squid forward proxy (started once per session);
tests using ``http_client`` (the ``agent`` fixture does) run over both HTTP clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted

from tests.support.fixtures import parametrize_http_client
from tests.support.squid import Squid, squid_available

pytest_generate_tests = parametrize_http_client


@pytest.fixture(autouse=True)
def _in_a_temp_folder(tmp_path, monkeypatch) -> None:
    """Each test runs in its own folder: a downloader given no ``temp_dir`` writes its file in
    the working folder (as Pulp's do), and results a test keeps must not land in the checkout."""
    monkeypatch.chdir(tmp_path)


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
