"""A 256 MiB body streams through with memory far below its size, measured two ways: Python
allocations (tracemalloc: any bytes buffered by us, treq or twisted.web) and the process's peak
resident set (VmHWM, reset first: C-level buffers too)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest_twisted

from downloaders import HttpDownloader
from downloaders.http import READ_SIZE
from tests.downloaders.support import agent_fixture, pool_fixture  # noqa: F401 (fixtures)
from tests.support.faults import Generated

SIZE = 256 * 1024 * 1024
MIB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


@pytest_twisted.inlineCallbacks
def test_256_mib_body_with_small_peak_memory(upstream, agent, tmp_path: Path):
    body = Generated(SIZE, seed=b"big")
    url = upstream.register("/big.bin", body)
    expected = body.sha256()
    rss_measured = reset_peak_rss()
    rss_before = _status_kib("VmRSS") or 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = yield HttpDownloader(
            url,
            agent=agent,
            temp_dir=str(tmp_path),
            expected_size=SIZE,
            expected_digests={"sha256": expected},
        ).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = ((_status_kib("VmHWM") or 0) - rss_before) * 1024 if rss_measured else None
    assert result.artifact_attributes == {"size": SIZE, "sha256": expected}
    assert Path(result.path).stat().st_size == SIZE
    # Server and client share this process: both together stay far below the body size.
    growth = "n/a" if rss_growth is None else f"{rss_growth / MIB:.1f} MiB"
    print(f"256 MiB body: peak traced memory {peak / MIB:.1f} MiB, peak RSS growth {growth}")
    assert peak < 16 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"
    if rss_growth is not None:
        assert rss_growth < 32 * MIB, f"peak RSS grew by {rss_growth / MIB:.1f} MiB"


class _ChunkSizes:
    """A writer recording the size of every chunk the downloader hands over."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def write(self, data: bytes) -> None:
        self.sizes.append(len(data))


@pytest_twisted.inlineCallbacks
def test_upstream_reads_are_wider_than_twisteds_64_kib(upstream, agent):
    """Bodies are read up to READ_SIZE at a time, not Twisted's 64 KiB: a fast 32 MiB body
    arrives in chunks larger than 64 KiB (fewer reactor turns per byte)."""
    body = Generated(32 * MIB, seed=b"wide")
    url = upstream.register("/wide.bin", body)
    writer = _ChunkSizes()
    yield HttpDownloader(url, agent=agent, writer=writer, expected_size=32 * MIB).run()
    assert sum(writer.sizes) == 32 * MIB
    assert max(writer.sizes) > 64 * 1024, f"largest chunk {max(writer.sizes)} bytes"
    assert max(writer.sizes) <= READ_SIZE
