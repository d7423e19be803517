"""Small helpers the benchmark scripts share: free ports, waiting for a listener, the machine,
nginx as upstream and proxy, and the raw record of each run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
RAW = BENCH / "raw"


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


@attrs.define
class Nginx:
    """nginx from ``peers/nginx.conf.in``: *root* served on *static_port* (the upstream, with
    an access log that counts requests) and proxied on *proxy_port*, state kept in *work*."""

    root: Path
    static_port: int
    proxy_port: int
    work: Path

    @property
    def access_log(self) -> Path:
        return self.work / "access.log"

    def start(self) -> None:
        """Write the configuration and start nginx; return once the upstream port answers."""
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        # As root, nginx's workers would become nobody and could not read a private (0700)
        # fixture folder such as a test's tmp_path: keep the invoking user.
        user_line = "user root;" if os.geteuid() == 0 else ""
        config = (
            (PEERS / "nginx.conf.in")
            .read_text()
            .format(
                user_line=user_line,
                root=self.root.resolve(),
                work=self.work.resolve(),
                static_port=self.static_port,
                proxy_port=self.proxy_port,
            )
        )
        conf = self.work / "nginx.conf"
        conf.write_text(config)
        subprocess.run(["nginx", "-c", str(conf.resolve())], check=True, capture_output=True)
        wait_port(self.static_port)
        wait_port(self.proxy_port)

    def stop(self) -> None:
        """Stop the master (it stops its workers); nothing when it never started."""
        try:
            os.kill(int((self.work / "nginx.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def make_fixture(root: Path, count: int, size: int, big: int = 0) -> None:
    """The upstream repository: ``peers/fixture.py`` run as a script (standard library only)."""
    args = [str(root), "--count", str(count), "--size", str(size), "--big", str(big)]
    subprocess.run(
        [sys.executable, str(PEERS / "fixture.py"), *args], check=True, capture_output=True
    )


def git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when it has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}+dirty" if commit and dirty else commit or "unknown"


def record_raw(bench: str, raw: dict) -> Path:
    """Keep one run's raw numbers beside RESULTS.md: ``raw/<bench>-<UTC time>-<commit>.json``,
    with the command line, commit and machine, so a figure in RESULTS.md can be traced."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    commit = git_commit()
    RAW.mkdir(exist_ok=True)
    path = RAW / f"{bench}-{when}-{commit}.json"
    record = {
        "command": " ".join(["python", *sys.argv]),
        "commit": commit,
        "utc": when,
        "machine": machine(),
        "raw": raw,
    }
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"raw numbers: {path.relative_to(BENCH.parent)}")
    return path


def start_aiohttp_proxy(upstream: str, port: int, store: Path) -> subprocess.Popen:
    """The aiohttp peer (``peers/aiohttp_proxy.py``, sha256 like ours) on *port*, caching
    *upstream* in *store*."""
    return subprocess.Popen(
        [sys.executable, str(PEERS / "aiohttp_proxy.py"), "--upstream", upstream]
        + ["--port", str(port), "--store", str(store), "--digests", "sha256"]
    )


def streamer_config(path: Path, port: int, var: Path, upstream: str, *extra: str) -> Path:
    """A streamer.toml at *path*: listening on *port*, storage *var*, one ``on_demand`` remote
    "bench" (served under /bench/) at *upstream*; *extra* lines go into ``[server]``."""
    path.write_text(
        f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        + "".join(f"{line}\n" for line in extra)
        + f'[storage]\npath = "{var}"\n'
        f'[[remotes]]\nname = "bench"\nurl = "{upstream}/PULP_MANIFEST"\n'
        'policy = "on_demand"\nbase_path = "bench"\n'
    )
    return path


def start_streamer(
    config: Path, log: Path, env: dict | None = None, *twistd: str
) -> subprocess.Popen:
    """``twistd -n streamer --config CONFIG`` (its log in *log*; *twistd* options before the
    plugin name), in the configuration's folder."""
    return subprocess.Popen(
        ["twistd", "-n", "--pidfile=", "--logfile", log, *twistd, "streamer", "--config", config],
        cwd=config.parent,
        env=env,
    )


def group_pids(first: int) -> list[int]:
    """The first process and its children (the helpers)."""
    pids = [first]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == first:
                pids.append(int(entry.name))
    return pids


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 60 s; return once the process ended."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
