#!/usr/bin/env python3
"""Sync benchmark: our immediate sync beside an aiohttp sync and aria2c, in one run.

    python bench/sync_bench.py [--count 2000] [--size 16384] [--concurrency 10]
                               [--repeat 3] [--lazy-count 100000] [--work DIR] [--profile]

Runs, on loopback only, against one nginx serving a fixture made by ``bench/peers/fixture.py``
(the peers are the project's own, so a clone runs this with nothing beside it):

* our ``immediate`` sync as a user runs it, ``streamer --config FILE sync`` (concurrency N,
  sha256 and size validated, atomic commit into artifact storage, SQLite catalog; helper
  processes as the remote's default ``sync_processes = 0`` decides), and the same through
  the ``importer.sync_remote`` API in a small program that also times the sync's phases,
  each in a fresh process per run;
* ``bench/peers/aiohttp_sync.py`` (same concurrency and validation; aiohttp is needed for
  the bench only: ``pip install aiohttp``);
* ``aria2c -j N`` with the sha-256 of every file (Debian's aria2).

Each is timed as a whole process (start-up included), best of ``--repeat`` rounds (the order
of the contenders rotates each round; dirty pages are written out, untimed, before every
run); ours also reports
the time of the sync itself. ``--profile`` runs our sync once more under cProfile and prints
the top functions. Finally the peak RSS of an ``on_demand`` sync of a ``--lazy-count``-line
manifest (only recorded, nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import PEERS, Nginx, free_port, machine, make_fixture, record_raw, set_aside

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("downloaders", "importer", "store", "streamer")


# -- the child process: one sync of ours ----------------------------------------------------


class PhaseTimer:
    """An IProgress that notes when the download phase starts and ends, and profiles it
    (only it: not the imports, the listing or the catalog) when given a profiler."""

    started: float | None = None
    finished: float | None = None
    cpu_started = 0.0
    reactor_cpu = 0.0

    def __init__(self, profiler: object = None) -> None:
        self.profiler = profiler

    def start(self, remote_name: str, total: int) -> None:
        self.started = time.perf_counter()
        self.cpu_started = time.thread_time()
        if self.profiler is not None:
            self.profiler.enable()

    def advance(self, outcome: str) -> None:
        pass

    def finish(self) -> None:
        if self.profiler is not None:
            self.profiler.disable()
        self.finished = time.perf_counter()
        self.reactor_cpu = time.thread_time() - self.cpu_started


def run_ours(args: argparse.Namespace) -> None:
    """In a fresh process: one sync; print a JSON line with the timing and peak RSS."""
    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from twisted.internet import defer, task

    from importer import Remote, sync_remote
    from importer.helpers.process import helpers_for
    from store import ArtifactStorage, open_catalog

    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    remote = Remote(
        name="bench",
        url=args.manifest_url,
        policy=args.policy,
        download_concurrency=args.concurrency,
        sync_processes=args.processes,
    )
    # As `streamer sync` does: helper processes start before the reactor (forked).
    helpers = helpers_for(remote)

    @defer.inlineCallbacks
    def main(reactor: object) -> object:
        storage = ArtifactStorage(args.storage)
        catalog = open_catalog("", storage.root)
        yield catalog.open()
        phases = PhaseTimer(profiler)
        started = time.perf_counter()
        report = yield sync_remote(remote, catalog, storage, phases, helpers)
        seconds = time.perf_counter() - started
        if helpers is not None:
            yield helpers.close()
        yield remote.close()
        yield catalog.close()
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "download_seconds": (phases.finished or started) - (phases.started or started),
                    "download_reactor_cpu": phases.reactor_cpu,
                    "downloaded": report.downloaded,
                    "recorded_lazily": report.recorded_lazily,
                    "failed": len(report.failed),
                    "rss_start_kib": rss_start,
                    "rss_imported_kib": rss_imported,
                    "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                }
            ),
            flush=True,
        )

    try:
        task.react(main)
    finally:
        if profiler is not None:
            profiler.dump_stats(args.profile_out)


def run_agent_floor(args: argparse.Namespace) -> None:
    """In a fresh process: the same work as a bare ``twisted.web.client.Agent`` loop (no
    catalog, no retries, no timeouts): temp file + sha256 + size check + rename. The floor
    Twisted's HTTP client sets for any downloader built on it."""
    import hashlib

    from twisted.internet import defer, protocol, task
    from twisted.web.client import Agent, HTTPConnectionPool

    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()

    class Sink(protocol.Protocol):
        def __init__(self, done: defer.Deferred, f: object, digest: object) -> None:
            self.done, self.f, self.digest = done, f, digest

        def dataReceived(self, data: bytes) -> None:
            self.digest.update(data)
            self.f.write(data)

        def connectionLost(self, reason: object) -> None:
            self.done.callback(None)

    @defer.inlineCallbacks
    def main(reactor: object) -> object:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = args.concurrency
        agent = Agent(reactor, pool=pool)
        listing = yield agent.request(b"GET", args.manifest_url.encode())
        done: defer.Deferred = defer.Deferred()
        chunks: list[bytes] = []
        listing.deliverBody(_Collect(done, chunks))
        yield done
        base = args.manifest_url.rsplit("/", 1)[0]
        lines = b"".join(chunks).decode().split()
        os.makedirs(os.path.join(args.storage, "tmp"), exist_ok=True)
        started = time.perf_counter()

        @defer.inlineCallbacks
        def one(line: str) -> object:
            rel, sha256, size = line.split(",")
            response = yield agent.request(b"GET", f"{base}/{rel}".encode())
            fd, tmp = tempfile.mkstemp(dir=os.path.join(args.storage, "tmp"))
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                finished: defer.Deferred = defer.Deferred()
                response.deliverBody(Sink(finished, f, digest))
                yield finished
            if digest.hexdigest() != sha256 or os.path.getsize(tmp) != int(size):
                raise ValueError(rel)
            target = os.path.join(args.storage, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp, target)

        work = (one(line) for line in lines)
        coop = task.Cooperator()
        if profiler is not None:
            profiler.enable()
        cpu = time.thread_time()
        yield defer.gatherResults([coop.coiterate(work) for _ in range(args.concurrency)])
        cpu = time.thread_time() - cpu
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - started
        yield pool.closeCachedConnections()
        report = {"seconds": seconds, "downloaded": len(lines), "reactor_cpu": cpu}
        print(json.dumps(report), flush=True)

    try:
        task.react(main)
    finally:
        if profiler is not None:
            profiler.dump_stats(args.profile_out)


