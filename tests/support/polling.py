"""Waiting for a condition in a test without sleeping through fixed delays."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor, task


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Return as soon as ``condition()`` is true (checked every 10 ms); fail after *timeout*."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"condition not reached within {timeout} s")
