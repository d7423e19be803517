#!/usr/bin/env python3
"""Soak: thousands of mixed requests and upstream faults against one `twistd -n streamer`.

    python bench/soak.py [--requests 3000] [--concurrency 16] [--seed 7] [--keep]

Loopback only, bounded in count and time (``--deadline`` seconds). The driver runs the
fault-injecting upstream of the test suite (a PULP_MANIFEST tree plus faulty paths), syncs
two remotes of it (``on_demand`` under /fixtures, ``streamed`` under /live) with
``streamer sync``, starts ``twistd -n streamer`` and sends a mix of cold and warm GETs,
Range and HEAD requests, client disconnects mid-body, faulty upstream paths and bad paths.

Afterwards it checks, against the figures taken after a warm-up phase: the process's open
file descriptors (/proc/PID/fd), the upstream's open connections and the temp files are back
to their baseline; RSS (start, after warm-up, peak, end) is flat; no request got a 500; the
service shuts down cleanly on SIGTERM; and ``streamer verify`` passes. Prints a Markdown
summary; exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import machine  # noqa: E402
from twisted.internet import defer, error, task  # noqa: E402

from tests.support import faults  # noqa: E402
from tests.support.clients import free_port, raw_http, run_process  # noqa: E402
from tests.support.upstream import UpstreamServer  # noqa: E402

KIB = 1024
#: Idle keep-alive connections a remote's pool may keep (its download_concurrency, default 10).
POOL_PER_REMOTE = 10


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Process:
    """What /proc says about the service process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


# --- the upstream --------------------------------------------------------------------------


