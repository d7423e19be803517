"""Requests per second of a bare download loop over each HTTP client the factory can use.

The downloaders' GETs go through `downloaders.direct_get.DirectGetAgent` (llhttp) unless
``DownloaderFactory.direct_get`` is False, when Twisted's ``Agent`` carries them. This measures
what that choice is worth, against nginx serving one small file on 127.0.0.1:

* ``agent``: the client alone: ``request(GET)``, the body into a sink that counts its bytes;
* ``downloader``: what a sync pays per file: `DownloaderFactory.build(url).run()` (temp file,
  sha256, size check, the agent stack above the client), the result file removed.

Each run is a fresh process (``--inner``), clients alternating run by run; the table gives the
best and median requests per second and the CPU seconds per 1000 requests of that process.

    python bench/client_bench.py                      # 5000 x 16 KiB, concurrency 10, 5 rounds
    python bench/client_bench.py --requests 500 --repeat 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import Nginx, free_port, git_commit, machine, record_raw

CLIENTS = ("direct", "twisted")
MODES = ("agent", "downloader")


def inner(args: argparse.Namespace) -> None:
    """One timed loop in this process; prints one JSON line."""
    from twisted.internet import defer, protocol, task
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    from downloaders import DownloaderFactory, RemoteSettings
    from downloaders.direct_get import DirectGetAgent
    from downloaders.factory import CachingEndpointFactory

    url = args.url.encode()

    class Count(protocol.Protocol):
        def __init__(self, done: defer.Deferred) -> None:
            self.done, self.size = done, 0

        def dataReceived(self, data: bytes) -> None:
            self.size += len(data)

        def connectionLost(self, reason: object = None) -> None:
            self.done.callback(self.size)

    async def main(reactor: object) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = args.concurrency
        endpoints = CachingEndpointFactory(reactor, BrowserLikePolicyForHTTPS(), None)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        if args.inner == "direct":
            agent = DirectGetAgent(endpoints, agent, max_idle=args.concurrency)
        factory_class = type(
            "Factory", (DownloaderFactory,), {"direct_get": args.inner == "direct"}
        )
        remote = RemoteSettings(url=args.url, download_concurrency=args.concurrency)
        factory = factory_class(remote, temp_dir=args.temp, reactor=reactor)

        async def by_agent() -> None:
            response = await agent.request(b"GET", url)
            done: defer.Deferred = defer.Deferred()
            response.deliverBody(Count(done))
            if await done != args.size:
                raise ValueError("short body")

        async def by_downloader() -> None:
            result = await factory.build(args.url, expected_digests={"sha256": args.sha256}).run()
            os.unlink(result.path)

        one = by_agent if args.mode == "agent" else by_downloader
        await one()  # connect (and warm up) before the clock starts
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()

        work = (defer.ensureDeferred(one()) for _ in range(args.requests))
        coop = task.Cooperator()  # *concurrency* consumers of one generator of requests
        await defer.gatherResults([coop.coiterate(work) for _ in range(args.concurrency)])
        elapsed = time.perf_counter() - started
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (used.ru_utime - cpu.ru_utime) + (used.ru_stime - cpu.ru_stime)
        await factory.close()
        await pool.closeCachedConnections()
        if isinstance(agent, DirectGetAgent):
            await agent.close_idle()
        print(json.dumps({"seconds": elapsed, "cpu": cpu_s, "requests": args.requests}))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def run_once(client: str, mode: str, url: str, sha256: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as temp:
        command = [
            sys.executable,
            __file__,
            "--inner",
            client,
            "--mode",
            mode,
            "--url",
            url,
            "--sha256",
            sha256,
            "--temp",
            temp,
            "--size",
            str(args.size),
            "--requests",
            str(args.requests),
            "--concurrency",
            str(args.concurrency),
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--size", type=int, default=16 * 1024, help="body bytes")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--inner", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--sha256", help=argparse.SUPPRESS)
    parser.add_argument("--temp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return

    modes = args.modes.split(",")
    body = os.urandom(args.size)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "root"
        root.mkdir()
        (root / "f.bin").write_bytes(body)
        nginx = Nginx(root, free_port(), free_port(), Path(work) / "nginx")
        nginx.start()
        try:
            url = f"http://127.0.0.1:{nginx.static_port}/f.bin"
            sha256 = hashlib.sha256(body).hexdigest()
            runs: dict[str, list[dict]] = {f"{m}/{c}": [] for m in modes for c in CLIENTS}
            for round_ in range(args.repeat):
                for mode in modes:
                    order = CLIENTS if round_ % 2 == 0 else CLIENTS[::-1]
                    for client in order:
                        runs[f"{mode}/{client}"].append(run_once(client, mode, url, sha256, args))
        finally:
            nginx.stop()

    print(f"\n{args.requests} GETs of {args.size} bytes, concurrency {args.concurrency},")
    print(f"{args.repeat} rounds; commit {git_commit()}; {machine()}\n")
    print("| loop | client | best req/s | median req/s | CPU s per 1000 requests (median) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for key, results in runs.items():
        mode, client = key.split("/")
        rates = [r["requests"] / r["seconds"] for r in results]
        cpu = [1000 * r["cpu"] / r["requests"] for r in results]
        print(
            f"| {mode} | {client} | {max(rates):.0f} | {statistics.median(rates):.0f} "
            f"| {statistics.median(cpu):.3f} |"
        )
    record_raw("client_bench", {"args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
