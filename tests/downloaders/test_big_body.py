"""A 256 MiB body streams through with memory far below its size."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest_twisted

from downloaders import HttpDownloader
from tests.downloaders.support import agent_fixture, pool_fixture  # noqa: F401 (fixtures)
from tests.support.faults import Generated

SIZE = 256 * 1024 * 1024


@pytest_twisted.inlineCallbacks
def test_256_mib_body_with_small_peak_memory(upstream, agent, tmp_path: Path):
    body = Generated(SIZE, seed=b"big")
    url = upstream.register("/big.bin", body)
    expected = body.sha256()
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
    assert result.artifact_attributes == {"size": SIZE, "sha256": expected}
    assert Path(result.path).stat().st_size == SIZE
    # Server and client share this process: both together stay far below the body size.
    print(f"256 MiB body: peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"