class Upstream:
    """Good files in a tree, fault paths as behaviours, and a PULP_MANIFEST listing all."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.server = UpstreamServer().listen()
        self.server.check_leaks = False
        tree = root / "upstream"
        tree.mkdir()
        self.files: dict[str, bytes] = {}
        for i in range(300):
            self.files[f"file-{i:03d}.bin"] = rng.randbytes(rng.randint(1 * KIB, 128 * KIB))
        for i in range(4):
            self.files[f"big-{i}.bin"] = rng.randbytes(4096 * KIB)
        for name, data in self.files.items():
            (tree / name).write_bytes(data)
        body = rng.randbytes(64 * KIB)
        small = body[: 16 * KIB]
        self.faults: dict[str, bytes] = {
            "fault-reset.bin": body,
            "fault-close-early.bin": body,
            "fault-chunked.bin": small,
            "fault-wrong-bytes.bin": body,
            "fault-too-long.bin": body,
            "fault-too-short.bin": body,
            "fault-stall.bin": body,
            "fault-503.bin": body,
            "fault-500.bin": body,
            "fault-loop.bin": body,
            "fault-file-redirect.bin": body,
            "fault-huge-headers.bin": body,
            "fault-reset-once.bin": body,
        }
        behaviours = {
            "fault-reset.bin": faults.ResetAfter(4096, body),
            "fault-close-early.bin": faults.CloseEarly(1000, body),
            "fault-chunked.bin": faults.ChunkedNoLastChunk(small, 4096),
            "fault-wrong-bytes.bin": faults.WrongBytes(body),
            "fault-too-long.bin": faults.WrongSize(body, 100),
            "fault-too-short.bin": faults.WrongSize(body, -100),
            "fault-stall.bin": faults.StallMidBody(8192, body),
            "fault-503.bin": faults.Status(503, {"Retry-After": "1"}),
            "fault-500.bin": faults.Status(500),
            "fault-loop.bin": faults.RedirectLoop(),
            "fault-file-redirect.bin": faults.RedirectTo("file:///etc/passwd"),
            "fault-huge-headers.bin": faults.HugeHeaders(64 * KIB, body),
            "fault-reset-once.bin": faults.Steps(
                [faults.ResetAfter(4096, body), faults.Serve(body)]
            ),
        }
        for name, behaviour in behaviours.items():
            self.server.register(f"/repo/{name}", behaviour)
        self.slow: dict[str, bytes] = {}
        for i in range(20):
            data = rng.randbytes(512 * KIB)
            self.slow[f"slow-{i:02d}.bin"] = data
            self.server.register(f"/repo/slow-{i:02d}.bin", faults.Trickle(data, 4096 * KIB, 0.01))
        listed = {**self.files, **self.faults, **self.slow}
        manifest = "".join(f"{n},{sha256(d)},{len(d)}\n" for n, d in sorted(listed.items()))
        (tree / "PULP_MANIFEST").write_text(manifest)
        self.server.serve_tree("/repo", tree)

    @property
    def manifest_url(self) -> str:
        return self.server.url("/repo/PULP_MANIFEST")


# --- the request mix -------------------------------------------------------------------------


def http(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: soak", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def split(data: bytes) -> tuple[int, bytes]:
    match = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return (int(match.group(1)) if match else 0), data.partition(b"\r\n\r\n")[2]


class Mix:
    """Draws requests and judges their answers; counts what happened."""

    def __init__(self, upstream: Upstream, port: int, rng: random.Random) -> None:
        self.up = upstream
        self.port = port
        self.rng = rng
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def problem(self, text: str) -> None:
        self.count("problem")
        if len(self.problems) < 20:
            self.problems.append(text)

    async def one(self) -> None:
        roll = self.rng.random()
        rng, files = self.rng, self.up.files
        name = rng.choice(list(files))
        try:
            if roll < 0.35:
                await self.get(f"/fixtures/{name}", files[name], "get")
            elif roll < 0.45:
                await self.get(f"/live/{name}", files[name], "get-streamed")
            elif roll < 0.58:
                await self.range(name, files[name])
            elif roll < 0.66:
                await self.head(name, files[name])
            elif roll < 0.78:
                await self.disconnect()
            elif roll < 0.95:
                await self.fault()
            else:
                await self.bad_path()
        except Exception as failed:  # a soak counts, it does not stop
            self.problem(f"driver error: {type(failed).__name__}: {failed}")

    async def fetch(self, payload: bytes, timeout: float = 30.0) -> Any:
        return await raw_http("127.0.0.1", self.port, payload, timeout=timeout)

    async def get(self, target: str, data: bytes, kind: str) -> None:
        result = await self.fetch(http(target))
        status, body = split(result.data)
        if status != 200 or body != data:
            self.problem(f"{kind} {target}: {status}, {len(body)} of {len(data)} bytes")
        self.count(kind)

    async def range(self, name: str, data: bytes) -> None:
        first = self.rng.randrange(len(data))
        last = min(len(data) - 1, first + self.rng.randrange(1, 8192))
        spec = f"{first}-{last}" if self.rng.random() < 0.7 else f"0-9,{first}-{last}"
        result = await self.fetch(http(f"/fixtures/{name}", f"Range: bytes={spec}"))
        status, body = split(result.data)
        ok = status == 206 and (data[first : last + 1] in body)
        if not ok and not (status == 200 and body == data):
            self.problem(f"range {name} {spec}: {status}")
        self.count("range")

    async def head(self, name: str, data: bytes) -> None:
        result = await self.fetch(http(f"/fixtures/{name}", method="HEAD"))
        status, body = split(result.data)
        if status != 200 or body or f"Content-Length: {len(data)}".encode() not in result.data:
            self.problem(f"head {name}: {status}")
        self.count("head")

    async def disconnect(self) -> None:
        pool = {**self.up.slow, **{n: d for n, d in self.up.files.items() if n.startswith("big")}}
        name = self.rng.choice(list(pool))
        base = "live" if self.rng.random() < 0.3 else "fixtures"
        try:
            result = await self.fetch(http(f"/{base}/{name}"), self.rng.uniform(0.01, 0.1))
        except error.TimeoutError:  # gave up while connecting: a disconnect too
            self.count("disconnect-while-connecting")
            return
        status, _ = split(result.data)
        if status not in (0, 200):
            self.problem(f"disconnect {base}/{name}: {status}")
        self.count("disconnect")

    async def fault(self) -> None:
        name = self.rng.choice(list(self.up.faults))
        result = await self.fetch(http(f"/fixtures/{name}"), timeout=30)
        status, body = split(result.data)
        data = self.up.faults[name]
        good = (status == 200 and body == data) or status in (502, 504)
        aborted = (status in (0, 200)) and len(body) < len(data) and not result.clean
        if not (good or aborted) or status == 500:
            self.problem(f"fault {name}: {status}, {len(body)} bytes, clean={result.clean}")
        self.count("fault")

    async def bad_path(self) -> None:
        target = self.rng.choice(
            ["/fixtures/missing.bin", "/fixtures/%2e%2e/%2e%2e/etc/passwd", "/fixtures/a%00b"]
        )
        result = await self.fetch(http(target))
        status, _ = split(result.data)
        if status not in (400, 404):
            self.problem(f"bad path {target}: {status}")
        self.count("bad-path")


# --- the run -----------------------------------------------------------------------------------


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = await raw_http("127.0.0.1", port, http("/healthz"), timeout=2)
            if split(result.data)[0] == 200:
                return
        except Exception:  # not listening yet
            pass
        await sleep(0.2)
    raise SystemExit("the streamer did not become ready")


async def run_batch(mix: Mix, count: int, concurrency: int, deadline: float) -> None:
    semaphore = defer.DeferredSemaphore(concurrency)

    async def guarded() -> None:
        if time.monotonic() < deadline:
            await mix.one()

    await defer.gatherResults(
        [semaphore.run(lambda: defer.ensureDeferred(guarded())) for _ in range(count)]
    )


async def settle(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await sleep(0.2)
    return True


async def main(reactor: Any, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    upstream = Upstream(work, rng)
    port = free_port()
    config = work / "streamer.toml"
    config.write_text(
        f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\ngrace_period = 5\n'
        "stall_timeout = 2\n"
        '[storage]\npath = "var"\n'
        f'[[remotes]]\nname = "fixtures"\nurl = "{upstream.manifest_url}"\n'
        'policy = "on_demand"\nmax_retries = 1\nsock_read_timeout = 2\n'
        f'[[remotes]]\nname = "live"\nurl = "{upstream.manifest_url}"\n'
        'policy = "streamed"\nmax_retries = 1\nsock_read_timeout = 2\n'
    )
    code, out, err = await run_process("streamer", "--config", str(config), "sync", timeout=120)
    if code != 0:
        raise SystemExit(f"streamer sync failed ({code}): {err.decode()[-500:]}")
    upstream.server.clear_log()
    log = open(work / "twistd.log", "wb")  # noqa: SIM115 - closed at the end
    service = subprocess.Popen(
        ["twistd", "-n", "--pidfile=", "streamer", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )
    proc = Process(service.pid)
    tmp_dir = work / "var" / "tmp"
    samples: list[float] = []
    try:
        await wait_ready(port)
        start = {"fds": proc.fds(), "rss": proc.rss_mib()}
        sampler = task.LoopingCall(lambda: samples.append(proc.rss_mib()))
        sampler.start(0.5)
        mix = Mix(upstream, port, rng)
        deadline = time.monotonic() + args.deadline
        began = time.monotonic()

        warmup = max(200, args.requests // 10)
        await run_batch(mix, warmup, args.concurrency, deadline)
        await settle(lambda: not any(tmp_dir.iterdir()), 10)
        await sleep(3)  # let timers (stall, cooldown) and pooled connections settle
        warm = {
            "fds": proc.fds(),
            "rss": proc.rss_mib(),
            "conns": upstream.server.open_connections,
        }

        await run_batch(mix, args.requests - warmup, args.concurrency, deadline)
        elapsed = time.monotonic() - began
        await settle(lambda: not any(tmp_dir.iterdir()) and proc.fds() <= warm["fds"], 15)
        await sleep(3)
        end = {
            "fds": proc.fds(),
            "rss": proc.rss_mib(),
            "conns": upstream.server.open_connections,
            "tmp": len(list(tmp_dir.iterdir())),
        }
        sampler.stop()
        service.send_signal(signal.SIGTERM)
        await settle(lambda: service.poll() is not None, 20)
        exit_status = service.poll()
        await settle(lambda: upstream.server.open_connections == 0, 5)
        end["conns_after_exit"] = upstream.server.open_connections
        v_code, v_out, v_err = await run_process(
            "streamer", "--config", str(config), "verify", timeout=120
        )
    finally:
        if service.poll() is None:
            service.kill()
        log.close()
    upstream_requests = len(upstream.server.all_requests())
    await upstream.server.stop()

    done = sum(v for k, v in mix.counts.items() if k != "problem")
    # Idle keep-alive connections in the remotes' pools are a bounded steady state, each one
    # an fd: the fds apart from them must be back at the warm baseline.
    pool_cap = POOL_PER_REMOTE * 2
    checks = {
        "fds (apart from pooled connections) back to the warm baseline": end["fds"] - end["conns"]
        <= warm["fds"] - warm["conns"],
        f"upstream connections within the pools' keep-alive cap ({pool_cap})": end["conns"]
        <= pool_cap,
        "no upstream connection after shutdown": end["conns_after_exit"] == 0,
        "no temp files": end["tmp"] == 0,
        "RSS flat (end within 16 MiB of warm)": end["rss"] - warm["rss"] < 16,
        "no unexpected answer (never a 500)": mix.counts.get("problem", 0) == 0,
        "clean exit on SIGTERM": exit_status == 0,
        "streamer verify passes": v_code == 0,
        "all requests sent within the deadline": done == args.requests,
    }
    print(f"## Soak: {done} requests in {elapsed:.1f} s ({done / elapsed:.0f} req/s)\n")
    print(
        f"Command: `python bench/soak.py --requests {args.requests} "
        f"--concurrency {args.concurrency} --seed {args.seed}`  "
    )
    print(f"Machine: {machine()}\n")
    print("| mix | count |\n|---|---|")
    for kind, number in sorted(mix.counts.items()):
        print(f"| {kind} | {number} |")
    print(f"\nUpstream requests: {upstream_requests}\n")
    print("| figure | start | after warm-up | end | peak |\n|---|---|---|---|---|")
    print(f"| open fds | {start['fds']} | {warm['fds']} | {end['fds']} | |")
    print(
        f"| upstream connections | | {warm['conns']} | {end['conns']} "
        f"(0 after shutdown: {end['conns_after_exit']}) | |"
    )
    print(f"| temp files | | | {end['tmp']} | |")
    print(
        f"| RSS MiB | {start['rss']:.1f} | {warm['rss']:.1f} | {end['rss']:.1f} "
        f"| {max(samples or [0]):.1f} |"
    )
    verified = v_out.decode().strip().replace(str(work), "<work>")[-200:]
    print(f"\n`streamer verify`: exit {v_code}: {verified}")
    print("\n| check | result |\n|---|---|")
    for name, passed in checks.items():
        print(f"| {name} | {'pass' if passed else 'FAIL'} |")
    for problem in mix.problems:
        print(f"- {problem}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    else:
        print(f"\nkept: {work}")
    return 0 if all(checks.values()) else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds, at most")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
