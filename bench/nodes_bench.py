"""Several nodes on one storage folder and one PostgreSQL catalog: what each request costs the
catalog and the locks, and how many requests one PostgreSQL serves (docs/SCALING.md).

    python bench/nodes_bench.py nodes --nodes 2 4 8 --files 200 --seconds 8
    python bench/nodes_bench.py pgbench --clients 8 --seconds 5
    python bench/nodes_bench.py claim --count 5000
    python bench/nodes_bench.py follower --rounds 20

``nodes``: for each node count N, a fresh database in a private cluster (initdb, as the
``postgres`` user when root, ``pg_stat_statements`` preloaded, fsync off), a fresh storage
folder, N ``twistd -n streamer`` (one process each, each under ``strace -c -e trace=flock
--seccomp-bpf``: only flock stops the process), nginx as the upstream (benchlib.Nginx),
``streamer sync`` of an ``on_demand`` remote of FILES × 4 KiB files; then

* cold: every file asked twice, on two different nodes, by CLIENTS keep-alive clients;
* warm: SECONDS of GETs of random files on random nodes by CLIENTS keep-alive clients;

and counts upstream requests (nginx's access log), catalog statements (pg_stat_statements,
reset before each phase) and flock calls (strace's summaries at exit) per request.

``pgbench``: the catalog's lookup query (`store.postgres`) on 10,000 entries, run by
``pgbench`` with CLIENTS connections: the lookups per second one PostgreSQL answers here.

``claim``: the claims protocol of one cold request timed COUNT times on this machine's tmp
folder: of a body streamed through a temp file (claim, announce, headers, done, release) and of
a small body held in memory (claim, validated, release).

``follower``: a follower's delay between an owner's write and the follower seeing it, with
inotify and without (as on NFS, where no event tells of another machine's writes).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from benchlib import Nginx, free_port, make_fixture, record_raw, wait_port  # noqa: E402

from tests.support.postgres import PostgresCluster  # noqa: E402

PYTHON = sys.executable
TWISTD = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()"]


class StatsCluster(PostgresCluster):
    """The tests' private cluster, with pg_stat_statements loaded."""

    def _options(self) -> str:
        return super()._options() + " -c shared_preload_libraries=pg_stat_statements"


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def statements(url: str) -> tuple[int, list[tuple[int, str]]]:
    """Catalog statements since the last reset: (total calls, top 4 (calls, query))."""
    rows = sql(
        url,
        "SELECT calls, query FROM pg_stat_statements WHERE dbid = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND query NOT LIKE '%%pg_stat_statements%%' ORDER BY calls DESC",
    )
    return sum(calls for calls, _ in rows), [(c, q[:90]) for c, q in rows[:4]]


def reset(url: str) -> None:
    sql(url, "SELECT pg_stat_statements_reset()")


class Clients:
    """CLIENTS threads, each with keep-alive connections, doing GETs from a job source."""

    def __init__(self, ports: list[int], clients: int) -> None:
        self.ports = ports
        self.clients = clients
        #: What went wrong, by status or exception name.
        self.errors: collections.Counter[str] = collections.Counter()

    def run(self, next_job) -> tuple[int, int, float]:
        """Run until *next_job()* returns None: (requests, errors, seconds)."""
        done = [0, 0]
        lock = threading.Lock()

        def worker() -> None:
            conns: dict[int, http.client.HTTPConnection] = {}
            ok = bad = 0
            while (job := next_job()) is not None:
                port, path = job
                conn = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conns[port] = conn
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    ok += response.status == 200
                    if response.status != 200:
                        bad += 1
                        self.errors[str(response.status)] += 1
                except (OSError, http.client.HTTPException) as exc:
                    bad += 1
                    self.errors[type(exc).__name__] += 1
                    conn.close()
                    conns.pop(port, None)
            for conn in conns.values():
                conn.close()
            with lock:
                done[0] += ok
                done[1] += bad

        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return done[0], done[1], time.perf_counter() - started


