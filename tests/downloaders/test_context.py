"""`DownloadContext.resolve_once`: one computation per key, shared by concurrent callers,
failures not kept, stale values forgotten."""

from __future__ import annotations

from twisted.internet import defer

from downloaders import BaseDownloader
from downloaders.context import DownloadContext


def test_concurrent_callers_share_one_computation():
    context = DownloadContext()
    pending: list[defer.Deferred[str]] = []

    def compute() -> defer.Deferred[str]:
        pending.append(defer.Deferred())
        return pending[-1]

    results: list[str] = []
    for _ in range(5):
        context.resolve_once("token", compute).addCallback(results.append)
    assert len(pending) == 1 and results == []
    pending[0].callback("t1")
    assert results == ["t1"] * 5
    context.resolve_once("token", compute).addCallback(results.append)
    assert len(pending) == 1 and results[-1] == "t1"
    assert context.computed == {"token": 1}


def test_a_failure_is_not_kept_and_a_cancelled_waiter_does_not_stop_the_others():
    context = DownloadContext()
    attempts: list[defer.Deferred[str]] = []

    def compute() -> defer.Deferred[str]:
        attempts.append(defer.Deferred())
        return attempts[-1]

    failed: list[object] = []
    first = context.resolve_once("k", compute)
    first.addErrback(failed.append)
    second = context.resolve_once("k", compute)
    second.cancel()
    second.addErrback(lambda f: None)
    attempts[0].errback(RuntimeError("down"))
    assert len(failed) == 1
    got: list[str] = []
    context.resolve_once("k", compute).addCallback(got.append)
    assert len(attempts) == 2, "the failure was not cached"
    attempts[1].callback("v")
    assert got == ["v"]
    context.forget("k", stale="other")
    assert context.values == {"k": "v"}, "a value refreshed meanwhile is kept"
    context.forget("k", stale="v")
    assert context.values == {}


def test_a_downloader_without_a_factory_has_a_context_of_its_own():
    one, two = BaseDownloader("x://a"), BaseDownloader("x://b")
    assert isinstance(one.context, DownloadContext) and one.context is not two.context
    shared = DownloadContext()
    assert BaseDownloader("x://c", context=shared).context is shared
