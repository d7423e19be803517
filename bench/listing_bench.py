"""CPU the service spends on one folder listing of many entries.

Records ``--entries`` files in one folder of a remote's catalog (lazy, nothing stored), starts
``twistd -n streamer`` on it, then GETs the folder ``--requests`` times with curl and reports,
per GET (the first one cold), the service's CPU time (user + system, from /proc/<pid>/stat),
the wall time and the body size. Run from the repository root::

    python bench/listing_bench.py --entries 50000 --requests 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from store import CatalogEntry, open_catalog
from streamer.config import load_config

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(config: Path, count: int) -> None:
    from twisted.internet import defer, task

    settings = load_config(config, environ={})

    async def fill(reactor) -> None:
        catalog = open_catalog(settings.catalog.url, settings.storage.path, reactor=reactor)
        await catalog.open()
        entries = (
            CatalogEntry(
                f"big/{i:06d}.rpm",
                "big",
                f"http://127.0.0.1:1/{i:06d}.rpm",
                1000 + i,
                {"sha256": hashlib.sha256(b"%d" % i).hexdigest()},
            )
            for i in range(count)
        )
        await catalog.replace_remote("big", entries)
        await catalog.close()

    task.react(lambda reactor: defer.ensureDeferred(fill(reactor)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--query", default="", help="appended to the folder URL (e.g. page=2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "streamer.toml"
        config.write_text(
            f'[storage]\npath = "{folder}/var"\n'
            '[[remotes]]\nname = "big"\nurl = "http://127.0.0.1:1/PULP_MANIFEST"\n'
        )
        if os.fork() == 0:  # record in a child: its reactor must not be this process's
            try:
                record(config, args.entries)
            finally:
                os._exit(0)  # task.react exits; the folder is the parent's to remove
        os.wait()
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
            + ["-n", "--pidfile=", "streamer"]
            + ["--config", str(config), "--listen", f"tcp:{port}:interface=127.0.0.1"],
            stdout=open(Path(folder) / "service.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}/big/" + (f"?{args.query}" if args.query else "")
            health = f"http://127.0.0.1:{port}/healthz"
            for _ in range(100):  # ready (the first listing GET below is the cold one)
                done = subprocess.run(
                    ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", health],
                    capture_output=True,
                    text=True,
                )
                if done.stdout == "200":
                    break
                time.sleep(0.1)
            for _ in range(args.requests):
                before, started = cpu_seconds(server.pid), time.monotonic()
                done = subprocess.run(
                    ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url],
                    capture_output=True,
                    text=True,
                )
                wall = time.monotonic() - started
                cpu = cpu_seconds(server.pid) - before
                print(f"GET {url}: {done.stdout} bytes, service CPU {cpu:.3f} s, wall {wall:.3f} s")
        finally:
            server.terminate()
            server.wait()
            if server.returncode:
                print((Path(folder) / "service.log").read_text()[-2000:])


if __name__ == "__main__":
    main()
