"""Sync progress: a tqdm bar on a terminal, plain periodic lines in logs, and the summary.

A sync reports each finished file to an `IProgress`; `make_progress` picks the right one for
the output stream. Plain output is throttled (one line every few seconds, and at the end), so
a 100,000-file sync writes a handful of lines, not one per file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from zope.interface import Interface, implementer

from downloaders.urls import redact_url

#: Outcomes a sync reports per file.
DOWNLOADED = "downloaded"
ALREADY_PRESENT = "already_present"
FAILED = "failed"


class IProgress(Interface):
    """Receives a sync's progress; must be cheap, it is called once per file."""

    def start(remote_name, total):  # type: ignore[no-untyped-def]
        """A remote's download phase begins with *total* files to consider."""

    def advance(outcome):  # type: ignore[no-untyped-def]
        """One file is done: DOWNLOADED, ALREADY_PRESENT or FAILED."""

    def finish():  # type: ignore[no-untyped-def]
        """The phase ended (also after a failure or cancellation)."""


@implementer(IProgress)
class NoProgress:
    """Reports nothing (library use, tests)."""

    def start(self, remote_name: str, total: int) -> None:
        pass

    def advance(self, outcome: str) -> None:
        pass

    def finish(self) -> None:
        pass


@implementer(IProgress)
class LineProgress:
    """Plain progress lines, at most one every *interval* seconds, plus a final one."""

    def __init__(
        self,
        stream: TextIO,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.counts: dict[str, int] = {}
        self.name = ""
        self.total = 0
        self.done = 0
        self._next = 0.0

    def start(self, remote_name: str, total: int) -> None:
        self.name, self.total, self.done = remote_name, total, 0
        self.counts = {DOWNLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0}
        self._next = self.clock() + self.interval

    def advance(self, outcome: str) -> None:
        self.done += 1
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        now = self.clock()
        if now >= self._next:
            self._next = now + self.interval
            self._write()

    def finish(self) -> None:
        self._write()

    def _write(self) -> None:
        percent = 100 * self.done // self.total if self.total else 100
        self.stream.write(
            f"sync {self.name}: {self.done}/{self.total} files ({percent}%): "
            f"{self.counts.get(DOWNLOADED, 0)} downloaded, "
            f"{self.counts.get(ALREADY_PRESENT, 0)} already present, "
            f"{self.counts.get(FAILED, 0)} failed\n"
        )
        self.stream.flush()


@implementer(IProgress)
class BarProgress:
    """A tqdm progress bar (for a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._bar: Any = None
        self._failed = 0

    def start(self, remote_name: str, total: int) -> None:
        from tqdm import tqdm

        self._failed = 0
        self._bar = tqdm(
            total=total, desc=f"sync {remote_name}", unit="file", file=self.stream, leave=True
        )

    def advance(self, outcome: str) -> None:
        if self._bar is None:
            return
        if outcome == FAILED:
            self._failed += 1
            self._bar.set_postfix(failed=self._failed, refresh=False)
        self._bar.update(1)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_progress(stream: TextIO | None = None) -> Any:
    """A tqdm bar when *stream* (default stderr) is a terminal, plain lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return BarProgress(stream)
    return LineProgress(stream)


def format_report(report: Any) -> str:
    """The end-of-sync summary of one `SyncReport`, one line plus one line per failure."""
    lines = [
        f"{report.remote}: {report.downloaded} downloaded, "
        f"{report.already_present} already present, {report.recorded_lazily} recorded lazily, "
        f"{len(report.failed)} failed, {report.removed} removed in {report.duration:.1f}s"
    ]
    lines.extend(f"  failed: {redact_url(url)}: {reason}" for url, reason in report.failed)
    return "\n".join(lines)
