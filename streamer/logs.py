"""Access and upstream-failure logs through ``twisted.logger``; text or JSON, never secrets.

One event per finished (or aborted) request, namespace ``streamer.access``, with the fields
``client``, ``method``, ``path`` (no query string, so never a signature), ``status``,
``bytes``, ``duration`` (seconds), ``cache`` (``request.cache_status``: ``hit``, ``miss``,
``coalesced``, or ``-``) and ``complete`` (False when the connection was lost first).
Access events also carry ``upstream_status``: the status the upstream answered the
download behind a lazy response with (None when no upstream was involved).
Upstream failures are events in namespace ``streamer.upstream`` with ``url`` (userinfo and
query masked by `downloaders.urls.redact_url`) and ``reason``.

By default events go to the global log publisher, i.e. twistd's log. ``[server] access_log``
sends them to standard output (``-``) or a file instead, as text or, with
``access_log_json = true``, one JSON object per line. ``twistd --logger
streamer.logs.json_observer`` makes twistd's own log JSON as well.

A JSON line is one flat object (`json_record`): ``time`` (ISO 8601, UTC, milliseconds),
``level``, ``logger`` (the namespace), ``message`` (rendered); for access lines ``method``,
``path``, ``status``, ``bytes``, ``duration``, ``cache`` and ``upstream_status``; for an event
carrying a failure, ``traceback`` (one string). Nothing else: an event's other fields are in
its message or nowhere.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.web.server import Request

from downloaders.urls import redact_url

__all__ = ["RequestLog", "json_file_observer", "json_observer", "json_record"]

ACCESS_FORMAT = '{client} "{method} {path}" {status} {bytes} {seconds}s cache={cache}{incomplete}'
UPSTREAM_FORMAT = "upstream failure: {url}: {reason}{detail_suffix}"


#: The fields of an access event that its JSON line carries, besides the common four.
ACCESS_FIELDS = ("method", "path", "status", "bytes", "duration", "cache", "upstream_status")


def _iso_time(seconds: float | None) -> str:
    moment = datetime.fromtimestamp(seconds if seconds is not None else 0.0, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_record(event: dict[str, Any]) -> dict[str, Any]:
    """The flat JSON object of one ``twisted.logger`` event (see the module docstring)."""
    level = event.get("log_level")
    failure = event.get("log_failure")
    message = formatEvent(event)
    if not message and failure is not None:
        message = failure.getErrorMessage()
    record: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": getattr(level, "name", "info"),
        "logger": event.get("log_namespace") or "-",
        "message": message,
    }
    if record["logger"] == "streamer.access":
        record.update((name, event.get(name)) for name in ACCESS_FIELDS)
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


def _json_line(event: dict[str, Any]) -> str:
    return json.dumps(json_record(event), default=str) + "\n"


def json_file_observer(file: IO[str]) -> ILogObserver:
    """An observer writing each event to *file* as one JSON line (`json_record`)."""
    return FileLogObserver(file, _json_line)


def json_observer() -> ILogObserver:
    """A JSON-lines observer on standard output, for ``twistd --logger``."""
    return json_file_observer(sys.stdout)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "backslashreplace")


def _client(request: Request) -> str:
    try:
        address = request.getClientAddress()
    except Exception:
        return "-"
    host = getattr(address, "host", None)
    return str(host) if host else "-"


class RequestLog:
    """Emits access and upstream-failure events to one observer (default: the global log)."""

    def __init__(self, observer: ILogObserver | None = None, file: IO[str] | None = None) -> None:
        self._observer = observer if observer is not None else globalLogPublisher
        self._file = file
        self._access = Logger(namespace="streamer.access", observer=self._observer)
        self._upstream = Logger(namespace="streamer.upstream", observer=self._observer)

    @classmethod
    def open(cls, destination: str, json: bool = False) -> RequestLog:
        """A log writing to *destination*: "" the global log, "-" stdout, else a file path."""
        if not destination:
            return cls()
        file = sys.stdout if destination == "-" else open(destination, "a", encoding="utf-8")  # noqa: SIM115
        observer = json_file_observer(file) if json else textFileLogObserver(file)
        return cls(observer, None if file is sys.stdout else file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def access(self, request: Request, duration: float, complete: bool = True) -> None:
        """Log one request (called by the site when the request finished or was lost)."""
        self._access.info(
            ACCESS_FORMAT,
            client=_client(request),
            method=_text(request.method),
            path=_text(request.path),
            status=int(request.code),
            bytes=int(request.sentLength),
            duration=float(duration),
            # Formatted here: a format spec ("{duration:.3f}") is lost when a helper
            # process's event is relayed as JSON (Twisted's flattened fields keep the value).
            seconds=f"{duration:.3f}",
            cache=getattr(request, "cache_status", None) or "-",
            upstream_status=getattr(request, "upstream_status", None),
            complete=complete,
            incomplete="" if complete else " (connection lost)",
        )

    def upstream_failure(
        self, url: str, reason: str, detail: str = "", metrics: Any | None = None
    ) -> None:
        """Log an upstream failure (and count it in *metrics*, a `streamer.metrics.Metrics`).

        *reason* is one of `streamer.metrics.UPSTREAM_REASONS`; *detail* is a short message
        that must not contain credentials (downloaders' error messages never do).
        """
        if metrics is not None:
            metrics.upstream_failure(reason)
        self._upstream.warn(
            UPSTREAM_FORMAT,
            url=redact_url(url),
            reason=reason,
            detail=detail,
            detail_suffix=f" ({detail})" if detail else "",
        )
