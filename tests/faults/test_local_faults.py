"""Local faults, driven from outside: other processes on the same storage, a full or read-only
storage, too few file descriptors, and files in ``artifacts/`` that are not regular files.

Each test runs the real service (in this process, or ``twistd -n streamer`` as a child) and
real clients or a real ``streamer sync`` beside it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest_twisted

from store.tempdirs import FOLDER_PREFIX
from streamer.config import load_config
from streamer.service import StreamerService
from tests.support.clients import run_process
from tests.support.faults import Serve, Trickle
from tests.support.polling import until
from tests.support.upstream import UpstreamServer

STREAMER = ["-m", "streamer.cli"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_config(folder: Path, upstream: UpstreamServer, policy: str = "immediate") -> Path:
    """A configuration with storage under *folder*/var and one remote at *upstream*/repo."""
    config = folder / "streamer.toml"
    config.write_text(
        "[server]\n"
        'listen = "tcp:0:interface=127.0.0.1"\n'
        "grace_period = 1\n"
        "[storage]\n"
        f'path = "{folder / "var"}"\n'
        "[[remotes]]\n"
        'name = "repo"\n'
        f'url = "{upstream.url("/repo/PULP_MANIFEST")}"\n'
        f'policy = "{policy}"\n'
        "max_retries = 0\n"
    )
    return config


def publish(upstream: UpstreamServer, files: dict[str, bytes], behaviour=Serve) -> None:
    lines = "".join(f"{name},{sha256(data)},{len(data)}\n" for name, data in files.items())
    upstream.register("/repo/PULP_MANIFEST", Serve(lines.encode()))
    for name, data in files.items():
        upstream.register(f"/repo/{name}", behaviour(data))


def temp_files(root: Path) -> list[Path]:
    """Every file under the storage's tmp/ (the lock files beside the folders aside)."""
    return [p for p in (root / "tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]


# -- other processes on the same storage ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_service_started_and_stopped_beside_a_running_sync_leaves_its_files(
    tmp_path, upstream
):
    """The service cleans tmp/ at start and stop; a sync downloading into the same storage
    meanwhile completes, and every one of its files is committed."""
    files = {f"f{i}.bin": os.urandom(3000) for i in range(4)}
    # About 2 s per file: the sync is mid-download while the service starts and stops.
    publish(upstream, files, lambda data: Trickle(data, bytes_per_sec=1500, interval=0.05))
    config = write_config(tmp_path, upstream)
    var = tmp_path / "var"
    sync = run_process(sys.executable, *STREAMER, "--config", str(config), "sync", timeout=30)
    # Every file has started (its bytes are in a temp file of the sync; the listing too).
    await until(lambda: sum(p.stat().st_size > 0 for p in temp_files(var)) > 4, timeout=10)
    assert not sync.called

    service = StreamerService(load_config(config, environ={}))
    service.startService()
    await until(lambda: service.ready)
    await service.stopService()
    assert not sync.called, "the sync should still be downloading"

    code, out, err = await sync
    assert code == 0, (out + err).decode()
    for data in files.values():
        digest = sha256(data)
        assert (var / "artifacts" / digest[:2] / digest[2:]).read_bytes() == data
    assert list((var / "tmp").iterdir()) == []  # each process removed its own folder


@pytest_twisted.ensureDeferred
async def test_service_start_removes_the_files_of_a_process_that_died(tmp_path, upstream):
    """A process killed mid-download leaves its folder; its lock went with it, so the next
    service start removes the folder at once (however young), and a loose file too."""
    config = write_config(tmp_path, upstream)
    var = tmp_path / "var"
    crash = (
        "import os, sys\n"
        "from store import ArtifactStorage\n"
        "storage = ArtifactStorage(sys.argv[1])\n"
        "with open(os.path.join(storage.temp_dir, '.download-x'), 'wb') as f:\n"
        "    f.write(b'partial')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    code, _out, err = await run_process(sys.executable, "-c", crash, str(var))
    assert code == -9, err.decode()
    (left,) = temp_files(var)
    assert left.parent.name.startswith(FOLDER_PREFIX)

    service = StreamerService(load_config(config, environ={}))
    service.startService()
    try:
        await until(lambda: service.ready)
        assert temp_files(var) == []
        assert [p.name for p in (var / "tmp").iterdir()] == []
    finally:
        await service.stopService()
