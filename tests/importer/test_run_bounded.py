"""`importer.sync.run_bounded`: at most N at a time, items pulled lazily, work that finishes at
once does not grow the stack, a failure ends the run, cancelling cancels the work in flight."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from importer.sync import run_bounded


def _result(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def test_bounded_and_lazy() -> None:
    pending: list[defer.Deferred[None]] = []
    pulled: list[int] = []

    def items() -> Any:
        for i in range(7):
            pulled.append(i)
            yield i

    def work(_: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        pending.append(d)
        return d

    done = run_bounded(items(), work, 3)
    assert len(pending) == 3 and pulled == [0, 1, 2]
    while pending:
        pending.pop(0).callback(None)
        assert len(pending) <= 3
    assert pulled == list(range(7)) and _result(done) is None


def test_work_done_at_once_keeps_the_stack_flat() -> None:
    seen: list[int] = []
    done = run_bounded(range(20_000), lambda i: defer.succeed(seen.append(i)), 2)
    assert _result(done) is None and len(seen) == 20_000


def test_a_failure_ends_the_run() -> None:
    def work(i: int) -> defer.Deferred[None]:
        return defer.fail(ValueError(f"bad {i}")) if i == 3 else defer.succeed(None)

    failure = _result(run_bounded(range(10), work, 1))
    assert isinstance(failure, Failure) and failure.check(ValueError)


def test_cancel_cancels_the_work_in_flight() -> None:
    cancelled: list[int] = []

    def work(i: int) -> defer.Deferred[None]:
        return defer.Deferred(lambda _: cancelled.append(i))

    done = run_bounded(range(10), work, 2)
    done.cancel()
    failure = _result(done)
    assert isinstance(failure, Failure) and failure.check(defer.CancelledError)
    assert sorted(cancelled) == [0, 1]
