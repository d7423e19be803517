"""Access and upstream-failure logs through ``twisted.logger``; text or JSON, never secrets.

One event per finished (or aborted) request, namespace ``streamer.access``, with the fields
``client``, ``method``, ``path`` (no query string, so never a signature), ``status``,
``bytes``, ``duration`` (seconds), ``cache`` (``request.cache_status``: ``hit``, ``miss``,
``coalesced``, or ``-``), ``complete`` (False when the connection was lost first) and ``line``
(the message, rendered once: `access_line`).
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
import time
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from twisted.web.server import Request

from downloaders.urls import redact_url

__all__ = [
    "RequestLog",
    "access_line",
    "json_file_observer",
    "json_observer",
    "json_record",
    "pack_access",
    "pack_event",
    "unpack_access",
    "unpack_event",
]

ACCESS_NAMESPACE = "streamer.access"

#: The message of an access event is its line, rendered once by `access_line` and carried as
#: the event's format itself (`literal_format`): with no field to look up, every text
#: observer's formatting of it is the parse of one literal (a format with one field cost a
#: third more, one with seven four times as much, at every line).
#: The system a text observer shows for an access event of this process (what it would work
#: out from the namespace and level at every line).
ACCESS_SYSTEM = "streamer.access#info"
UPSTREAM_FORMAT = "upstream failure: {url}: {reason}{detail_suffix}"


#: The fields of an access event that its JSON line carries, besides the common four.
ACCESS_FIELDS = ("method", "path", "status", "bytes", "duration", "cache", "upstream_status")


#: The fields of an access event (besides ``line``), in the order a helper process relays
#: them to the first one (`pack_access`).
ACCESS_KEYS = (
    "client",
    "method",
    "path",
    "status",
    "bytes",
    "duration",
    "seconds",
    "cache",
    "upstream_status",
    "complete",
)


def access_line(fields: dict[str, Any]) -> str:
    """The text of an access line: ``client "METHOD path" status bytes 0.001s cache=hit``."""
    lost = "" if fields["complete"] else " (connection lost)"
    return (
        f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]} '
        f"{fields['bytes']} {fields['seconds']}s cache={fields['cache']}{lost}"
    )


def pack_access(event: dict[str, Any]) -> str | None:
    """An access event as one compact JSON array (its time, then `ACCESS_KEYS`), or None for
    any other event. Twisted's ``eventAsJSON`` costs several times more: it flattens every
    field of the format and encodes the logger, level and source objects."""
    if event.get("log_namespace") != ACCESS_NAMESPACE or "log_failure" in event:
        return None
    try:
        return json.dumps([event.get("log_time"), *(event[key] for key in ACCESS_KEYS)])
    except (KeyError, TypeError, ValueError):
        return None  # not one of ours: the generic encoding carries it


def unpack_access(text: str) -> dict[str, Any]:
    """The access event `pack_access` encoded (raises ValueError for anything else)."""
    values = json.loads(text)
    if not isinstance(values, list) or len(values) != len(ACCESS_KEYS) + 1:
        raise ValueError("not a packed access event")
    fields = dict(zip(ACCESS_KEYS, values[1:], strict=True))
    return _access_event(fields, values[0])


def pack_event(event: dict[str, Any]) -> str:
    """*event* as one line of JSON for another process (`unpack_event`): an access event
    packed (`pack_access`), anything else as Twisted's ``eventAsJSON``, with a failure's
    exception as its text (Twisted's JSON cannot carry an exception: it arrived as
    ``{'unpersistable': True}``), so the other process writes the failure as this one would."""
    packed = pack_access(event)
    if packed is not None:
        return packed
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        portable = Failure.__new__(Failure)
        portable.__setstate__(failure.__getstate__())  # its frames, not its traceback objects
        portable.value = safe_str(failure.value)  # type: ignore[assignment]
        event = {**event, "log_failure": portable}
    return eventAsJSON(event)


def unpack_event(text: str) -> dict[str, Any]:
    """The event `pack_event` encoded (raises ValueError if *text* is not one). A failure's
    exception is rebuilt from its text as an exception of the same module and name, so its
    message, traceback and `Failure.check` read as the original's."""
    if text.startswith("["):
        return unpack_access(text)
    event: dict[str, Any] = eventFromJSON(text)
    failure = event.get("log_failure")
    message: Any = getattr(failure, "value", None)
    if isinstance(failure, Failure) and isinstance(message, str):
        named: Any = failure.type
        kind = type(named.__name__, (Exception,), {"__module__": named.__module__})
        failure.type, failure.value = kind, kind(message)
    return event


def literal_format(text: str) -> str:
    """A ``log_format`` that renders as *text* (its braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def _access_event(fields: dict[str, Any], when: float | None) -> dict[str, Any]:
    line = access_line(fields)
    return {
        **fields,
        "line": line,
        "log_format": literal_format(line),
        "log_namespace": ACCESS_NAMESPACE,
        "log_level": LogLevel.info,
        "log_system": ACCESS_SYSTEM,
        "log_time": when,
        "log_source": None,
    }


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
    if record["logger"] == ACCESS_NAMESPACE:
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
        fields = {
            "client": _client(request),
            "method": _text(request.method),
            "path": _text(request.path),
            "status": int(request.code),
            "bytes": int(request.sentLength),
            "duration": float(duration),
            "seconds": f"{duration:.3f}",
            "cache": getattr(request, "cache_status", None) or "-",
            "upstream_status": getattr(request, "upstream_status", None),
            "complete": complete,
        }
        # Built here and handed to the observer: what `Logger.info` adds is not needed.
        self._observer(_access_event(fields, time.time()))

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
