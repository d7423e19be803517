"""Small helpers the benchmark scripts share: free ports, waiting for a listener, the machine."""

from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on 127.0.0.1:*port*; raise after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_model() -> str:
    """The CPU's model name (no host name or other identifying detail)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    """One line for a results table: cores, CPU model, Python version."""
    return f"{os.cpu_count()} CPUs, {cpu_model()}; Python {platform.python_version()}"


def set_aside(path: Path, trash: Path | None = None) -> None:
    """Move *path* (if it exists) into the folder *trash* (default: ``trash`` beside it), to
    be deleted after the last run.

    Deleting thousands of files right before a timed run would time ext4's inode allocator,
    not the contender: for some 30 s after a mass deletion, each new inode in the same block
    group is found by skipping over every recently deleted one (``recently_deleted`` in
    ``find_inode_bit``: about 45% of all CPU samples of one bare-loop sync under ``perf``), so
    whoever creates files after a deletion pays several times for each."""
    if path.exists():
        trash = trash or path.parent / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        path.rename(trash / f"{path.name}-{time.monotonic_ns()}")
