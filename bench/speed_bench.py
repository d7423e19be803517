#!/usr/bin/env python3
"""Issue 13's speed figures in one run: the streamer (default settings) beside the aiohttp
proxy peer, as ratios of medians over rotated rounds, with the spread of each ratio.

    python bench/speed_bench.py [--repeat 5] [--small 1000] [--big-mib 1024]
        [--clients 1000] [--client-rate-kib 256] [--memory-seconds 40]
        [--ttfb-files 20] [--without-syncfs] [--profile]

Per round (the contenders' order rotates each round; every round starts cold):
* cold 1 GiB (MB/s, curl), cold and warm small files (16 KiB, ``curl -Z`` with 10 parallel
  keep-alive transfers, req/s) through the streamer and the peer (and nginx ``proxy_pass``
  for the 1 GiB row: the ceiling);
* time to first byte, one client, 1 MiB files, a new connection per request (connect, send,
  first body byte), back to back like the upstream's own: nginx as the upstream itself, then
  a cold pass and (once stored) a warm pass through each contender.

Once, at the end:
* memory: ``--clients`` concurrent clients, each reading one cold 1 GiB artifact at
  ``--client-rate-kib`` (a small receive buffer, so flow control reaches the server), for
  ``--memory-seconds``; the RSS growth of every process of the streamer's group (the first
  process and its helpers), and the upstream requests nginx saw for that file;
* with ``--profile``: a second streamer (one process, twistd's cProfile) serving
  ``--small`` cold small files; the top functions, in microseconds per request.

``--without-syncfs`` adds a second streamer group that skips the group ``syncfs`` before its
commits (``bench/nosyncfs``, a bench-only patch) to the cold rows: what durability costs.

The sync figure (``immediate`` sync against ``aiohttp_sync.py``) is ``sync_bench.py``'s.
Raw numbers (every sample) go to ``bench/raw/speed-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    BENCH,
    Nginx,
    free_port,
    group_pids,
    machine,
    make_fixture,
    record_raw,
    set_aside,
    start_aiohttp_proxy,
    start_streamer,
    stop,
    streamer_config,
    wait_port,
)
from stream_bench import count_requests, curl_speed, rss_kib, small_files_rate

MB = 1e6


# -- time to first byte ---------------------------------------------------------------------


def first_byte(port: int, path: str) -> float:
    """Seconds from connect to the first body byte of one GET (new connection); the rest of
    the body is read and checked for length."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"{path}: closed before the body: {data[:200]!r}")
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and body:
                elapsed = time.perf_counter() - start
                break
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path}: {head[:100]!r}")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        got = len(body)
        while got < length:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError(f"{path}: body cut at {got} of {length}")
            got += len(chunk)
    return elapsed


# -- many slow clients ----------------------------------------------------------------------


async def _slow_client(port: int, path: str, rate: float, until: float, out: list) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    got = 0
    status = b""
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        start = time.monotonic()
        while time.monotonic() < until:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), until - time.monotonic())
            if not chunk:
                break
            if not status:
                status = chunk[:12]
            got += len(chunk)
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(min(ahead, max(0.0, until - time.monotonic())))
    except (TimeoutError, OSError):
        pass
    finally:
        sock.close()
    out.append((status, got))


async def _slow_clients(port: int, path: str, count: int, rate: float, seconds: float) -> list:
    out: list = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(_slow_client(port, path, rate, until, out) for _ in range(count)))
    return out


def slow_clients_main(argv: list[str]) -> int:
    """``speed_bench.py _slow PORT PATH COUNT RATE SECONDS``: prints ``ok total_bytes``."""
    port, path, count, rate, seconds = argv
    out = asyncio.run(_slow_clients(int(port), path, int(count), float(rate), float(seconds)))
    ok = sum(status.startswith(b"HTTP/1.1 200") for status, _ in out)
    print(ok, sum(got for _, got in out), flush=True)
    return 0


# -- the run --------------------------------------------------------------------------------


