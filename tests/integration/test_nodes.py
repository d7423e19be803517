"""Several nodes on one shared storage folder and one PostgreSQL catalog, driven from outside.

Two real ``twistd -n streamer`` (one process each, so only the claims between nodes are at
work), a storage folder both are configured with, the session's private PostgreSQL cluster,
the loopback upstream of tests/support, real curl clients and SIGKILL of the node that owns a
download. See docs/DESIGN.md "Nodes" and docs/SCALING.md.
"""

from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest_twisted
from twisted.internet import defer

from tests.integration.test_end_to_end import (
    sha256,
    stored_soon,
    streamer_cli,
    temp_files,
    wait_for,
)
from tests.integration.test_postgres_catalog import pg_config, rows
from tests.integration.test_processes import answered_by
from tests.support.faults import Gated, Serve, Trickle
from tests.support.polling import until
from tests.support.twistd import Twistd, twistd
from tests.support.upstream import UpstreamServer

#: The remote's sock_read_timeout in these tests: a dead owner is taken over well within it.
READ_TIMEOUT = 5


def node_config(tmp_path: Path, name: str, manifest_url: str, catalog_url: str) -> Path:
    """Node *name*'s config: its own folder, the shared ``tmp_path/var`` and the catalog."""
    folder = tmp_path / name
    folder.mkdir()
    config = pg_config(folder, manifest_url, catalog_url, storage=str(tmp_path / "var"))
    text = config.read_text().replace("[server]\n", "[server]\nprocesses = 1\n", 1)
    config.write_text(text + f"sock_read_timeout = {READ_TIMEOUT}\nmax_retries = 0\n")
    return config


def manifest(upstream: UpstreamServer, files: dict[str, bytes]) -> str:
    lines = "".join(f"{name},{sha256(data)},{len(data)}\n" for name, data in files.items())
    return upstream.register("/repo/PULP_MANIFEST", Serve(lines.encode()))


async def start_nodes(stack: AsyncExitStack, configs: list[Path]) -> list[Twistd]:
    """A ``twistd -n streamer`` per config, started together, each stopped with *stack*."""
    starting = [defer.ensureDeferred(stack.enter_async_context(twistd(c))) for c in configs]
    return await defer.gatherResults(starting, consumeErrors=True)


async def in_flight(node, n: int) -> bool:
    """Whether *node* has at least *n* requests in flight (one of them this scrape)."""
    return (await node.metrics())["streamer_requests_in_flight"] >= n + 1


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_storage_and_one_catalog(tmp_path, postgres_url):
    small = b"small file\n"
    big = os.urandom(2 * 1024 * 1024 + 5)
    files = {"a.txt": small, "big.bin": big}
    upstream = await UpstreamServer().start()
    gate = Gated(Trickle(big, bytes_per_sec=8 * 1024 * 1024, interval=0.02))
    try:
        url = manifest(upstream, files)
        upstream.register("/repo/a.txt", Serve(small))
        upstream.register("/repo/big.bin", gate)
        configs = [node_config(tmp_path, name, url, postgres_url) for name in ("n1", "n2")]
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, configs)
            # A sync on one node is served by both (the catalog is theirs).
            code, out, err = await streamer_cli(configs[1], "sync")
            assert code == 0, out + err
            upstream.clear_log()
            # What one node stored, the other serves without an upstream request.
            assert (await nodes[0].curl("/demo/a.txt"))[:2] == (0, small)
            assert (await nodes[1].curl("/demo/a.txt"))[:2] == (0, small)
            assert len(upstream.requests("/repo/a.txt")) == 1
            # 20 concurrent cold requests over both nodes: one upstream request.
            runs = [nodes[i % 2].curl("/demo/big.bin", "--max-time", "30") for i in range(20)]

            async def parked() -> bool:
                return gate.waiting == 1 and all([await in_flight(n, 10) for n in nodes])

            await wait_for(parked, "20 clients waiting", output=lambda: nodes[0].proto.output)
            gate.release()
            results = await defer.gatherResults(runs)
            assert [code for code, _, _ in results] == [0] * 20, [e for _, _, e in results]
            assert all(body == big for _, body, _ in results)
            assert len(upstream.requests("/repo/big.bin")) == 1
            for node in nodes:  # each access line within ACCESS_DELAY of its answer
                assert len(await answered_by(node, "/demo/big.bin", 10)) == 10
            await stored_soon(tmp_path / "var", big)

            async def marked() -> bool:
                stored = rows(postgres_url, "SELECT path FROM catalog_entries WHERE stored")
                return sorted(stored) == [("demo/a.txt",), ("demo/big.bin",)]

            await wait_for(marked, "both marked stored in the catalog")
            for node in nodes:
                assert await node.stop() == 0, node.output
                assert "Traceback" not in node.output
        assert temp_files(tmp_path / "var") == []
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_owner_node_is_taken_over_by_the_other(tmp_path, postgres_url):
    data = os.urandom(1024 * 1024 + 3)
    upstream = await UpstreamServer().start()
    gate = Gated(Trickle(data, bytes_per_sec=8 * 1024 * 1024, interval=0.02))
    try:
        url = manifest(upstream, {"c.bin": data})
        upstream.register("/repo/c.bin", gate)
        configs = [node_config(tmp_path, name, url, postgres_url) for name in ("n1", "n2")]
        code, out, err = await streamer_cli(configs[0], "sync")
        assert code == 0, out + err
        async with AsyncExitStack() as stack:
            owner, other = await start_nodes(stack, configs)
            owners = [owner.curl("/demo/c.bin", "--max-time", "30") for _ in range(3)]
            await until(lambda: gate.waiting == 1, 10, what="the owner's upstream request")
            followers = [other.curl("/demo/c.bin", "--max-time", "30") for _ in range(5)]
            await wait_for(lambda: in_flight(other, 5), "5 followers on the other node")
            assert gate.waiting == 1  # they follow: no request of their own
            killed = time.monotonic()
            owner.process.signalProcess("KILL")
            await until(
                lambda: len(upstream.requests("/repo/c.bin")) == 2,
                10,
                what="the other node taking over",
                output=lambda: other.proto.output,
            )
            took = time.monotonic() - killed
            assert took < READ_TIMEOUT, took
            gate.release()
            results = await defer.gatherResults(followers)
            assert [code for code, _, _ in results] == [0] * 5, [e for _, _, e in results]
            assert all(body == data for _, body, _ in results)
            assert all(code != 0 for code, _, _ in await defer.gatherResults(owners))
            await stored_soon(tmp_path / "var", data)
            assert (await other.curl("/demo/c.bin"))[:2] == (0, data)
            assert len(upstream.requests("/repo/c.bin")) == 2
            assert await other.stop() == 0, other.output
            assert "Traceback" not in other.output
        # The killed node's temp file and claim were swept by the survivor.
        assert temp_files(tmp_path / "var") == []
    finally:
        await upstream.stop()
