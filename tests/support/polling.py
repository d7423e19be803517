"""Waiting for a condition in a test without sleeping through fixed delays.

One poller, two answers: `until` fails the test when the condition does not come (the usual
case), `holds_within` says whether it came (for a test that words its own failure, or checks
that something does *not* happen). Both return Deferreds, so ``await`` and ``yield`` (in
``inlineCallbacks``) use them alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task

__all__ = ["holds_within", "until"]

#: How often the condition is checked (seconds).
STEP = 0.01


async def _poll(
    condition: Callable[[], object], timeout: float, errors: tuple[type[BaseException], ...]
) -> tuple[bool, object]:
    """(True, the condition's first true value), or (False, None) once *timeout* passed."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
        except errors:
            value = None
        if value:
            return True, value
        if reactor.seconds() >= deadline:
            return False, None
        await task.deferLater(reactor, STEP, lambda: None)


def until(
    condition: Callable[[], object],
    timeout: float = 5.0,
    *,
    what: str = "condition",
    output: Callable[[], bytes] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> defer.Deferred[Any]:
    """Fire with ``condition()``'s first true value (checked every 10 ms; an awaitable answer
    is awaited, an exception in *errors* counts as "not yet"); fail with AssertionError after
    *timeout* seconds, naming *what* and quoting the end of ``output()`` (a child's log)."""

    async def wait() -> Any:
        reached, value = await _poll(condition, timeout, errors)
        if reached:
            return value
        tail = f": {output().decode(errors='replace')[-3000:]}" if output is not None else ""
        raise AssertionError(f"{what} not reached within {timeout} s{tail}")

    return defer.ensureDeferred(wait())


def holds_within(condition: Callable[[], object], timeout: float = 5.0) -> defer.Deferred[bool]:
    """Fire with True as soon as ``condition()`` is true (checked every 10 ms), with False
    once *timeout* seconds passed."""

    async def wait() -> bool:
        reached, _ = await _poll(condition, timeout, ())
        return reached

    return defer.ensureDeferred(wait())
