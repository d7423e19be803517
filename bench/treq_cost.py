"""What treq costs per request on a remote's agent stack, against a whole small download.

Why artifact bytes stay on the raw agent (docs/DESIGN.md, "treq where it serves"): nginx serves
N small files on loopback; one process fetches them all, ``--concurrency`` at a time, three
ways, on the same `DownloaderFactory` (one pool, keep-alive):

* ``download``: ``factory.build(url, expected_digests=...).run()``: the request, sha256, a
  temporary file, validation (what a sync does per file);
* ``treq_file``: the same work through ``factory.http_client()``: ``get(url, unbuffered=True)``,
  ``treq.collect`` into sha256 and a temporary file, the digest checked (what a treq-based
  downloader would do per file);
* ``treq``: ``factory.http_client().get(url)`` then ``.content()`` (treq's decoder and cookie
  agents, its response wrapper, the body in memory; no hashing, no file);
* ``agent``: ``factory.agent.request`` and ``readBody`` (the bare floor under both).

Reported: wall microseconds per request, best and median of ``--repeat`` rounds.

    python bench/treq_cost.py                     # 2000 x 1 KiB, concurrency 10, 5 rounds
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import treq
from benchlib import Nginx, free_port, make_fixture, record_raw
from twisted.internet import defer, reactor, task
from twisted.web.client import readBody

from downloaders import DownloaderFactory, RemoteSettings
from downloaders.tempfiles import create_temp_file


async def bounded(jobs: list, concurrency: int) -> None:
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:
            await job()

    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])


async def one_round(mode: str, factory: DownloaderFactory, files: list, concurrency: int, tmp: str):
    client = factory.http_client()

    async def download(url: str, digest: str) -> None:
        await factory.build(url, expected_digests={"sha256": digest}, temp_dir=tmp).run()

    async def via_treq(url: str, digest: str) -> None:
        response = await client.get(url)
        await response.content()

    async def treq_file(url: str, digest: str) -> None:
        response = await client.get(url, unbuffered=True)
        fd, path = create_temp_file(tmp)
        hasher = hashlib.sha256()

        def write(data: bytes) -> None:
            hasher.update(data)
            os.write(fd, data)

        await treq.collect(response, write)
        os.close(fd)
        assert hasher.hexdigest() == digest

    async def via_agent(url: str, digest: str) -> None:
        response = await factory.agent.request(b"GET", url.encode())
        await readBody(response)

    fetch = {"download": download, "treq": via_treq, "treq_file": treq_file, "agent": via_agent}[
        mode
    ]
    jobs = [lambda u=u, d=d: fetch(u, d) for u, d in files]
    started = time.perf_counter()
    await bounded(jobs, concurrency)
    return (time.perf_counter() - started) / len(files) * 1e6


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="treq-cost-"))
    make_fixture(work / "repo", args.count, args.size)
    nginx = Nginx(work / "repo", free_port(), free_port(), work / "nginx")
    nginx.start()
    try:
        base = f"http://127.0.0.1:{nginx.static_port}/files/"
        files = []
        for path in sorted((work / "repo" / "files").glob("*.bin")):
            files.append((base + path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
        remote = RemoteSettings(url=base, download_concurrency=args.concurrency, max_retries=0)
        factory = DownloaderFactory(remote)
        tmp = str(work / "tmp")
        Path(tmp).mkdir()
        factory.temp_files(tmp, ahead=0)  # as a sync does: each file created inline
        results: dict[str, list[float]] = {"download": [], "treq_file": [], "treq": [], "agent": []}
        for mode in results:  # warm the pool and the code paths once
            await one_round(mode, factory, files[:200], args.concurrency, tmp)
        for _ in range(args.repeat):
            for mode in results:
                results[mode].append(await one_round(mode, factory, files, args.concurrency, tmp))
                for leftover in Path(tmp).glob(".download-*"):
                    leftover.unlink()
        await factory.close()
    finally:
        nginx.stop()
    print(f"{args.count} x {args.size} B, concurrency {args.concurrency}, {args.repeat} rounds")
    for mode, rounds in results.items():
        print(f"{mode:9s} best {min(rounds):6.0f} us  median {statistics.median(rounds):6.0f} us")
    record_raw("treq_cost", {"args": vars(args), "us_per_request": results})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    task.react(lambda _reactor: defer.ensureDeferred(main(options)))
    _ = reactor
