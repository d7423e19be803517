"""Several server processes on one port (``[server] processes``), driven from outside.

A real ``twistd -n streamer`` with three processes, real curl clients on separate connections
(the kernel hands each to whichever process accepts first), the loopback upstream of
tests/support, and SIGKILL of one process: one upstream request per artifact for the whole
group, bytes streamed from another process's temp file, nothing unvalidated handed out, and
nothing half-written left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from streamer.metrics import FLUSH_INTERVAL
from tests.integration.test_end_to_end import (
    artifact_path,
    sha256,
    streamer_cli,
    temp_files,
    wait_for,
    write_config,
)
from tests.support.faults import Gated, Serve, Trickle, WrongBytes
from tests.support.polling import holds_within, until
from tests.support.twistd import TWISTD, child_env, start_twistd, twistd
from tests.support.upstream import UpstreamServer

PROCESSES = 3
_ACCESS_LINE = re.compile(
    r'\S+ \[streamer\.access#info\] 127\.0\.0\.1 "GET /\S*" \d{3} \d+ [\d.]+s'
    r" cache=\S+( upstream=\d+)?"
)
#: An access line of any process in twistd's text log.
_ACCESS_LINE_OF_ANY = re.compile(
    r'\S+ \[streamer\.access#info( process \d+)?\] 127\.0\.0\.1 "GET /\S*" \d{3} \d+ [\d.]+s'
    r" cache=\S+"
)
_SERVED_BY = re.compile(r'\[streamer\.access#info( process (\d+))?\] .*"GET (\S+)" (\d+)')


async def settle(seconds: float = 0.1) -> None:
    await deferLater(reactor, seconds)


def helper_pids(parent: int) -> list[int]:
    """The pids of *parent*'s child processes (from /proc)."""
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(name))
    return children


def served_by(output: str, path: str) -> list[int]:
    """The process numbers (0: the first) whose access lines answered *path*."""
    return [int(m.group(2) or 0) for m in _SERVED_BY.finditer(output) if m.group(3) == path]


async def group(
    tmp_path: Path,
    upstream: UpstreamServer,
    files: dict[str, bytes],
    server: str = "",
    processes: int = PROCESSES,
) -> Path:
    """A catalog of *files* (lazily recorded) and a config for a group of *processes*, with
    *server* lines added to its ``[server]`` table."""
    lines = []
    for name, data in files.items():
        lines.append(f"{name},{sha256(data)},{len(data)}\n")
    upstream.register("/repo/PULP_MANIFEST", Serve("".join(lines).encode()))
    config = write_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"), grace_period=2)
    text = config.read_text().replace(
        "[server]\n", f"[server]\nprocesses = {processes}\n{server}", 1
    )
    config.write_text(text)
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    return config


async def all_serving(served, processes: int = PROCESSES) -> None:
    """Wait until every helper process of a group of *processes* logged that it serves."""

    async def ready() -> bool:
        return served.output.count("(a helper process)") >= processes - 1

    await wait_for(ready, "every helper serving", timeout=30, output=lambda: served.proto.output)


async def curl_many(served, path: str, n: int) -> list[tuple[int, bytes, bytes]]:
    """*n* curls at once, each on its own connection: (exit code, body, stderr) each."""
    runs = [served.curl(path, "-sS", "--max-time", "30") for _ in range(n)]
    return await defer.gatherResults(runs)


