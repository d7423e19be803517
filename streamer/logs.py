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

Access lines skip the observers where their destination is known (`RequestLog.write_lines`):
a file or standard output of ``access_log``, or twistd's log when it is one file observer that
renders an access event exactly as `render_text` or `render_json` do (`twistd_log` checks by
rendering a sample). Each is rendered once, with its timestamp's second formatted once per
second, and the lines of `ACCESS_DELAY` seconds are written together (`LineBatch`) in one ``write``
(on a pipe or terminal that others write to as well, in pieces of whole lines of at most
``PIPE_BUF`` bytes, which a pipe writes atomically), so the lines of several processes
appending to one file are never torn. Where the destination is not known they are events for
the observers, as any other.

A JSON line is one flat object (`json_record`): ``time`` (ISO 8601, UTC, milliseconds),
``level``, ``logger`` (the namespace), ``message`` (rendered); for access lines ``method``,
``path``, ``status``, ``bytes``, ``duration``, ``cache`` and ``upstream_status``; for an event
carrying a failure, ``traceback`` (one string). Nothing else: an event's other fields are in
its message or nowhere.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
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
    formatTime,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from twisted.web.server import Request

from downloaders.urls import redact_url

__all__ = [
    "LineBatch",
    "RequestLog",
    "access_line",
    "fd_writer",
    "json_file_observer",
    "json_observer",
    "json_record",
    "pack_access",
    "pack_event",
    "render_json",
    "render_text",
    "twistd_log",
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


#: A batch of lines is written at once when this many characters wait.
BATCH_BYTES = 64 * 1024
#: Seconds access lines wait to be written with the others of that time (`LineBatch`).
ACCESS_DELAY = 0.1
#: The largest write a pipe takes atomically (POSIX: at least 512; Linux: 4096).
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


class _Second:
    """One second's timestamp text, made again only when the second changes."""

    def __init__(self, render: Callable[[float], str]) -> None:
        self._render = render
        self._second = -1
        self._text = ""

    def __call__(self, when: float) -> tuple[str, float] | None:
        """The text of *when*'s second and the fraction past it, or None where formatting
        *when* itself could round up into the next second."""
        second = int(when)
        fraction = when - second
        if not 0.0 <= fraction < 0.9995:
            return None
        if second != self._second:
            self._second, self._text = second, self._render(float(second))
        return self._text, fraction


_text_second = _Second(formatTime)
_iso_second = _Second(lambda when: _iso_time(when)[:-5])


def render_text(fields: dict[str, Any], line: str, when: float, system: str) -> str:
    """The access line as twistd's text observer writes it (``formatEventAsClassicLogText``:
    local time to the second, ``[system]``, the line with newlines indented)."""
    second = _text_second(when)
    stamp = second[0] if second is not None else formatTime(when)
    if "\n" in line:
        line = line.replace("\n", "\n\t")
    return f"{stamp} [{system}] {line}\n"


def render_json(fields: dict[str, Any], line: str, when: float, system: str = "") -> str:
    """The access line as `json_record` makes it, on one line."""
    second = _iso_second(when)
    if second is None:
        stamp = _iso_time(when)
    else:
        stamp = f"{second[0]}.{round(second[1] * 1e6) // 1000:03d}Z"
    record: dict[str, Any] = {
        "time": stamp,
        "level": "info",
        "logger": ACCESS_NAMESPACE,
        "message": line,
    }
    for name in ACCESS_FIELDS:
        record[name] = fields[name]
    return json.dumps(record, default=str) + "\n"


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def fd_writer(fd: int, shared: bool = True) -> Callable[[str], None]:
    """A function writing whole lines of text to *fd*: in one ``write`` to a regular file
    (opened to append: every process appends, none tears another's lines) or where nobody
    else writes (*shared* false); else (a pipe, a terminal, a socket others write to as
    well) in pieces of whole lines of at most `PIPE_BUF` bytes, which a pipe writes
    atomically (a longer line alone)."""
    whole = not shared or stat.S_ISREG(os.fstat(fd).st_mode)

    def write(text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        if whole or len(data) <= PIPE_BUF:
            _write_all(fd, data)
            return
        start = 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + PIPE_BUF) + 1
            if end <= start:  # one line longer than PIPE_BUF
                end = data.find(b"\n", start) + 1 or len(data)
            _write_all(fd, data[start:end])
            start = end

    return write


class LineBatch:
    """Lines written together *delay* seconds after the first of them (0: at the end of the
    reactor turn that made it), or as soon as `BATCH_BYTES` wait, so a busy process makes
    one ``write`` per turn or per *delay*, not one per line.

    Before and after the reactor runs, each line is written at once, and so is a line added
    by another thread (after the waiting ones, under a lock: lines never interleave);
    whatever waits is written at exit. A write that fails is dropped (the destination is
    gone or full), once said in the log.
    """

    def __init__(
        self, write: Callable[[str], None], reactor: Any = None, delay: float = 0.0
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._write = write
        self._reactor = reactor
        self._delay = delay
        # Reentrant: a signal handler that logs while this thread holds it must not hang.
        self._lock = threading.RLock()
        self._pending: list[str] = []
        self._size = 0
        self._flush_call: Any = None
        self._failed = False
        atexit.register(self.flush)

    def add(self, text: str) -> None:
        """Write *text* (whole lines) with the other lines waiting (see the class docstring)."""
        with self._lock:
            self._pending.append(text)
            self._size += len(text)
            later = (
                getattr(self._reactor, "running", False)
                and self._size < BATCH_BYTES
                and threadable.isInIOThread()
            )
            if later and self._flush_call is None:
                self._flush_call = self._reactor.callLater(self._delay, self.flush)
        if not later:
            self.flush()

    def flush(self) -> None:
        """Write every waiting line now."""
        with self._lock:
            call, self._flush_call = self._flush_call, None
            if call is not None and call.active() and threadable.isInIOThread():
                call.cancel()
            if not self._pending:
                return
            text, self._pending, self._size = "".join(self._pending), [], 0
            try:
                self._write(text)
            except (OSError, ValueError) as exc:  # ValueError: a closed file
                failed, self._failed = self._failed, True
                if not failed:
                    Logger(namespace="streamer.logs").error(
                        "cannot write log lines ({error}): dropping them", error=exc
                    )


def twistd_log(publisher: Any = globalLogPublisher) -> tuple[Callable[[str], None], bool] | None:
    """Where twistd's log can take access lines rendered here: ``(write, json)``, when
    *publisher* (the global one, which twistd gave its observer) has one observer and it is
    a file observer that renders an access event exactly as `render_text` (*json* false)
    or `render_json` (true) do; else None (another observer, syslog, a test's capture: the
    lines stay events)."""
    observers = getattr(publisher, "_observers", None)
    if not isinstance(observers, list) or len(observers) != 1:
        return None
    [observer] = observers
    out = getattr(observer, "_outFile", None)
    if not isinstance(observer, FileLogObserver) or out is None:
        return None
    encoding = getattr(observer, "_encoding", None)
    fields = {
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/{probe}\u00e9",
        "status": 200,
        "bytes": 5,
        "duration": 0.25,
        "seconds": "0.250",
        "cache": "hit",
        "upstream_status": None,
        "complete": True,
    }
    when = int(time.time()) + 0.5
    event = _access_event(fields, when)
    try:
        rendered = observer.formatEvent(event)
    except Exception:
        return None
    if rendered == render_text(fields, event["line"], when, ACCESS_SYSTEM):
        json = False
    elif rendered == render_json(fields, event["line"], when):
        json = True
    else:
        return None

    def write(text: str) -> None:
        out.write(text if encoding is None else text.encode(encoding))
        out.flush()

    return write, json


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
    """Emits access and upstream-failure events to one observer (default: the global log);
    access lines straight to their destination once it is known (`write_lines`)."""

    def __init__(
        self,
        observer: ILogObserver | None = None,
        file: IO[str] | None = None,
        path: str | None = None,
    ) -> None:
        self._observer = observer if observer is not None else globalLogPublisher
        self._file = file
        #: Where *file* was opened, for `reopen`.
        self._path = path
        self._upstream = Logger(namespace="streamer.upstream", observer=self._observer)
        self._lines: LineBatch | None = None
        self._render: Callable[[dict[str, Any], str, float, str], str] = render_text
        self._system = ACCESS_SYSTEM

    @classmethod
    def open(cls, destination: str, json: bool = False, reactor: Any = None) -> RequestLog:
        """A log writing to *destination*: "" the global log, "-" stdout, else a file path."""
        if not destination:
            return cls()
        file = sys.stdout if destination == "-" else open(destination, "a", encoding="utf-8")  # noqa: SIM115
        observer = json_file_observer(file) if json else textFileLogObserver(file)
        log = cls(observer, None if file is sys.stdout else file, destination)
        try:
            fd = file.fileno()
        except (AttributeError, OSError, ValueError):  # a stand-in without a descriptor
            return log
        log.write_lines(fd_writer(fd), json, reactor=reactor)
        return log

    def write_lines(
        self,
        write: Callable[[str], None],
        json: bool = False,
        system: str = ACCESS_SYSTEM,
        reactor: Any = None,
    ) -> None:
        """From now on, render each access line here (`render_json`, else `render_text`
        with *system*) and hand the lines of each `ACCESS_DELAY` seconds to *write* together."""
        self._lines = LineBatch(write, reactor, ACCESS_DELAY)
        self._render = render_json if json else render_text
        self._system = system

    def relay(self, text: str) -> None:
        """Write *text*, whole access lines another process rendered, with this process's
        waiting ones."""
        if self._lines is None:
            raise RuntimeError("relay needs write_lines first")
        self._lines.add(text)

    def reopen(self) -> bool:
        """Open the access log file again at its path (log rotation renamed it away): its
        descriptor now writes to the file there, made if need be. False: no file to reopen."""
        if self._file is None or self._path is None:
            return False
        if self._lines is not None:
            self._lines.flush()
        self._file.flush()
        fresh = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:  # the same descriptor number: every writer holding it follows
            os.dup2(fresh, self._file.fileno(), inheritable=False)
        finally:
            os.close(fresh)
        return True

    def close(self) -> None:
        if self._lines is not None:
            self._lines.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
            self._lines = None

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
        if self._lines is not None:
            self._lines.add(self._render(fields, access_line(fields), time.time(), self._system))
            return
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
