"""Fixtures for downloader tests: an agent whose connection pool is closed after each test,
and helpers to wait for real-reactor events while a `Clock` drives the downloader's timers.

Test modules import the fixtures by their function names (``pool_fixture``, ``agent_fixture``)
and use them as ``pool`` and ``agent``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from downloaders.direct_get import DirectGetAgent
from downloaders.factory import CachingEndpointFactory
from tests.support.upstream import UpstreamServer


@pytest.fixture(name="pool")
def pool_fixture(upstream: UpstreamServer) -> Iterator[HTTPConnectionPool]:
    """A persistent pool, closed before the upstream checks for leaked connections."""
    connection_pool = HTTPConnectionPool(reactor, persistent=True)
    yield connection_pool
    pytest_twisted.blockon(connection_pool.closeCachedConnections())


def client_agent(http_client: str, pool: HTTPConnectionPool) -> Any:
    """An agent on the real reactor for client *http_client*: a plain ``Agent`` (like the one
    HttpDownloader builds by default), or `DirectGetAgent` over one, as a factory has it."""
    agent = Agent(reactor, pool=pool)
    if http_client == "twisted":
        return agent
    endpoints = CachingEndpointFactory(reactor, BrowserLikePolicyForHTTPS(), None)
    return DirectGetAgent(endpoints, agent)


@pytest.fixture(name="agent")
def agent_fixture(pool: HTTPConnectionPool, http_client: str) -> Iterator[Any]:
    """`client_agent` for this test's client; its idle connections are closed after it."""
    agent = client_agent(http_client, pool)
    yield agent
    if isinstance(agent, DirectGetAgent):
        pytest_twisted.blockon(agent.close_idle())


def delayed_at(clock: task.Clock) -> list[float]:
    """When the clock's pending calls are due, sorted (e.g. ``[7.0]`` for one backoff)."""
    return sorted(call.getTime() for call in clock.getDelayedCalls())


@defer.inlineCallbacks
def through_backoffs(clock: task.Clock, d: defer.Deferred[Any], timeout: float = 10.0) -> Any:
    """Wait on the real reactor until ``d`` fires, advancing ``clock`` to each timer it holds
    (the backoff delays: give the downloader ``sock_read_timeout=0``). Returns the delays
    waited, e.g. ``[1.0, 2.0]``; the caller then yields ``d`` for its result or error."""
    delays: list[float] = []
    waited = 0.0
    while not d.called:
        due = delayed_at(clock)
        if due:
            delays.append(due[0] - clock.seconds())
            clock.advance(due[0] - clock.seconds())
            continue
        if waited >= timeout:
            raise AssertionError(f"download still running after {timeout}s")
        yield task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01
    return delays
