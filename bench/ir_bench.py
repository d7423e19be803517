#!/usr/bin/env python3
"""Instructions per small download through a factory's whole downloader stack, for two
versions: the A/B measure for the downloader side, where timing cannot resolve a change.

    python bench/ir_bench.py A B [--downloads 1000] [--size 16384]

*A* and *B* are git revisions of this repository or folders holding a source tree (as for
`pair_bench.py`). For each version, ``valgrind --tool=callgrind`` counts the user-space
instructions of a process that builds and runs downloads from a `DownloaderFactory`
(``build(url, expected_size, expected_digests, writer)``, ``run()``: the agent stack, the
attempt, `DirectGetAgent` parsing, digests, the result) on one fake keep-alive connection fed
a canned nginx answer (head and body in two packets), one at a time while nine other
downloads of the factory stay in flight (as under a streamer's load: their timers and
semaphore slots are there). Two runs, with a few and with ``--downloads`` more downloads;
their difference over ``--downloads`` is the figure, free of start-up. No socket, no other
process, ``PYTHONHASHSEED=0``: the count repeats to a few instructions, where CPU time on a
busy machine spreads by 10% and more.

What it leaves out: the kernel (the request's ``send``, the reads), the reactor's turns and
cache misses. Under valgrind sha256 runs without the CPU's SHA instructions: about half of
the count is hashing the 16 KiB. In this process a microsecond is some 12,000 instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import machine, record_raw
from pair_bench import source_tree

#: Downloads before the counted ones (imports, the first connection, caches warmed).
WARM = 200


def child(downloads: int, size: int) -> None:
    """Build and run *downloads* downloads on a fake connection (the measured process)."""
    import hashlib

    from twisted.internet import defer, reactor

    from downloaders.factory import DownloaderFactory
    from downloaders.settings import RemoteSettings

    body = os.urandom(size)
    head = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
        b"Last-Modified: Wed, 02 Dec 2026 09:00:00 GMT\r\nConnection: keep-alive\r\n"
        b'ETag: "692eb8a0-4000"\r\nAccept-Ranges: bytes\r\n\r\n' % size
    )
    half = min(8000, size)

    class Transport:
        disconnecting = False
        connected = True

        def write(self, data: bytes) -> None:
            pass

        def loseConnection(self) -> None:
            self.disconnecting = True

        abortConnection = loseConnection

        def pauseProducing(self) -> None:
            pass

        resumeProducing = stopProducing = pauseProducing

    connections: list = []

    class Endpoint:
        def connect(self, factory):  # type: ignore[no-untyped-def]
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(Transport())
            connections.append(protocol)
            return defer.succeed(protocol)

    class Endpoints:
        def endpointForURI(self, uri):  # type: ignore[no-untyped-def]
            return Endpoint()

    class Null:
        def write(self, data: bytes) -> None:
            pass

    factory = DownloaderFactory(RemoteSettings(url="http://127.0.0.1:9/PULP_MANIFEST"))
    factory._direct._endpoints = Endpoints()  # type: ignore[union-attr]
    url = "http://127.0.0.1:9/files/00001.bin"
    digests = {"sha256": hashlib.sha256(body).hexdigest()}
    null = Null()
    factory.semaphore.tokens += 9
    hanging = [factory.build(url, writer=null).run() for _ in range(9)]
    done: list = []
    for _ in range(downloads):
        d = factory.build(url, expected_size=size, expected_digests=digests, writer=null).run()
        connection = connections[9]
        connection.dataReceived(head + body[:half])
        connection.dataReceived(body[half:])
        d.addBoth(done.append)
    if len(connections) != 10 or len(done) != downloads or hanging[0].called:
        raise SystemExit("the downloads did not go as planned")
    for result in done:
        if not getattr(result, "artifact_attributes", None):
            raise SystemExit(f"a download failed: {result}")
    del reactor  # (imported for the factory's default)


def instructions(tree: Path, downloads: int, size: int) -> int:
    """User-space instructions of one child run of *downloads* downloads with *tree*."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    command = [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *(sys.executable, __file__, "--child", str(downloads), str(size)),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode or found is None:
        raise RuntimeError(f"the child failed:\n{run.stdout}\n{run.stderr[-2000:]}")
    return int(found.group(1))


def per_download(tree: Path, downloads: int, size: int) -> float:
    """Instructions per download: the difference of two runs over *downloads*."""
    few = instructions(tree, WARM, size)
    many = instructions(tree, WARM + downloads, size)
    return (many - few) / downloads


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # the measured process: --child DOWNLOADS SIZE
        child(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="git revision or source folder of version A")
    parser.add_argument("b", help="git revision or source folder of version B")
    parser.add_argument("--downloads", type=int, default=1000)
    parser.add_argument("--size", type=int, default=16384)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (Debian's valgrind package)")
    print(f"# {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ir-bench-"))
    try:
        trees = [source_tree(v, work, f"tree-{n}") for n, v in (("A", args.a), ("B", args.b))]
        with ThreadPoolExecutor(2) as pool:  # (one core each; the counts do not mind)
            a, b = pool.map(lambda tree: per_download(tree, args.downloads, args.size), trees)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nA = {args.a}, B = {args.b}; {args.downloads} downloads of {args.size} bytes")
    print("| A instructions/download | B instructions/download | B - A |")
    print("| ---: | ---: | ---: |")
    print(f"| {a:,.0f} | {b:,.0f} | {b - a:+,.0f} ({(b - a) / a:+.1%}) |")
    record_raw("ir", {"A": a, "B": b, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