class _Collect:
    """Collects a response body (the listing) into *chunks*; fires *done* at the end."""

    def __init__(self, done: object, chunks: list[bytes]) -> None:
        self.done, self.chunks = done, chunks

    def makeConnection(self, transport: object) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: object) -> None:
        self.done.callback(None)


# -- the parent: fixtures, peers, table -----------------------------------------------------


#: CPU seconds (user + system) of every finished child process, by label.
CPU: dict[str, list[float]] = {}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], label: str = "", **kwargs: object) -> tuple[float, str]:
    """Run *cmd* to completion; return its wall time and stdout, record its CPU time.

    Dirty pages (the previous contender's files, the removal of this one's last output) are
    written out first, untimed: our sync flushes its filesystem (``syncfs``) before files
    enter storage, and would otherwise pay for every peer's unflushed writes."""
    os.sync()
    cpu = children_cpu()
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - started
    if out.returncode:  # show why (a child's traceback), not only its exit status
        raise RuntimeError(f"{cmd[1:3]} exited with {out.returncode}:\n{out.stderr[-4000:]}")
    if label:
        CPU.setdefault(label, []).append(children_cpu() - cpu)
    return wall, out.stdout


def run_mode(mode: str, args: list[str], label: str = "") -> tuple[float, dict]:
    """Run this script's *mode* (``_child``, ``_agent``, ``_aiohttp``) in a fresh process on
    our checkout; its wall time and the JSON report it prints last."""
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, *args]
    wall, out = timed(cmd, label, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return wall, json.loads(out.strip().splitlines()[-1])


def ours(
    manifest_url: str,
    storage: Path,
    concurrency: int,
    policy: str = "immediate",
    profile_out: str = "",
) -> tuple[float, dict]:
    set_aside(storage)
    args = [manifest_url, str(storage), "--concurrency", str(concurrency), "--policy", policy]
    if profile_out:
        args += ["--profile-out", profile_out]
    return run_mode("_child", args, "" if profile_out else policy)


def ours_cli(manifest_url: str, folder: Path, concurrency: int) -> float:
    """``streamer --config FILE sync``, as a user runs it; its wall time."""
    set_aside(folder)
    folder.mkdir(parents=True)
    config = folder / "streamer.toml"
    config.write_text(
        "[storage]\n"
        'path = "var"\n\n'
        "[[remotes]]\n"
        'name = "bench"\n'
        f'url = "{manifest_url}"\n'
        'policy = "immediate"\n'
        f"download_concurrency = {concurrency}\n"
    )
    cmd = [sys.executable, "-m", "streamer.cli", "--config", str(config), "sync"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wall, out = timed(cmd, "cli", cwd=folder, env=env)
    if " 0 failed" not in out:
        raise RuntimeError(f"streamer sync failed: {out}")
    return wall


def agent_floor(manifest_url: str, storage: Path, concurrency: int) -> float:
    set_aside(storage)
    args = [manifest_url, str(storage), "--concurrency", str(concurrency)]
    _wall, report = run_mode("_agent", args, "agent")
    CPU.setdefault("agent_reactor", []).append(report["reactor_cpu"])
    return report["seconds"]


def aiohttp_peer(manifest_url: str, dest: Path, concurrency: int) -> float:
    set_aside(dest)
    wall, out = timed(
        [
            sys.executable,
            str(PEERS / "aiohttp_sync.py"),
            manifest_url,
            str(dest),
            "--concurrency",
            str(concurrency),
        ],
        "aiohttp",
    )
    if " 0 failed" not in out:
        raise RuntimeError(f"aiohttp sync failed: {out}")
    return wall


def run_aiohttp_inner(args: argparse.Namespace) -> None:
    """In a fresh process: the peer's own ``sync()`` coroutine, timed from inside (after
    its imports), so its sync compares with ours without either's start-up."""
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("aiohttp_sync", args.peer)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    started = time.perf_counter()
    failed = asyncio.run(peer.sync(args.manifest_url, args.dest, args.concurrency, ["sha256"]))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "failed": failed}), flush=True)


