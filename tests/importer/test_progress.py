"""Progress output: a tqdm bar on a terminal, throttled plain lines otherwise, the summary."""

from __future__ import annotations

import io

from importer.progress import (
    ALREADY_PRESENT,
    DOWNLOADED,
    FAILED,
    BarProgress,
    LineProgress,
    format_report,
    make_progress,
)
from importer.sync import SyncReport


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_terminal_gets_a_bar_logs_get_lines():
    assert isinstance(make_progress(Terminal()), BarProgress)
    assert isinstance(make_progress(io.StringIO()), LineProgress)


def test_lines_are_throttled_not_one_per_file():
    out, clock = io.StringIO(), FakeClock()
    progress = LineProgress(out, interval=5.0, clock=clock)
    progress.start("fixtures", 1000)
    for i in range(1000):
        clock.now = i * 0.01  # just under 10 s: one periodic line, then the final one
        progress.advance(FAILED if i == 3 else ALREADY_PRESENT if i % 2 else DOWNLOADED)
    progress.finish()

    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("sync fixtures: 501/1000 files (50%)")
    assert lines[-1] == (
        "sync fixtures: 1000/1000 files (100%): 500 downloaded, 499 already present, 1 failed"
    )


def test_bar_counts_files_and_failures():
    out = Terminal()
    progress = BarProgress(out)
    progress.start("fixtures", 3)
    progress.advance(DOWNLOADED)
    progress.advance(FAILED)
    progress.advance(ALREADY_PRESENT)
    progress.finish()
    text = out.getvalue()
    assert "sync fixtures" in text and "3/3" in text and "failed=1" in text


def test_summary_names_every_failure():
    report = SyncReport(
        remote="fixtures",
        policy="immediate",
        downloaded=3,
        already_present=2,
        failed=[("http://127.0.0.1:1/a", "sha256 mismatch: expected x, got y")],
        removed=1,
        duration=1.25,
    )
    assert format_report(report).splitlines() == [
        "fixtures: 3 downloaded, 2 already present, 0 recorded lazily, 1 failed, 1 removed in 1.2s",
        "  failed: http://127.0.0.1:1/a: sha256 mismatch: expected x, got y",
    ]