def start_node(config: Path, port: int, work: Path, index: int) -> subprocess.Popen:
    argv = [
        "strace",
        "-f",
        "-c",
        "--seccomp-bpf",
        "-e",
        "trace=flock",
        "-o",
        str(work / f"strace-{index}.txt"),
        *TWISTD,
        "-n",
        "--pidfile=",
        "streamer",
        "--config",
        str(config),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
    ]
    log = open(work / f"node-{index}.log", "wb")  # noqa: SIM115 (closed with the process)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(BENCH.parent)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)


def wait_healthy(port: int, timeout: float = 60.0) -> None:
    """Until /healthz answers 200 (listening comes before the catalog is open: 503 before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"the node on port {port} did not become healthy")


def stop_node(process: subprocess.Popen) -> None:
    """SIGTERM the traced twistd (strace's child), then wait for strace's summary."""
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        os.kill(int(child), signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def flock_calls(path: Path) -> int:
    match = re.search(
        r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)(?:\s+\d+)?\s+flock$", path.read_text(), re.M
    )
    return int(match.group(1)) if match else 0


def bench_nodes(args: argparse.Namespace) -> dict:
    cluster = StatsCluster()
    results = {}
    try:
        for count in args.nodes:
            results[str(count)] = one_size(cluster, count, args)
    finally:
        cluster.destroy()
    return results


def one_size(cluster: PostgresCluster, count: int, args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"nodes-bench-{count}-"))
    os.chmod(work, 0o755)
    upstream_root = work / "upstream"
    make_fixture(upstream_root, args.files, 4096)
    nginx = Nginx(upstream_root, free_port(), free_port(), work / "nginx")
    nginx.start()
    url = cluster.new_database()
    sql(url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    nodes: list[subprocess.Popen] = []
    try:
        ports = [free_port() for _ in range(count)]
        configs = []
        for i in range(count):
            folder = work / f"node{i}"
            folder.mkdir()
            config = folder / "streamer.toml"
            config.write_text(
                "[server]\nprocesses = 1\ngrace_period = 2\n"
                f'[storage]\npath = "{work / "var"}"\n'
                f'[catalog]\nurl = "{url}"\n'
                "[[remotes]]\n"
                f'name = "demo"\nurl = "http://127.0.0.1:{nginx.static_port}/PULP_MANIFEST"\n'
            )
            configs.append(config)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = str(BENCH.parent)
        subprocess.run(
            [PYTHON, "-m", "streamer.cli", "--config", str(configs[0]), "sync"],
            check=True,
            capture_output=True,
            env=env,
        )
        nodes = [start_node(configs[i], ports[i], work, i) for i in range(count)]
        for port in ports:
            wait_port(port, timeout=60)
            wait_healthy(port)
        paths = [f"/demo/files/{n:05d}.bin" for n in range(args.files)]
        clients = Clients(ports, args.clients)
        upstream_before = len(nginx.access_log.read_text().splitlines())

        # cold: each file twice, on two different nodes
        jobs = [(ports[(i + k) % count], p) for i, p in enumerate(paths) for k in (0, 1)]
        random.Random(1).shuffle(jobs)
        it = iter(jobs)
        lock = threading.Lock()

        def next_cold():
            with lock:
                return next(it, None)

        reset(url)
        ok, bad, seconds = clients.run(next_cold)
        time.sleep(1.0)  # the last marks
        cold_statements, cold_top = statements(url)
        upstream = len(nginx.access_log.read_text().splitlines()) - upstream_before

        # warm: random files on random nodes for SECONDS
        deadline = time.perf_counter() + args.seconds
        rng = random.Random(2)

        def next_warm():
            if time.perf_counter() > deadline:
                return None
            with lock:
                return rng.choice(ports), rng.choice(paths)

        reset(url)
        wok, wbad, wseconds = clients.run(next_warm)
        warm_statements, warm_top = statements(url)
    finally:
        for node in nodes:
            stop_node(node)
        nginx.stop()
    flocks = sum(flock_calls(work / f"strace-{i}.txt") for i in range(count))
    result = {
        "nodes": count,
        "cold": {
            "requests": ok,
            "errors": bad,
            "seconds": round(seconds, 2),
            "requests_per_s": round(ok / seconds, 1),
            "upstream_requests": upstream,
            "statements": cold_statements,
            "statements_per_request": round(cold_statements / max(ok, 1), 2),
            "top": cold_top,
            "flock_calls": flocks,
            "flock_per_request": round(flocks / max(ok, 1), 2),
        },
        "warm": {
            "requests": wok,
            "errors": wbad,
            "seconds": round(wseconds, 2),
            "requests_per_s": round(wok / wseconds, 1),
            "statements": warm_statements,
            "statements_per_request": round(warm_statements / max(wok, 1), 3),
            "top": warm_top,
        },
    }
    result["errors"] = dict(clients.errors)
    print(json.dumps(result, indent=1))
    if clients.errors:
        print(f"errors: the nodes' logs are kept in {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return result


def bench_pgbench(args: argparse.Namespace) -> dict:
    """pgbench running the catalog's lookup query against 10,000 entries."""
    from store.postgres import _COLUMNS  # the columns a lookup reads

    cluster = PostgresCluster()
    try:
        url = cluster.new_database()
        # The schema and the entries, through the catalog itself (a child process: its
        # own reactor).
        subprocess.run(
            [PYTHON, "-c", _MAKE_SCHEMA, url, str(args.entries)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
        )
        script = Path(tempfile.mkdtemp()) / "lookup.sql"
        script.write_text(
            f"\\set n random(0, {args.entries - 1})\n"
            f"SELECT {_COLUMNS} FROM catalog_entries "
            "WHERE path = 'demo/files/' || lpad(:n::text, 5, '0') || '.bin' "
            "ORDER BY path, position, remote, url;\n"
        )
        os.chmod(script.parent, 0o755)
        os.chmod(script, 0o644)
        out = subprocess.run(
            [
                "pgbench",
                "-n",
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
                "-U",
                cluster.user,
                "-c",
                str(args.clients),
                "-j",
                "2",
                "-T",
                str(args.seconds),
                "-M",
                "prepared",
                "-f",
                str(script),
                url.rsplit("/", 1)[1],
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        cluster.destroy()
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
    result = {"clients": args.clients, "lookups_per_s": tps, "latency_ms": latency}
    print(json.dumps(result, indent=1))
    return result


_MAKE_SCHEMA = """
import sys
from twisted.internet import reactor, defer, task
from store import CatalogEntry
from store.postgres import PostgresCatalog

async def main(reactor, url, count):
    catalog = PostgresCatalog(url, reactor=reactor)
    await catalog.open()
    entries = [CatalogEntry(f"demo/files/{n:05d}.bin", "demo", f"http://h/{n}", 4096,
               {"sha256": "%064x" % n}) for n in range(count)]
    await catalog.replace_remote("demo", entries)
    await catalog.close()

task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1], int(sys.argv[2]))))
"""


def bench_claim(args: argparse.Namespace) -> dict:
    """One cold request's claim protocol, timed on this machine's tmp folder."""
    from twisted.internet.task import Clock

    from store import ArtifactStorage, CatalogEntry
    from streamer.claims import Claims

    root = Path(tempfile.mkdtemp(prefix="claim-bench-"))
    storage = ArtifactStorage(root / "var")
    claims = Claims(storage, Clock())
    temp = os.path.join(storage.temp_dir, ".download-x")
    headers = [(b"Content-Type", [b"application/octet-stream"])]
    times: dict[str, list[float]] = {"streamed": [], "memory": []}
    for n in range(args.count):
        for kind, spent in times.items():
            digest = hashlib.sha256(f"{kind}{n}".encode()).hexdigest()
            entry = CatalogEntry("demo/x", "demo", "http://h/x", 1, {"sha256": digest})
            started = time.perf_counter()
            claim = claims.claim_or_follow(entry, lambda _: None)
            if kind == "streamed":
                claim.announce(temp)
                claim.headers(headers, 200)
                claim.succeeded()
            else:
                claim.stored_later(headers, 200)
            claim.release()
            spent.append(time.perf_counter() - started)
    claims.close()
    subprocess.run(["rm", "-rf", str(root)], check=False)
    result: dict = {"count": args.count}
    for kind, spent in times.items():
        spent.sort()
        result[f"{kind}_median_us"] = round(statistics.median(spent) * 1e6, 1)
        result[f"{kind}_p99_us"] = round(spent[int(len(spent) * 0.99)] * 1e6, 1)
    print(json.dumps(result, indent=1))
    return result


def bench_follower(args: argparse.Namespace) -> dict:
    """How long after an owner's write a follower sees it: inotify, and the poll alone."""
    from twisted.internet import defer, reactor, task

    from store import ArtifactStorage, CatalogEntry
    from streamer.claims import Claims

    root = Path(tempfile.mkdtemp(prefix="follower-bench-"))
    storage = ArtifactStorage(root / "var")
    results: dict = {}

    class Client:
        def __init__(self) -> None:
            self.seen: defer.Deferred | None = None

        def progress(self) -> None:
            if self.seen is not None and not self.seen.called:
                self.seen.callback(time.perf_counter())

        def failed(self, error: BaseException) -> None:
            raise AssertionError(error)

    async def one(inotify: bool, wait: float, n: int) -> tuple[float, float]:
        owner_side, follower_side = Claims(storage, reactor), Claims(storage, reactor)
        if not inotify:
            follower_side._notify = False
        digest = hashlib.sha256(f"{inotify}{wait}{n}".encode()).hexdigest()
        entry = CatalogEntry("demo/x", "demo", "http://h/x", 10**6, {"sha256": digest})
        owner = owner_side.claim_or_follow(entry, lambda _: None)
        peer = follower_side.claim_or_follow(entry, lambda _: None)
        client = Client()
        peer.add(client)
        temp = os.path.join(storage.temp_dir, f".download-{digest[:8]}")
        with open(temp, "wb") as out:
            owner.announce(temp)
            # the upstream's answer comes *wait* seconds after the follower joined
            await task.deferLater(reactor, wait)
            client.seen = defer.Deferred()
            owner.headers([], 200)
            out.write(b"x" * 1000)
            out.flush()
            wrote = time.perf_counter()
            first = (await client.seen) - wrote
            # then a steady stream: one write, and the delay until the follower sees it
            await task.deferLater(reactor, 0.05)
            client.seen = defer.Deferred()
            out.write(b"y" * 1000)
            out.flush()
            wrote = time.perf_counter()
            later = (await client.seen) - wrote
        owner.failed(None)
        peer.remove(client)
        os.unlink(temp)
        owner_side.close()
        follower_side.close()
        return first, later

    async def main(_reactor) -> None:
        for inotify in (True, False):
            for wait in (0.01, 0.3, 2.0):
                firsts, laters = [], []
                for n in range(args.rounds if wait < 1 else max(3, args.rounds // 5)):
                    first, later = await one(inotify, wait, n)
                    firsts.append(first * 1000)
                    laters.append(later * 1000)
                key = f"{'inotify' if inotify else 'poll only'}, answer after {wait} s"
                results[key] = {
                    "first_byte_ms_median": round(statistics.median(firsts), 2),
                    "first_byte_ms_max": round(max(firsts), 2),
                    "next_write_ms_median": round(statistics.median(laters), 2),
                    "next_write_ms_max": round(max(laters), 2),
                }
                print(key, results[key], flush=True)
        record_raw("nodes_bench-follower", results)  # here: react exits the process

    task.react(lambda r: defer.ensureDeferred(main(r)))
    raise SystemExit(0)  # not reached: react exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("nodes")
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8)
    p = sub.add_parser("pgbench")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--entries", type=int, default=10000)
    p = sub.add_parser("claim")
    p.add_argument("--count", type=int, default=5000)
    p = sub.add_parser("follower")
    p.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    run = {
        "nodes": bench_nodes,
        "pgbench": bench_pgbench,
        "claim": bench_claim,
        "follower": bench_follower,
    }[args.what]
    record_raw(f"nodes_bench-{args.what}", run(args))


if __name__ == "__main__":
    main()