def aiohttp_inner(manifest_url: str, dest: Path, concurrency: int) -> float:
    set_aside(dest)
    peer = str(PEERS / "aiohttp_sync.py")
    _wall, report = run_mode(
        "_aiohttp", [peer, manifest_url, str(dest), "--concurrency", str(concurrency)]
    )
    if report["failed"]:
        raise RuntimeError(f"aiohttp sync failed: {report}")
    return report["seconds"]


def aria2c_peer(fixture: Path, base_url: str, dest: Path, concurrency: int) -> float:
    set_aside(dest)
    dest.mkdir(parents=True)
    listing = dest.parent / "aria2c-input.txt"
    with open(listing, "w") as f:
        for line in (fixture / "PULP_MANIFEST").read_text().splitlines():
            rel, digest, _size = line.split(",")
            f.write(f"{base_url}/{rel}\n  out={rel}\n  checksum=sha-256={digest}\n")
    wall, _out = timed(
        [
            "aria2c",
            "--no-conf",
            "-q",
            "-j",
            str(concurrency),
            "-i",
            str(listing),
            "-d",
            str(dest),
            "--file-allocation=none",
            "--max-tries=1",
            "--all-proxy=",
            "--check-integrity=true",
            "--auto-file-renaming=false",
            "--allow-overwrite=true",
        ],
        "aria2c",
    )
    return wall


def write_lazy_manifest(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "PULP_MANIFEST", "w") as f:
        for i in range(count):
            f.write(f"files/{i // 1000:03d}/{i:06d}.bin,{i:064x},{1024 + i % 4096}\n")