def stored_file(store: Path, size: int, timeout: float = 60.0) -> None:
    """Wait until *store* holds a file of *size* bytes (a contender's commit of the big file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.exists() and any(
            f.is_file() and f.stat().st_size == size for f in store.rglob("*")
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no file of {size} bytes in {store} after {timeout} s")


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_slow":
        return slow_clients_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--ttfb-files", type=int, default=20)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--client-rate-kib", type=float, default=256)
    parser.add_argument("--memory-seconds", type=float, default=40)
    parser.add_argument("--without-syncfs", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip", default="", help="comma-separated: big,small,ttfb,memory")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work or tempfile.mkdtemp(prefix="speed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    fixture = work / "upstream"
    trash = work / "trash"
    samples: dict[str, list[float]] = {}
    figures: dict[str, object] = {}
    procs: list[subprocess.Popen] = []
    nginx: Nginx | None = None
    print(f"# {machine()}", flush=True)
    try:
        make_fixture(fixture, args.small, 16384, args.big_mib << 20)
        ttfb_paths = [f"files/ttfb-{i:03d}.bin" for i in range(args.ttfb_files)]
        with (fixture / "PULP_MANIFEST").open("a") as manifest:
            for rel in ttfb_paths:
                data = os.urandom(1 << 20)
                (fixture / rel).write_bytes(data)
                manifest.write(f"{rel},{hashlib.sha256(data).hexdigest()},{len(data)}\n")

        static, proxy, aio, ours, nosync = (free_port() for _ in range(5))
        nginx = Nginx(fixture, static, proxy, work / "nginx")
        nginx.start()
        upstream = f"http://127.0.0.1:{static}"
        aio_store = work / "aio"
        procs.append(start_aiohttp_proxy(upstream, aio, aio_store))
        config = streamer_config(work / "streamer.toml", ours, work / "var", upstream)
        subprocess.run(["streamer", "--config", config, "sync"], check=True, capture_output=True)
        streamer = start_streamer(config, work / "twistd.log")
        procs.append(streamer)
        contenders = {"aiohttp": (aio, ""), "streamer": (ours, "/bench")}
        stores = {"aiohttp": aio_store / "store", "streamer": work / "var" / "artifacts"}
        if args.without_syncfs:
            (work / "nosync").mkdir()
            nosync_config = streamer_config(
                work / "nosync" / "streamer.toml", nosync, work / "nosync" / "var", upstream
            )
            subprocess.run(
                ["streamer", "--config", nosync_config, "sync"], check=True, capture_output=True
            )
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(BENCH / "nosyncfs"), os.environ.get("PYTHONPATH")])
                ),
            }
            procs.append(start_streamer(nosync_config, work / "nosync" / "twistd.log", env))
            contenders["streamer without syncfs"] = (nosync, "/bench")
            stores["streamer without syncfs"] = work / "nosync" / "var" / "artifacts"
            wait_port(nosync)
        wait_port(aio)
        wait_port(ours)

        def base(name: str) -> str:
            port, prefix = contenders[name]
            return f"http://127.0.0.1:{port}{prefix}"

        def forget_stored() -> None:
            for store in stores.values():
                set_aside(store, trash)
            time.sleep(0.5)
            os.sync()

        def sample(key: str, value: float) -> None:
            samples.setdefault(key, []).append(value)

        def rotated(rows: list, turn: int) -> list:
            turn %= len(rows)
            return rows[turn:] + rows[:turn]

        names = list(contenders)
        for turn in range(args.repeat):
            print(f"round {turn + 1} of {args.repeat}", flush=True)
            forget_stored()
            if "big" not in skip:
                rows = [("nginx proxy", f"http://127.0.0.1:{proxy}")] + [
                    (name, base(name)) for name in names
                ]
                for name, url in rotated(rows, turn):
                    os.sync()
                    sample(f"cold 1 GiB MB/s: {name}", curl_speed(f"{url}/files/big.bin") / MB)
                    if name in stores:  # its commit lands after the last byte: wait for it,
                        # or it lands after the next round's forget_stored (a warm "cold" run)
                        stored_file(stores[name], args.big_mib << 20)
            if "small" not in skip:
                small = [f"files/{i:05d}.bin" for i in range(args.small)]
                for name in rotated(names, turn):
                    os.sync()
                    sample(f"cold small req/s: {name}", small_files_rate(base(name), small))
                os.sync()
                for name in rotated(names, turn):
                    sample(f"warm small req/s: {name}", small_files_rate(base(name), small))
            if "ttfb" not in skip:
                sample(
                    "ttfb 1 MiB ms: upstream",
                    statistics.median(first_byte(static, f"/{p}") * 1e3 for p in ttfb_paths),
                )
                for name in rotated(names, turn):
                    port, prefix = contenders[name]
                    # One pass cold, then one pass warm once every file is stored: a "warm"
                    # request 60 ms after its cold one (as this bench did first) met that
                    # download's commit (batch delay, syncfs) and measured that instead.
                    cold = [first_byte(port, f"{prefix}/{p}") * 1e3 for p in ttfb_paths]
                    time.sleep(1)
                    os.sync()
                    warm = [first_byte(port, f"{prefix}/{p}") * 1e3 for p in ttfb_paths]
                    sample(f"ttfb 1 MiB ms cold: {name}", statistics.median(cold))
                    sample(f"ttfb 1 MiB ms warm: {name}", statistics.median(warm))

        if "memory" not in skip:
            forget_stored()
            time.sleep(1)
            pids = group_pids(streamer.pid)
            before = {pid: rss_kib(pid) for pid in pids}
            upstream_before = count_requests(nginx.access_log, "files/big.bin")
            clients = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "_slow",
                    str(ours),
                    "/bench/files/big.bin",
                    str(args.clients),
                    str(args.client_rate_kib * 1024),
                    str(args.memory_seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            peak = dict(before)
            while clients.poll() is None:
                for pid in pids:
                    peak[pid] = max(peak[pid], rss_kib(pid))
                time.sleep(0.1)
            ok, total = (int(v) for v in clients.stdout.read().split())
            growth = {pid: (peak[pid] - before[pid]) / 1024 for pid in pids}
            figures["memory: processes in the group"] = len(pids)
            figures["memory: RSS before, MiB per process"] = [
                round(before[p] / 1024, 1) for p in pids
            ]
            figures["memory: peak RSS growth, MiB per process"] = [
                round(growth[p], 1) for p in pids
            ]
            figures["memory: clients answered 200"] = ok
            figures["memory: client MiB/s (all clients)"] = round(
                total / args.memory_seconds / (1 << 20), 1
            )
            figures["memory: upstream requests for the file"] = (
                count_requests(nginx.access_log, "files/big.bin") - upstream_before
            )
            time.sleep(3)  # let the download finish before the streamer stops

        if args.profile:
            stop(streamer)
            procs.remove(streamer)
            set_aside(stores["streamer"], trash)
            os.sync()
            profile = work / "streamer.prof"
            one = streamer_config(
                work / "profile.toml", ours, work / "var", upstream, "processes = 1"
            )
            prof = start_streamer(
                one,
                work / "profile.log",
                None,
                "--profile",
                str(profile),
                "--profiler",
                "cprofile",
                "--savestats",
            )
            wait_port(ours)
            small = [f"files/{i:05d}.bin" for i in range(args.small)]
            small_files_rate(f"http://127.0.0.1:{ours}/bench", small[:50])  # warm-up
            rate = small_files_rate(f"http://127.0.0.1:{ours}/bench", small[50:])
            time.sleep(0.5)
            stop(prof)
            figures["profile: cold small req/s (one process, under cProfile)"] = round(rate, 1)
            stats = pstats.Stats(str(profile))
            per = 1e6 / len(small)
            for column, title in ((2, "own time"), (3, "cumulative time")):
                top = sorted(stats.stats.items(), key=lambda kv: kv[1][column], reverse=True)
                print(f"\ncProfile, {len(small)} cold small files, by {title}: own and")
                print("cumulative microseconds per request, calls, function")
                for (file, line, func), (_cc, calls, tottime, cumtime, _) in top[:45]:
                    where = f"{Path(file).parent.name}/{Path(file).name}:{line}({func})"
                    print(f"{tottime * per:8.1f} {cumtime * per:8.1f} {calls:8d}  {where}")
    finally:
        for proc in procs:
            stop(proc)
        if nginx is not None:
            nginx.stop()

    print(f"\n{args.repeat} rounds, contenders rotated; median (min–max) of the rounds")
    print("| measure | " + " | ".join(["median", "spread"]) + " |\n| --- | --- | --- |")
    for key, values in samples.items():
        print(f"| {key} | {statistics.median(values):.3g} | {spread(values)} |")

    def ratios(key: str, lower_is_better: bool = False) -> None:
        ours_key, peer_key = f"{key}: streamer", f"{key}: aiohttp"
        if ours_key not in samples or peer_key not in samples:
            return
        pairs = list(zip(samples[ours_key], samples[peer_key], strict=True))
        per_round = [(p / o if lower_is_better else o / p) for o, p in pairs]
        med = statistics.median(samples[ours_key]) / statistics.median(samples[peer_key])
        med = 1 / med if lower_is_better else med
        figures[f"ratio {key}: streamer/aiohttp"] = f"{med:.2f}x (rounds {spread(per_round)})"

    for key in ("cold 1 GiB MB/s", "cold small req/s", "warm small req/s"):
        ratios(key)
    print("\n| figure | value |\n| --- | --- |")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    record_raw("speed", {"rounds": samples, "figures": figures})
    shutil.rmtree(trash, ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
