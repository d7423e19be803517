#!/usr/bin/env python3
"""Streaming benchmark: the streamer beside its peers, in one run, reported as ratios.

    python bench/stream_bench.py [--big-mib 1024] [--small 2000] [--repeat 3] [--work DIR]

Runs, on loopback only:
* cold 1 GiB through the streamer (tee + sha256), the aiohttp peer shaped like Pulp 3's content
  app (same digests) and nginx proxy_pass (MB/s, ratios);
* warm (stored) 1 GiB and 2000 small-file requests/s against nginx static and the aiohttp peer;
* the streamer's peak RSS growth while 10 clients limited to 2 MB/s and one fast client read a
  cold 1 GiB file;
* coalescing: 50 concurrent cold requests for one file, upstream requests counted in nginx's
  access log.

The peers are the project's own (``bench/peers/``), so a clone runs this with nothing beside
it. Needs Debian's nginx and curl, and aiohttp for the peer (`pip install aiohttp`: bench
only). Each run's raw numbers (every round) go to ``bench/raw/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import (
    Nginx,
    free_port,
    machine,
    make_fixture,
    record_raw,
    start_aiohttp_proxy,
    start_streamer,
    streamer_config,
    wait_port,
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def curl_speed(url: str, *extra: str) -> float:
    """Download url to /dev/null; return bytes/second as curl measured it."""
    out = subprocess.run(
        ["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{speed_download}", *extra, url],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout)


def small_files_rate(base: str, paths: list[str], parallel: int = 10) -> float:
    """Requests per second for fetching every path once with `curl -Z` (parallel transfers)."""
    with tempfile.NamedTemporaryFile("w", suffix=".curl", delete=False) as cfg:
        for p in paths:
            cfg.write(f'url = "{base}/{p}"\noutput = "/dev/null"\n')
    try:
        start = time.perf_counter()
        subprocess.run(
            [
                "curl",
                "-sS",
                "--no-progress-meter",
                "-f",
                "-Z",
                "--parallel-max",
                str(parallel),
                "-K",
                cfg.name,
            ],
            check=True,
        )
        return len(paths) / (time.perf_counter() - start)
    finally:
        os.unlink(cfg.name)


def count_requests(access_log: Path, path: str) -> int:
    if not access_log.exists():
        return 0
    return sum(1 for line in access_log.read_text().splitlines() if f" /{path} " in line)


def concurrent_get(url: str, n: int) -> list[int]:
    procs = [
        subprocess.Popen(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    return [int(p.communicate()[0] or 0) for p in procs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--work", default="")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds per throughput row (best one kept)"
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx's workers (www-data when started as root) read the fixture
    fixture = work / "upstream"
    big = args.big_mib << 20
    results: dict[str, float | str] = {}
    procs: list[subprocess.Popen] = []
    nginx: Nginx | None = None
    samples: dict[str, list[float]] = {}
    try:
        print(f"# {machine()}", flush=True)
        make_fixture(fixture, args.small, 16384, big)
        # A 64 MiB file for the coalescing round.
        mid = fixture / "files" / "mid.bin"
        subprocess.run(
            ["head", "-c", str(64 << 20), "/dev/urandom"], stdout=mid.open("wb"), check=True
        )
        sha = subprocess.run(
            ["sha256sum", mid], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        with (fixture / "PULP_MANIFEST").open("a") as f:
            f.write(f"files/mid.bin,{sha},{64 << 20}\n")

        static, proxy, aio, ours = free_port(), free_port(), free_port(), free_port()
        nginx = Nginx(fixture, static, proxy, work / "nginx")
        nginx.start()
        upstream = f"http://127.0.0.1:{static}"
        access_log = nginx.access_log

        procs.append(start_aiohttp_proxy(upstream, aio, work / "aio"))
        config = streamer_config(work / "streamer.toml", ours, work / "var", upstream)
        subprocess.run(["streamer", "--config", config, "sync"], check=True)
        streamer = start_streamer(config, work / "twistd.log")
        procs.append(streamer)
        wait_port(aio)
        wait_port(ours)
        s_base, a_base = f"http://127.0.0.1:{ours}/bench", f"http://127.0.0.1:{aio}"
        mb = 1e6

        artifacts, aio_store = work / "var" / "artifacts", work / "aio" / "store"
        small = [f"files/{i:05d}.bin" for i in range(args.small)]

        def forget_stored() -> None:
            """Make every file cold again: the streamer serves an artifact missing from disk
            lazily (whatever the catalog's flag says); the peer re-fetches a missing file."""
            shutil.rmtree(artifacts, ignore_errors=True)
            shutil.rmtree(aio_store, ignore_errors=True)
            time.sleep(0.5)  # let the last commits settle
            settle()

        def settle() -> None:
            """Write back dirty pages first: the peer never flushes its copy, and its 1 GiB of
            writeback would otherwise be paid by whichever contender runs next."""
            os.sync()

        # Rounds alternate the contenders and keep each one's best, so a burst of load from
        # another process on the machine does not decide a ratio.
        def best(key: str, measure) -> None:
            value = measure()
            samples.setdefault(key, []).append(value)
            results[key] = max(float(results.get(key, 0.0)), value)

        def rotated(rows: list, turn: int) -> list:
            """The contenders in another order each round: whoever runs right after a 1 GiB
            write pays for the page cache it left (seen: 0.5x for the second in line)."""
            turn %= len(rows)
            return rows[turn:] + rows[:turn]

        big_path = "files/big.bin"
        for turn in range(args.repeat):
            # 1. Cold 1 GiB, then warm.
            forget_stored()
            cold_rows = [
                ("cold nginx proxy MB/s", f"http://127.0.0.1:{proxy}/{big_path}"),
                ("cold aiohttp MB/s", f"{a_base}/{big_path}"),
                ("cold streamer MB/s", f"{s_base}/{big_path}"),
            ]
            for key, url in rotated(cold_rows, turn):
                settle()
                best(key, lambda url=url: curl_speed(url) / mb)
            warm_rows = [
                ("warm nginx static MB/s", f"{upstream}/{big_path}"),
                ("warm aiohttp MB/s", f"{a_base}/{big_path}"),
                ("warm streamer MB/s", f"{s_base}/{big_path}"),
            ]
            for key, url in rotated(warm_rows, turn):
                best(key, lambda url=url: curl_speed(url) / mb)
        for turn in range(args.repeat):
            # 2. Small files, cold then warm.
            forget_stored()
            cold_small = [
                ("cold small aiohttp req/s", a_base),
                ("cold small streamer req/s", s_base),
            ]
            for key, base in rotated(cold_small, turn):
                settle()
                best(key, lambda base=base: small_files_rate(base, small))
            settle()
            warm_small = [
                ("warm small nginx static req/s", upstream),
                ("warm small aiohttp req/s", a_base),
                ("warm small streamer req/s", s_base),
            ]
            for key, base in rotated(warm_small, turn):
                best(key, lambda base=base: small_files_rate(base, small))

        # 3. Memory: a cold 1 GiB file (stored copy removed, catalog told), 10 slow + 1 fast.
        forget_stored()
        subprocess.run(["streamer", "--config", config, "sync"], check=True, capture_output=True)
        base_rss = rss_kib(streamer.pid)
        slow = [
            subprocess.Popen(
                ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "2M", f"{s_base}/files/big.bin"]
            )
            for _ in range(10)
        ]
        fast = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", f"{s_base}/files/big.bin"])
        peak = base_rss
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(streamer.pid))
            time.sleep(0.05)
        fast_done = fast.poll() is not None
        for p in [*slow, fast]:
            p.terminate()
            p.wait()
        results["memory: RSS growth MiB (10 slow + 1 fast, cold 1 GiB)"] = (peak - base_rss) / 1024
        results["memory: fast client done within 30 s"] = str(fast_done)

        # 4. Coalescing: 50 concurrent cold requests for the 64 MiB file.
        before = count_requests(access_log, "files/mid.bin")
        codes = concurrent_get(f"{s_base}/files/mid.bin", 50)
        results["coalescing: streamer upstream requests for 50 clients"] = (
            count_requests(access_log, "files/mid.bin") - before
        )
        results["coalescing: streamer 200 responses"] = sum(c == 200 for c in codes)
        before = count_requests(access_log, "files/mid.bin")
        concurrent_get(f"{a_base}/files/mid.bin", 50)
        results["coalescing: aiohttp upstream requests for 50 clients"] = (
            count_requests(access_log, "files/mid.bin") - before
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if nginx is not None:
            nginx.stop()

    def ratio(a: str, b: str) -> str:
        return f"{float(results[a]) / float(results[b]):.2f}x"

    results["ratio cold streamer/aiohttp"] = ratio("cold streamer MB/s", "cold aiohttp MB/s")
    results["ratio cold streamer/nginx proxy"] = ratio(
        "cold streamer MB/s", "cold nginx proxy MB/s"
    )
    results["ratio warm streamer/aiohttp"] = ratio("warm streamer MB/s", "warm aiohttp MB/s")
    results["ratio cold small streamer/aiohttp"] = ratio(
        "cold small streamer req/s", "cold small aiohttp req/s"
    )
    results["ratio warm small streamer/aiohttp"] = ratio(
        "warm small streamer req/s", "warm small aiohttp req/s"
    )
    print(f"best of {args.repeat} alternating rounds per throughput row")
    print("| measure | value |\n| --- | --- |")
    for key, value in results.items():
        shown = f"{value:.1f}" if isinstance(value, float) else value
        print(f"| {key} | {shown} |")
    record_raw("stream", {"best": results, "rounds": samples})
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