def print_profile(path: str, limit: int = 25) -> None:
    import pstats

    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    child = sub.add_parser("_child", help=argparse.SUPPRESS)
    child.add_argument("manifest_url")
    child.add_argument("storage")
    child.add_argument("--concurrency", type=int, default=10)
    child.add_argument("--policy", default="immediate")
    child.add_argument("--profile-out", default="")
    child.add_argument("--processes", type=int, default=0)
    agent = sub.add_parser("_agent", help=argparse.SUPPRESS)
    agent.add_argument("manifest_url")
    agent.add_argument("storage")
    agent.add_argument("--concurrency", type=int, default=10)
    agent.add_argument("--profile-out", default="")
    inner = sub.add_parser("_aiohttp", help=argparse.SUPPRESS)
    inner.add_argument("peer")
    inner.add_argument("manifest_url")
    inner.add_argument("dest")
    inner.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lazy-count", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.mode == "_child":
        run_ours(args)
        return
    if args.mode == "_agent":
        run_agent_floor(args)
        return
    if args.mode == "_aiohttp":
        run_aiohttp_inner(args)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="sync-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # mkdtemp makes it 0700; nginx's worker (nobody) must read the fixture
    closed = [p for p in work.resolve().parents if not p.stat().st_mode & 0o001]
    if closed:  # nginx would answer 403 to every request: say why instead
        parser.error(f"nginx's worker cannot reach --work: run `chmod o+x {closed[0]}` first")
    fixture = work / "upstream"
    make_fixture(fixture, args.count, args.size)
    write_lazy_manifest(work / "lazy", args.lazy_count)
    # Our packages are a checkout; the peers (aiohttp, Twisted) are installed, byte-compiled.
    # Compile ours too, so no run of ours compiles its modules at start-up (with
    # PYTHONDONTWRITEBYTECODE set, every run would).
    subprocess.run([sys.executable, "-m", "compileall", "-q", *PACKAGES], cwd=REPO, check=True)
    static, proxy = free_port(), free_port()
    nginx = Nginx(work, static, proxy, work / "nginx")
    try:
        nginx.start()
        base = f"http://127.0.0.1:{static}"
        manifest = f"{base}/upstream/PULP_MANIFEST"
        n, c = args.count, args.concurrency
        results: dict[str, list[float]] = {
            "cli": [],
            "ours": [],
            "ours_sync": [],
            "ours_downloads": [],
            "agent": [],
            "aiohttp": [],
            "aiohttp_sync": [],
            "aria2c": [],
        }

        def our_round() -> None:
            wall, child_report = ours(manifest, work / "ours", c)
            if child_report["downloaded"] != n or child_report["failed"]:
                raise RuntimeError(f"our sync did not download everything: {child_report}")
            results["ours"].append(wall)
            results["ours_sync"].append(child_report["seconds"])
            results["ours_downloads"].append(child_report["download_seconds"])
            CPU.setdefault("ours_reactor", []).append(child_report["download_reactor_cpu"])

        contenders = [
            lambda: results["cli"].append(ours_cli(manifest, work / "cli", c)),
            our_round,
            lambda: results["agent"].append(agent_floor(manifest, work / "agent", c)),
            lambda: results["aiohttp"].append(aiohttp_peer(manifest, work / "aiohttp", c)),
            lambda: results["aiohttp_sync"].append(
                aiohttp_inner(manifest, work / "aiohttp-inner", c)
            ),
            lambda: results["aria2c"].append(
                aria2c_peer(fixture, f"{base}/upstream", work / "aria2c", c)
            ),
        ]
        for round_ in range(args.repeat):
            # Rotate the order each round: nobody always runs right after the same peer.
            shift = round_ % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                contender()
        best = {name: min(times) for name, times in results.items()}

        lazy_wall, lazy = ours(f"{base}/lazy/PULP_MANIFEST", work / "lazy-store", c, "on_demand")
        if lazy["recorded_lazily"] != args.lazy_count:
            raise RuntimeError(f"lazy sync recorded {lazy['recorded_lazily']}")

        print(f"\nmachine: {machine()}")
        print(f"fixture: {n} files x {args.size} B, concurrency {c}, best of {args.repeat}\n")
        cpu = {label: min(times) for label, times in CPU.items()}
        median = {name: statistics.median(times) for name, times in results.items()}
        print("| sync | best s | median s | files/s (best) | vs aiohttp, same span | CPU s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        rows = [  # name, key, the aiohttp figure it compares with, CPU
            ("ours: `streamer sync` (process)", "cli", "aiohttp", f"{cpu['cli']:.2f}"),
            ("ours: `sync_remote` program (process)", "ours", "aiohttp", f"{cpu['immediate']:.2f}"),
            (
                "ours: the sync itself (listing, catalog, downloads)",
                "ours_sync",
                "aiohttp_sync",
                "",
            ),
            (
                "ours: download phase alone",
                "ours_downloads",
                "aiohttp_sync",
                f"{cpu['ours_reactor']:.2f} (syncing process's reactor thread)",
            ),
            (
                "bare twisted Agent loop, one process (download loop itself)",
                "agent",
                "aiohttp_sync",
                f"{cpu['agent_reactor']:.2f} (reactor thread)",
            ),
            ("aiohttp_sync.py (process)", "aiohttp", "aiohttp", f"{cpu['aiohttp']:.2f}"),
            ("aiohttp_sync.py: its sync() itself", "aiohttp_sync", "aiohttp_sync", ""),
            ("aria2c -j (process)", "aria2c", "aiohttp", f"{cpu['aria2c']:.2f}"),
        ]
        for name, key, peer, cpu_text in rows:
            seconds = best[key]
            ratio = best[peer] / seconds
            print(
                f"| {name} | {seconds:.2f} | {median[key]:.2f} | {n / seconds:.0f} | "
                f"{ratio:.2f} | {cpu_text} |"
            )
        runs = {k: [round(v, 2) for v in t] for k, t in results.items()}
        print(f"\nall runs (s): {json.dumps(runs)}")
        peak, imported = lazy["rss_peak_kib"], lazy["rss_imported_kib"]
        print(
            f"\non_demand sync of {args.lazy_count} entries: {lazy['seconds']:.1f} s, peak RSS "
            f"{peak / 1024:.0f} MiB (after imports {imported / 1024:.0f} MiB; "
            f"growth {(peak - imported) / 1024:.0f} MiB)"
        )
        record_raw(
            "sync",
            {
                "fixture": {"count": n, "size": args.size, "concurrency": c},
                "runs_seconds": results,
                "cpu_seconds": CPU,
                "on_demand": {"entries": args.lazy_count, **lazy},
            },
        )
        if args.profile:
            out = str(work / "sync.prof")
            ours(manifest, work / "ours", c, profile_out=out)
            print("\ncProfile of one immediate sync (top by own time):")
            print_profile(out)
    finally:
        nginx.stop()
        shutil.rmtree(work / "trash", ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
