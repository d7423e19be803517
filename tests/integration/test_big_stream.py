"""One large cold download through a real ``twistd -n streamer`` uses two cores: its hashing
and its temp-file writes run on threads beside the reactor (`downloaders.inorder`), while the
reactor reads the upstream and sends to the clients; and the promises hold on that path.

Measured from outside, in the kernel's accounting of each thread of the process
(``/proc/PID/task/TID/stat``): a split of CPU time, not a timing, so a busy machine does not
change the outcome.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest_twisted

from tests.integration.test_end_to_end import artifact_path, sha256, streamer_cli, write_config
from tests.support.faults import Serve
from tests.support.twistd import twistd
from tests.support.upstream import UpstreamServer

MIB = 1 << 20


def thread_cpu(pid: int) -> dict[int, int]:
    """Clock ticks (user + system) used so far by each thread of *pid*."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


async def one_process_service(tmp_path: Path, upstream: UpstreamServer, files: dict[str, bytes]):
    lines = "".join(f"{name},{sha256(data)},{len(data)}\n" for name, data in files.items())
    upstream.register("/repo/PULP_MANIFEST", Serve(lines.encode()))
    for name, data in files.items():
        upstream.register(f"/repo/{name}", Serve(data))
    config = write_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"))
    config.write_text(config.read_text().replace("[server]\n", "[server]\nprocesses = 1\n", 1))
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    return config


@pytest_twisted.ensureDeferred
async def test_a_large_cold_download_hashes_and_writes_beside_the_reactor(tmp_path):
    data = os.urandom(96 * MIB)
    upstream = await UpstreamServer().start()
    try:
        config = await one_process_service(tmp_path, upstream, {"big.bin": data})
        async with twistd(config) as served:
            pid = served.process.pid
            before = thread_cpu(pid)
            code, body, err = await served.curl("/demo/big.bin", "-sS", "--max-time", "60")
            after = thread_cpu(pid)
            assert code == 0, err
            assert body == data
            used = {tid: after[tid] - before.get(tid, 0) for tid in after}
            reactor_ticks = used.pop(pid)  # the main thread runs the reactor
            beside = sum(used.values())
            # Before: every tick on the reactor thread (the commit's thread costs next to
            # nothing). sha256 alone is a good third of what the old reactor thread did.
            assert beside >= 0.25 * (beside + reactor_ticks), (reactor_ticks, used)
            assert artifact_path(tmp_path / "var", data).read_bytes() == data
    finally:
        await upstream.stop()