async def released_together(
    served, gate: Gated, path: str, n: int, every_process: bool = False
) -> list[tuple[int, bytes, bytes]]:
    """*n* curls of *path* at once, held by *gate* until all of them reached the group and
    its one upstream request is parked; then released: their (exit code, body, stderr).

    The clients reach the group in two waves, so both sides of the claim are sure to be
    there whatever the machine's load: the first half while the first process is stopped
    (the helpers take them, one of them owns the download), the rest while the helpers are
    stopped (the first process takes them: followers of another process's download). Left
    to the kernel, a busy machine could hand every connection to one process.
    *every_process*: one wave per process instead (the others stopped), so that every
    process has clients of the download."""
    parent = served.process.pid
    helpers = helper_pids(parent)
    runs: list = []

    async def wave(stopped: list[int], count: int) -> None:
        # A process stopped with figures not yet written (a scrape it just answered) holds
        # every scrape `SCRAPE_WAIT` s: give it the time to write them first (only speed
        # rides on this sleep, not the outcome).
        await settle(2 * FLUSH_INTERVAL)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            runs.extend(served.curl(path, "-sS", "--max-time", "30") for _ in range(count))
            total = len(runs)

            async def arrived() -> bool:
                # The scrape is answered by a process that is not stopped.
                in_flight = (await served.metrics())["streamer_requests_in_flight"]
                return gate.waiting == 1 and in_flight >= total + 1  # the clients and the scrape

            await wait_for(arrived, f"{total} clients waiting", output=lambda: served.proto.output)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)

    if every_process:
        everyone = [parent, *helpers]
        for number, pid in enumerate(everyone):
            share = n // len(everyone) + (number < n % len(everyone))
            await wave([other for other in everyone if other != pid], share)
    else:
        await wave([parent], n // 2)
        await wave(helpers, n - n // 2)
    gate.release()
    return await defer.gatherResults(runs)


async def one_by_each_process(served, path: str) -> list[tuple[int, bytes, bytes]]:
    """A curl of *path* answered by each process in turn (the others stopped meanwhile)."""
    everyone = [served.process.pid, *helper_pids(served.process.pid)]
    results = []
    for pid in everyone:
        others = [other for other in everyone if other != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            results.append(await served.curl(path, "-sS", "--max-time", "30"))
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
    return results


async def answered_by(served, path: str, n: int) -> list[int]:
    """The process numbers of the access lines of *path*, once there are *n* of them (a
    helper's lines reach the first process's log a moment after its client has its
    answer)."""

    async def logged() -> list[int]:
        by = served_by(served.output, path)
        return by if len(by) >= n else []

    await wait_for(logged, f"{n} access lines of {path}", output=lambda: served.proto.output)
    return served_by(served.output, path)


async def downloaded_once_for_all(
    served, upstream: UpstreamServer, gate: Gated, name: str, data: bytes, storage: Path
) -> None:
    """20 clients of ``/demo/NAME`` released together over the group: each gets *data*
    whole, from one upstream request, answered by at least two processes; then the artifact
    is stored (its commit follows the last byte: its batch waits for company, then syncfs)."""
    results = await released_together(served, gate, f"/demo/{name}", 20)
    assert [code for code, _, _ in results] == [0] * 20, [e for _, _, e in results]
    assert all(body == data for _, body, _ in results)
    assert len(upstream.requests(f"/repo/{name}")) == 1
    by = await answered_by(served, f"/demo/{name}", 20)
    assert len(by) == 20 and len(set(by)) >= 2, by
    stored = artifact_path(storage, data)
    assert await holds_within(stored.exists, timeout=10)
    assert stored.read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_processes_share_the_port_log_through_one_and_drain_on_sigterm(tmp_path):
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"}, 'access_log = "access.log"\n')
        async with twistd(config) as served:
            await all_serving(served)
            parent = served.process.pid
            helpers = helper_pids(parent)
            assert len(helpers) == PROCESSES - 1, served.output
            results = await curl_many(served, "/healthz", 60)
            assert all(code == 0 and body == b"ok\n" for code, body, _ in results)
            metrics = await served.metrics()
            # /metrics in any process: the totals of all of them.
            requests = await served.curl("/metrics", "-sS")
            total = re.search(
                rb'streamer_requests_total\{method="GET",status="200"\} (\S+)', requests[1]
            )
            assert total is not None and float(total.group(1)) >= 60, requests[1][-2000:]
            assert metrics["streamer_requests_in_flight"] >= 1
        code = await served.stop()
        # Every process appended to one access log: whole lines, one per request.
        lines = (tmp_path / "access.log").read_text().splitlines()
        healthz = [line for line in lines if '"GET /healthz" 200 3 ' in line]
        assert len(healthz) >= 60
        assert all(_ACCESS_LINE.fullmatch(line) for line in lines), lines
        assert code == 0, served.output
        assert not [pid for pid in helpers if Path(f"/proc/{pid}").exists()]
        assert "Traceback" not in served.output
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_scrape_counts_what_a_stopped_process_answered_before_it(tmp_path):
    """Two processes: the helper answers a request and is stopped (``SIGSTOP``) right after,
    before it wrote its figures to the shared folder (`FLUSH_INTERVAL` after the request); a
    scrape answered by the first process meanwhile waits for them (the helper is resumed
    0.5 s later) and counts that request. Before, /metrics answered 0.15 s after it was asked
    whatever the others had written, and showed no miss here (the README's quick start failed
    that way on CI: ``curl /metrics`` right after two requests, one answered by a helper
    kept off a core)."""
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"}, processes=2)
        upstream.register("/repo/a.txt", Serve(b"a\n"))
        async with twistd(config) as served:
            await all_serving(served, processes=2)
            first = served.process.pid
            (helper,) = helper_pids(first)
            await sigstop(first)  # the helper takes the connection
            try:
                response = await treq.get(served.base + "/demo/a.txt", persistent=False)
                body = await treq.content(response)
                os.kill(helper, signal.SIGSTOP)  # right after its answer
            finally:
                os.kill(first, signal.SIGCONT)
            resume = reactor.callLater(0.5, os.kill, helper, signal.SIGCONT)
            try:
                metrics = await served.metrics()
            finally:
                if resume.active():
                    resume.cancel()
                    os.kill(helper, signal.SIGCONT)
            assert (response.code, body) == (200, b"a\n")
            assert metrics["streamer_cache_misses_total"] == 1, served.output
            assert await answered_by(served, "/demo/a.txt", 1) == [1]  # (by the helper)
        assert await served.stop() == 0, served.output
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_sighup_and_sigusr1_reopen_the_access_log_in_every_process_and_stop_nothing(
    tmp_path,
):
    """Log rotation renames ``access.log`` away and sends SIGHUP (or SIGUSR1) to the first
    process: every process writes to a new ``access.log`` from then on, and none stops.
    Before, either signal's default action ended the whole group at once."""
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"}, 'access_log = "access.log"\n')
        async with twistd(config) as served:
            await all_serving(served)
            parent = served.process.pid
            helpers = helper_pids(parent)
            log = tmp_path / "access.log"
            for number, name in enumerate(("SIGHUP", "SIGUSR1"), start=1):
                await curl_many(served, "/healthz", 30)

                def written() -> bool:
                    # (each process writes its lines every 0.1 s: a busy one later)
                    return log.read_text().count('"GET /healthz" 200 3 ') >= 30

                await until(written, timeout=10, what="the lines of 30 requests written")
                log.rename(tmp_path / f"access.log.{number}")
                os.kill(parent, getattr(signal, name))
                reopened = f"{name}: access log reopened; still serving"

                async def every_process_reopened(reopened: str = reopened) -> bool:
                    return served.output.count(reopened) == PROCESSES

                await until(every_process_reopened, timeout=10, what=f"{name} handled")
            results = await curl_many(served, "/healthz", 30)
            assert all(code == 0 and body == b"ok\n" for code, body, _ in results)
            assert helper_pids(parent) == helpers  # none stopped or restarted
        assert await served.stop() == 0, served.output
        for rotated in ("access.log.1", "access.log.2", "access.log"):
            lines = (tmp_path / rotated).read_text().splitlines()
            assert len([line for line in lines if '"GET /healthz" 200 3 ' in line]) >= 30
            assert all(_ACCESS_LINE.fullmatch(line) for line in lines), lines
        assert "Traceback" not in served.output
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_an_access_log_that_cannot_be_reopened_is_one_warning_per_process(tmp_path):
    """SIGHUP after the access log's folder was removed: one warning per process, the old
    file kept, nothing stops (before: a critical `while calling from thread` traceback)."""
    upstream = await UpstreamServer().start()
    try:
        (tmp_path / "logs").mkdir()
        server = 'access_log = "logs/access.log"\n'
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"}, server)
        async with twistd(config) as served:
            await all_serving(served)
            (tmp_path / "logs").rename(tmp_path / "gone")
            os.kill(served.process.pid, signal.SIGHUP)
            warning = "SIGHUP: cannot reopen the access log (No such file or directory)"

            async def every_process_warned() -> bool:
                return served.output.count(warning) == PROCESSES

            await until(every_process_warned, timeout=10, what="a warning per process")
            assert (await served.curl("/healthz"))[:2] == (0, b"ok\n")
        assert await served.stop() == 0, served.output
        assert "Traceback" not in served.output
        assert '"GET /healthz" 200 3 ' in (tmp_path / "gone" / "access.log").read_text()
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_sighup_while_helpers_start_waits_for_them_instead_of_ending_them(tmp_path):
    """SIGHUPs sent to the first process as soon as it is ready, while its helpers are still
    starting (importing, opening the catalog): each helper handles them once its handlers
    are in, none is ended by the signal's default action (before: `helper process N ... was
    killed by signal 1; starting it again`)."""
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"})
        served = start_twistd(config.parent, ["--config", str(config)])
        try:

            async def first_ready() -> bool:
                return "[streamer.service#info] streamer ready" in served.output

            await until(first_ready, timeout=30, what="the first process ready")
            sent = 0
            while served.output.count("(a helper process)") < PROCESSES - 1 and sent < 100:
                os.kill(served.process.pid, signal.SIGHUP)
                sent += 1
                await settle(0.05)
            await all_serving(served)
            assert sent > 1  # some went out while helpers were starting

            async def every_process_handled() -> bool:
                lines = re.findall(r"#info( process \d)?\] SIGHUP: ", served.output)
                return len(set(lines)) == PROCESSES

            await until(every_process_handled, timeout=10, what="every process handled SIGHUP")
            assert "killed by signal" not in served.output, served.output[-3000:]
            assert (await served.curl("/healthz"))[:2] == (0, b"ok\n")
        finally:
            code = await served.stop()
        assert code == 0, served.output[-3000:]
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_every_process_appends_whole_access_lines_to_twistds_log_file(tmp_path):
    """The default destination, twistd's ``--logfile`` (the one the benches use): the access
    lines of every process in that file, whole, once each, in twistd's text format, through
    a rotation (SIGUSR1: twistd's log file starts a new file) under concurrent requests."""
    upstream = await UpstreamServer().start()
    log_file = tmp_path / "twistd.log"
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"})
        served = start_twistd(
            config.parent, ["--config", str(config)], before=["--logfile", str(log_file)]
        )
        try:
            await served.healthy()

            async def serving() -> bool:
                return log_file.read_text().count("(a helper process)") >= PROCESSES - 1

            await wait_for(serving, "every helper serving", timeout=30, output=log_file.read_text)
            # twistd's log file takes rendered lines: the helpers render theirs (no events).
            for pid in helper_pids(served.process.pid):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                assert b"STREAMER_ACCESS_LINES=text" in environ
            long = "x" * 3000  # lines of several KiB: a torn one would show
            paths = [f"/demo/{long}{i}" for i in range(90)]
            first = [served.curl(path, "-sS", "-o", "/dev/null") for path in paths[:45]]
            first += [served.curl("/healthz", "-sS") for _ in range(45)]
            await defer.gatherResults(first)
            os.kill(served.process.pid, signal.SIGUSR1)
            later = [served.curl(path, "-sS", "-o", "/dev/null") for path in paths[45:]]
            later += [served.curl("/healthz", "-sS") for _ in range(45)]
            await defer.gatherResults(later)
        finally:
            code = await served.stop()
        assert code == 0, served.output
        rotated = tmp_path / "twistd.log.1"
        assert rotated.exists()
        lines = rotated.read_text().splitlines() + log_file.read_text().splitlines()
        access = [line for line in lines if "[streamer.access#info" in line]
        assert all(_ACCESS_LINE_OF_ANY.fullmatch(line) for line in access), [
            line[:200] for line in access if not _ACCESS_LINE_OF_ANY.fullmatch(line)
        ]
        answered = [m.group(3) for m in map(_SERVED_BY.search, access) if m]
        assert sorted(path for path in answered if path != "/healthz") == sorted(paths)
        assert answered.count("/healthz") >= 90  # and the ones that waited for it to be healthy
        assert {int(m.group(2) or 0) for m in map(_SERVED_BY.search, access) if m} == set(
            range(PROCESSES)
        ), "every process answered some"
        assert "Traceback" not in "\n".join(lines)
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_helper_is_logged_and_started_again(tmp_path):
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"})
        async with twistd(config) as served:
            await all_serving(served)
            victim = helper_pids(served.process.pid)[0]
            os.kill(victim, 9)

            async def replaced() -> bool:
                pids = helper_pids(served.process.pid)
                return len(pids) == PROCESSES - 1 and victim not in pids

            await wait_for(replaced, "a new helper", timeout=30, output=lambda: served.proto.output)
            assert f"(pid {victim}) was killed by signal 9; starting it again" in served.output
            results = await curl_many(served, "/healthz", 20)
            assert all(code == 0 for code, _, _ in results)
        assert await served.stop() == 0
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_restarted_helper_takes_no_connection_before_it_is_ready(tmp_path):
    """A helper adopts the socket at start but accepts only once its catalog is open: until
    then the ready processes take every connection (no 503 "service not ready")."""
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"})
        head = ("-sS", "-I", "-o", "/dev/null", "-w", "%{http_code}")  # from the catalog
        async with twistd(config) as served:
            await all_serving(served)
            # The catalog's write lock, held from outside: a starting process waits for it
            # (its schema check is a write transaction); the running ones read on (WAL).
            lock = sqlite3.connect(tmp_path / "var" / "catalog.sqlite3", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            try:
                adopted = served.output.count("(a helper process)")
                os.kill(helper_pids(served.process.pid)[0], 9)

                async def restarted() -> bool:
                    return served.output.count("(a helper process)") > adopted

                await wait_for(restarted, "a new helper", timeout=30, output=lambda: "")
                heads = [served.curl("/demo/a.txt", *head) for _ in range(30)]
                codes = [out for _, out, _ in await defer.gatherResults(heads)]
                assert "streamer ready" not in served.output.split("(a helper process)")[-1]
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            assert codes == [b"200"] * 30, codes

            async def ready() -> bool:
                return "streamer ready" in served.output.split("(a helper process)")[-1]

            await wait_for(ready, "the new helper ready", timeout=30, output=lambda: "")
            heads = [served.curl("/demo/a.txt", *head) for _ in range(12)]
            assert [out for _, out, _ in await defer.gatherResults(heads)] == [b"200"] * 12
        assert await served.stop() == 0
    finally:
        await upstream.stop()


#: Requests on each connection of the burst test.
PIPELINED = 8


def _answers(clients: list[socket.socket]) -> list[bytes]:
    """The head of the answer on each of *clients* (blocking: run it in a thread)."""
    heads = []
    for client in clients:
        client.settimeout(20)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(4096)
            if not chunk:
                break
            data += chunk
        heads.append(data.split(b"\r\n", 1)[0])
    return heads


@pytest_twisted.ensureDeferred
async def test_a_burst_of_connections_is_spread_over_the_processes(tmp_path):
    """Connections waiting together on the shared socket go to every process, not all to the
    process that wakes first (before: it accepted every waiting connection in one loop, and
    one process of three often took none: 0/17/43, 22/38/0, 17/43/0 of 60; now 16/20/24,
    4/15/41, 5/43/12, 12/25/23)."""
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"a.txt": b"a\n"})
        async with twistd(config) as served:
            await all_serving(served)

            async def all_ready() -> bool:
                return served.output.count("streamer ready") >= PROCESSES

            await wait_for(all_ready, "every process ready", output=lambda: served.proto.output)
            port = int(served.base.rsplit(":", 1)[1])
            pids = [served.process.pid, *helper_pids(served.process.pid)]
            count = 20 * PROCESSES
            seen = len(served.output)
            # Each connection brings several requests (pipelined), so that a process spends a
            # few reactor turns on each connection it accepted before it accepts the next
            # (Twisted's accept loop took them all before any request was read): the burst
            # lasts long enough that all three processes get a core during it. With one
            # request each, two processes on this 2-core machine could drain it before the
            # third was scheduled ([0, 34, 26] on a loaded machine, 1 run in 30).
            # Every process stopped while the connections and their requests arrive: they
            # all wait on the socket when the processes go on.
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
                for client in clients:
                    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n" * PIPELINED)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            try:
                heads = await threads.deferToThread(_answers, clients)
            finally:
                for client in clients:
                    client.close()
            assert heads == [b"HTTP/1.1 200 OK"] * count

            async def logged() -> list[int]:
                by = served_by(served.output[seen:], "/healthz")
                return by if len(by) >= count * PIPELINED else []

            by = await until(logged, timeout=10, what="every access line")
            shares = [by.count(index) for index in range(PROCESSES)]
            assert all(shares), shares  # every process took part
        assert await served.stop() == 0
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_cold_requests_across_processes_make_one_upstream_request(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    upstream = await UpstreamServer().start()
    gate = Gated(Trickle(data, bytes_per_sec=8 * 1024 * 1024, interval=0.02))
    try:
        config = await group(tmp_path, upstream, {"big.bin": data})
        upstream.register("/repo/big.bin", gate)
        async with twistd(config) as served:
            await all_serving(served)
            await downloaded_once_for_all(served, upstream, gate, "big.bin", data, tmp_path / "var")

            # The download leaves the in-flight gauge once committed, so after the last byte.
            async def settled() -> dict:
                metrics = await served.metrics()
                return metrics if metrics["streamer_downloads_in_flight"] == 0 else {}

            metrics = await until(settled, timeout=10, what="no download in flight")
            # One download in all: the followers in other processes count none.
            assert metrics["streamer_downloads_total"] == 1
            # A warm request from any process: no upstream request.
            again = await curl_many(served, "/demo/big.bin", 6)
            assert all(body == data for _, body, _ in again)
            assert len(upstream.requests("/repo/big.bin")) == 1
        assert await served.stop() == 0
        assert temp_files(tmp_path / "var") == []
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_small_file_held_in_memory_is_downloaded_once_for_every_process(tmp_path):
    """A body small enough to be held in memory until validated has no temp file: the other
    process's clients learn of it from the claim's one notice and read the stored artifact
    once the owner let go of the claim, right after the commit."""
    data = os.urandom(20_000)
    upstream = await UpstreamServer().start()
    gate = Gated(Serve(data))
    try:
        config = await group(tmp_path, upstream, {"small.bin": data})
        upstream.register("/repo/small.bin", gate)
        async with twistd(config) as served:
            await all_serving(served)
            await downloaded_once_for_all(
                served, upstream, gate, "small.bin", data, tmp_path / "var"
            )
        assert await served.stop() == 0
        assert temp_files(tmp_path / "var") == []
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_bytes_abort_the_clients_of_every_process_and_cool_down_everywhere(tmp_path):
    """Every process's clients of a download failing its digest are aborted, nothing is
    stored; then each process answers from the cooldown, as one process does: 502 at once, no
    second upstream request. Before, only the owner's process cooled down: each other process
    asked the upstream again (N requests for N processes), its clients got a 200 cut short."""
    data = os.urandom(2 * 1024 * 1024)
    upstream = await UpstreamServer().start()
    gate = Gated(WrongBytes(data))
    try:
        config = await group(tmp_path, upstream, {"bad.bin": data})
        upstream.register("/repo/bad.bin", gate)
        async with twistd(config) as served:
            await all_serving(served)
            results = await released_together(served, gate, "/demo/bad.bin", 12, True)
            for code, body, _ in results:
                # Aborted mid-body (curl 18/56) or, when nothing was sent yet, a 502.
                assert body != data and body != gate.then.served
                assert code != 0 or b"upstream failed" in body
            assert len(upstream.requests("/repo/bad.bin")) == 1
            assert not artifact_path(tmp_path / "var", data).exists()
            by = await answered_by(served, "/demo/bad.bin", 12)
            assert len(set(by)) == PROCESSES, by
            again = await one_by_each_process(served, "/demo/bad.bin")
            failed = b"demo/bad.bin: upstream failed: sha256 mismatch: expected "
            assert [body.startswith(failed) for _, body, _ in again] == [True] * PROCESSES, again
            assert len(upstream.requests("/repo/bad.bin")) == 1
        assert await served.stop() == 0
        assert temp_files(tmp_path / "var") == []
    finally:
        await upstream.stop()


def partial_files(storage: Path) -> list[Path]:
    """Files under tmp/ other than the lock files of live processes."""
    return [p for p in temp_files(storage) if not (p.parent.name == "tmp" and p.suffix == ".lock")]


def claim_owner(storage: Path) -> int | None:
    """The pid announced in the one claim under tmp/claims/, if there is one yet."""
    for claim in (storage / "tmp" / "claims").glob("*"):
        if claim.name.endswith(".readers"):
            continue
        for line in claim.read_text().splitlines():
            if "pid" in line:
                return json.loads(line)["pid"]
    return None


@pytest_twisted.ensureDeferred
async def test_a_helper_killed_while_owning_a_download_leaves_nothing_half_written(tmp_path):
    files = {f"slow{n}.bin": os.urandom(1024 * 1024) for n in range(6)}
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, files)
        for name, data in files.items():
            upstream.register(f"/repo/{name}", Trickle(data, bytes_per_sec=512 * 1024))
        storage = tmp_path / "var"
        async with twistd(config) as served:
            await all_serving(served)
            helpers = helper_pids(served.process.pid)
            # Until a helper (not the first process) owns a download: each try is a new file.
            # The first process is stopped while the clients connect (an idle group hands new
            # connections to the first process that waits, which is the first process).
            for name in files:
                os.kill(served.process.pid, signal.SIGSTOP)
                try:
                    runs = [
                        served.curl(f"/demo/{name}", "-sS", "--max-time", "30") for _ in range(8)
                    ]

                    async def claimed() -> bool:
                        return claim_owner(storage) is not None

                    await wait_for(claimed, "a claim", output=lambda: served.proto.output)
                finally:
                    os.kill(served.process.pid, signal.SIGCONT)
                owner = claim_owner(storage)
                if owner in helpers:
                    os.kill(owner, 9)
                results = await defer.gatherResults(runs)
                if owner in helpers:
                    break
            else:
                raise AssertionError("no helper ever owned a download")
            data = files[name]
            for code, body, _ in results:
                # The clients fail (not a complete-looking body) or got the right bytes.
                assert (code != 0 and body != data) or (code == 0 and body == data)
            assert any(code != 0 for code, _, _ in results)

            async def settled() -> bool:
                return not partial_files(storage)

            await wait_for(settled, "temp files gone", output=lambda: served.proto.output)
            # Clients that had nothing yet took the download over: what is stored is whole.
            stored = artifact_path(storage, data)
            assert not stored.exists() or stored.read_bytes() == data
            # The next request gets it (afresh, or from the store), and it is kept.
            again = await served.curl(f"/demo/{name}", "-sS", "--max-time", "30")
            assert again[0] == 0 and again[1] == data
            await wait_for(lambda: defer.succeed(artifact_path(storage, data).exists()), "stored")
        assert await served.stop() == 0
    finally:
        await upstream.stop()


def _read_some(client: socket.socket, want: int) -> int:
    """Read from *client* until *want* bytes came or it closed, or was reset (blocking: in a
    thread)."""
    client.settimeout(20)
    got = 0
    while got < want:
        try:
            chunk = client.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += len(chunk)
    return got


def serving_pid(client: socket.socket, pids: list[int]) -> int | None:
    """The process among *pids* that accepted *client*'s connection (the holder of the
    server side's socket, found in ``/proc/net/tcp``), None while none did."""
    host, port = client.getsockname()
    peer = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == peer:
            inode = fields[9]
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def _stopped(pid: int) -> bool:
    """Whether process *pid* is stopped (``SIGSTOP``)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


async def sigstop(pid: int) -> None:
    """Stop process *pid* and return once it is (`_stopped`): ``kill`` only queues the signal,
    and on a busy machine the process shows as stopped only once it was next scheduled."""
    os.kill(pid, signal.SIGSTOP)
    await until(lambda: _stopped(pid), 10, what=f"process {pid} stopped")


async def client_in(served, pids: list[int], path: str) -> tuple[socket.socket, int]:
    """A client of *path* served by one of *pids* (new connections until one is: the kernel
    hands each to whichever process accepts first), and that process, once its first bytes
    came. The other processes running are stopped until the connection is accepted: on a busy
    machine the process that woke last (an owner streaming a download) could take every new
    connection.

    The request goes only on the connection kept: one sent on a connection given up (not
    accepted within a second on a busy machine) would still be read by whichever process
    accepts it later, which would then own the download the caller's first client was
    meant to start."""
    everyone = [served.process.pid, *helper_pids(served.process.pid)]
    paused = [pid for pid in everyone if pid not in pids and not _stopped(pid)]
    port = int(served.base.rsplit(":", 1)[1])
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(30):
            client = socket.create_connection(("127.0.0.1", port))
            try:
                pid = await until(lambda client=client: serving_pid(client, everyone), 1)
            except AssertionError:  # (its wake-up went to a stopped process: try another)
                pid = None
            if pid in pids:
                break
            client.close()
        else:
            raise AssertionError(f"no connection of 30 reached {pids}")
    finally:
        for paused_pid in paused:
            os.kill(paused_pid, signal.SIGCONT)
    # The processes paused for the accept run again before the request is sent: a follower's
    # first bytes may wait on its owner (which may not have written any to its temp file yet).
    client.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % path.encode())
    assert await threads.deferToThread(_read_some, client, 1)
    return client, pid


@pytest_twisted.ensureDeferred
async def test_a_streamed_download_stops_when_its_last_reader_in_another_process_leaves(
    tmp_path,
):
    """``streamed``: the owner's own client leaves first (a follower in another process keeps
    the download going), then that follower's client leaves: the download stops at once
    (before: it ran to its end with nobody reading, 16 s here: the owner looked for readers
    only when its own last client left)."""
    data = os.urandom(4 * 1024 * 1024)
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"big.bin": data})
        config.write_text(config.read_text().replace('"on_demand"', '"streamed"'))
        upstream.register("/repo/big.bin", Trickle(data, bytes_per_sec=256 * 1024))
        async with twistd(config) as served:
            await all_serving(served)
            everyone = [served.process.pid, *helper_pids(served.process.pid)]
            own, owner = await client_in(served, everyone, "/demo/big.bin")
            others = [pid for pid in everyone if pid != owner]
            reader, _ = await client_in(served, others, "/demo/big.bin")  # a follower
            own.close()
            # The follower's client keeps the download going.
            assert await threads.deferToThread(_read_some, reader, 64 * 1024) >= 64 * 1024
            assert upstream.open_connections == 1
            reader.close()
            assert await upstream.wait_until_idle(timeout=4), "still downloading for nobody"

            async def settled() -> bool:
                return not partial_files(tmp_path / "var")

            await wait_for(settled, "temp files gone", output=lambda: served.proto.output)
            assert len(upstream.requests("/repo/big.bin")) == 1
        assert await served.stop() == 0
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_stopped_owner_fails_its_followers_as_a_read_timeout(tmp_path):
    """The owner of a download stopped mid-body (``SIGSTOP``: its lock stays) with a client
    of another process following it: that client is aborted once the owner wrote nothing for
    the remote's ``sock_read_timeout`` and a second, and so is a client arriving meanwhile
    (before: both waited for as long as the owner was stopped). The owner, let go on, times
    out itself or (when its reactor reads what the upstream sent meanwhile before its overdue
    timer runs) finishes the download: either way nothing is left in ``tmp/``."""
    data = os.urandom(4 * 1024 * 1024)
    upstream = await UpstreamServer().start()
    try:
        config = await group(tmp_path, upstream, {"big.bin": data})
        config.write_text(config.read_text() + "sock_read_timeout = 2\nmax_retries = 0\n")
        upstream.register("/repo/big.bin", Trickle(data, bytes_per_sec=256 * 1024))
        async with twistd(config) as served:
            await all_serving(served)
            everyone = [served.process.pid, *helper_pids(served.process.pid)]
            own, owner = await client_in(served, everyone, "/demo/big.bin")
            others = [pid for pid in everyone if pid != owner]
            reader, _ = await client_in(served, others, "/demo/big.bin")  # a follower
            try:
                # (Stopped before client_in looks: seen running, it would be resumed at its end.)
                await sigstop(owner)
                started = time.monotonic()
                late, _ = await client_in(served, others, "/demo/big.bin")  # follows later
                for client in (reader, late):
                    got = await threads.deferToThread(_read_some, client, len(data) + 4096)
                    assert got < len(data)  # cut short, not whole
                    assert time.monotonic() - started < 7
            finally:
                os.kill(owner, signal.SIGCONT)
            for client in (own, reader, late):
                client.close()

            async def settled() -> bool:
                return not partial_files(tmp_path / "var")

            # (a finishing owner needs the trickle's whole time: 16 s for 4 MiB)
            trickle = len(data) / (256 * 1024)
            await wait_for(
                settled, "temp files gone", trickle + 10, output=lambda: served.proto.output
            )
        assert await served.stop() == 0
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_helper_that_cannot_adopt_the_socket_says_so_in_one_line(tmp_path):
    # A helper's environment without the socket it names: one line, a non-zero exit.
    argv = [*TWISTD, "-n", "--pidfile=", "streamer"]
    env = {**child_env(), "STREAMER_ADOPT_FAMILY": "AF_INET"}
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=env, path=str(tmp_path))
    output = (out + err).decode()
    assert code != 0, output
    (line,) = [line for line in output.splitlines() if "cannot adopt" in line]
    assert "Traceback" not in output


def test_storage_without_working_locks_is_refused(tmp_path, monkeypatch):
    """Where fcntl locks are accepted and exclude nobody, the group must not start."""
    from store.storage import ArtifactStorage
    from streamer.claims import Claims

    claims = Claims(ArtifactStorage(str(tmp_path)), reactor)
    claims.check_locks()  # a real folder: locks work
    monkeypatch.setattr("streamer.claims.fcntl.fcntl", lambda fd, cmd, arg=0: arg)
    with pytest.raises(OSError, match="does not exclude"):
        claims.check_locks()
    assert os.listdir(claims.folder) == []


def test_a_helper_sends_the_log_lines_of_one_reactor_turn_in_one_write():
    """Access lines of one turn go to the first process together, in order, whole; with
    the reactor not running (start, exit) each line goes at once."""
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, eventFromJSON

    from streamer.processes import _Forwarder

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    clock = Clock()
    clock.running = True  # type: ignore[attr-defined]
    forward = _Forwarder(write_fd, clock)
    try:
        for i in range(100):
            forward({"log_format": "line {i}", "i": i, "log_level": LogLevel.info})
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 1)  # nothing written while the turn goes on
        clock.advance(0)
        lines = os.read(read_fd, 1 << 20).split(b"\n")
        assert lines.pop() == b""
        assert [eventFromJSON(line.decode())["i"] for line in lines] == list(range(100))
        clock.running = False  # type: ignore[attr-defined]
        forward({"log_format": "stopping", "log_level": LogLevel.info})
        assert os.read(read_fd, 1 << 20).count(b"\n") == 1
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _epoll_events(epoll_fd: int, fd: int) -> int:
    """The events *fd* is registered for in this process's epoll instance *epoll_fd*."""
    for line in Path(f"/proc/self/fdinfo/{epoll_fd}").read_text().splitlines():
        fields = line.split()
        if fields[:2] == ["tfd:", str(fd)]:
            return int(fields[fields.index("events:") + 1], 16)
    raise AssertionError(f"descriptor {fd} is not registered")


@pytest_twisted.ensureDeferred
async def test_a_shared_port_wakes_one_process_and_takes_one_connection_per_wake_up():
    """`share_accepts` on a real port of the running epoll reactor: registered with
    EPOLLEXCLUSIVE, again after a pause (stopReading/startReading), and one connection
    accepted per doRead however many wait; the reactor takes the others at its next turns."""
    import select

    from twisted.internet.protocol import Factory, Protocol

    from streamer.processes import share_accepts

    if not hasattr(select, "EPOLLEXCLUSIVE") or not hasattr(reactor, "_poller"):
        pytest.skip("needs the epoll reactor and EPOLLEXCLUSIVE (Linux 4.5+)")
    built: list[Protocol] = []

    class Counting(Factory):
        def buildProtocol(self, addr):
            built.append(Protocol())
            return built[-1]

    port = reactor.listenTCP(0, Counting(), interface="127.0.0.1")
    clients: list[socket.socket] = []
    try:
        assert share_accepts(port, reactor)
        epoll = reactor._poller.fileno()
        wanted = select.EPOLLIN | select.EPOLLEXCLUSIVE
        assert _epoll_events(epoll, port.fileno()) & wanted == wanted
        port.stopReading()
        port.startReading()
        assert _epoll_events(epoll, port.fileno()) & wanted == wanted
        address = ("127.0.0.1", port.getHost().port)
        clients = [socket.create_connection(address) for _ in range(5)]
        port.doRead()
        assert len(built) == 1
        assert _epoll_events(epoll, port.fileno()) & wanted == wanted
        await until(lambda: len(built) == 5, timeout=5, what="every connection accepted")
    finally:
        for client in clients:
            client.close()
        for protocol in built:
            protocol.transport.loseConnection()
        await port.stopListening()


def _hold_metrics_folder(root: Path) -> subprocess.Popen:
    """Another process that made a metrics folder under *root* and keeps running."""
    code = (
        "import sys; from streamer.processes import metrics_folder; "
        "print(metrics_folder(sys.argv[1]), flush=True); sys.stdin.read()"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def test_a_killed_groups_metrics_folder_is_removed_by_the_next_group(tmp_path):
    """A first process killed with SIGKILL runs no exit handler: its metrics folder stayed in
    the temp folder for good (one per killed group). The next group to start removes the
    folders whose owner lock is free, and only those: a running group's folder and a folder
    without the lock file (not made this way) are left alone."""
    from streamer.processes import METRICS_OWNER, metrics_folder

    running = _hold_metrics_folder(tmp_path)
    try:
        live_folder = Path(running.stdout.readline().strip())
        killed = _hold_metrics_folder(tmp_path)
        dead_folder = Path(killed.stdout.readline().strip())
        (dead_folder / "counter_123.db").write_bytes(b"x")
        killed.kill()
        killed.wait()
        foreign = tmp_path / "streamer-metrics-foreign"
        foreign.mkdir()
        assert dead_folder.is_dir() and live_folder.is_dir()

        mine = Path(metrics_folder(str(tmp_path)))

        assert not dead_folder.exists()
        assert live_folder.is_dir() and foreign.is_dir()
        assert (mine / METRICS_OWNER).is_file()
        assert mine.name.startswith("streamer-metrics-")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # none half-made
        # This process holds its folder's lock: the next group leaves it alone too.
        metrics_folder(str(tmp_path))
        assert mine.is_dir()
    finally:
        running.kill()
        running.wait()
