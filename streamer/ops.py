"""Operator endpoints: ``/metrics`` (Prometheus text format) and ``/healthz`` (load balancers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from streamer.metrics import CONTENT_TYPE, Metrics

__all__ = ["HealthResource", "MetricsResource"]


def plain_text(request: Request, code: int, text: str) -> bytes:
    """Set *code* and plain-text, uncacheable headers; return *text* as the body to render."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return text.encode()


class MetricsResource(Resource):
    """Serves the service's own metrics registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics, clock: Any = None) -> None:
        super().__init__()
        self._metrics = metrics
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock

    def render_GET(self, request: Request) -> bytes | int:
        """The figures now (one process), or once every other process wrote what it counted
        before this request (several: `Metrics.settled`)."""
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        request.setHeader(b"cache-control", b"no-store")
        settled = self._metrics.settled(self._clock)
        if settled.called:
            return self._metrics.render()
        settled.addCallback(lambda _: self._answer(request))
        settled.addErrback(lambda failure: failure.trap(defer.CancelledError))
        request.notifyFinish().addErrback(lambda _: settled.cancel())
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        body = self._metrics.render()
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)  # (nothing of it for HEAD: Twisted writes the head only)
        request.finish()

    def render_HEAD(self, request: Request) -> bytes | int:
        return self.render_GET(request)


class HealthResource(Resource):
    """200 ``ok`` while the service accepts work; 503 ``starting`` before it is ready (while
    *starting* says so), 503 ``shutting down`` after, and 503 with the reason while *problem*
    names one (storage that cannot take new files: ``storage read-only (EROFS: ...)``)."""

    isLeaf = True

    def __init__(
        self,
        healthy: Callable[[], bool],
        starting: Callable[[], bool] = lambda: False,
        problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__()
        self._healthy = healthy
        self._starting = starting
        self._problem = problem

    def render_GET(self, request: Request) -> bytes:
        if self._healthy():
            problem = self._problem()
            if problem is not None:
                return plain_text(request, 503, f"{problem}\n")
            return plain_text(request, 200, "ok\n")
        if self._starting():
            return plain_text(request, 503, "starting\n")
        return plain_text(request, 503, "shutting down\n")

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)
