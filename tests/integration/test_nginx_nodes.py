"""conf/nginx-nodes.conf as shipped (only its addresses changed), a real nginx in front of two
real nodes on one storage folder and one PostgreSQL catalog: one node killed mid-run, the
clients of the other keep streaming, and new requests go to the survivor."""

from __future__ import annotations

import os
import re
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from tests.integration.test_end_to_end import streamer_cli
from tests.integration.test_nodes import manifest, node_config, start_nodes
from tests.support.clients import free_port, run_curl
from tests.support.faults import Trickle
from tests.support.nginx import NGINX, access_lines, start_nginx, stop_nginx, write_conf
from tests.support.polling import until
from tests.support.upstream import UpstreamServer

pytestmark = pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed")

SHIPPED = Path(__file__).parents[2] / "conf" / "nginx-nodes.conf"
SIZE = 192 * 1024
#: Bytes per second from the upstream: a lazy download takes about 1.5 seconds.
RATE = 128 * 1024


def front_conf(work: Path, port: int, nodes: list[str]) -> Path:
    """A main nginx.conf around the shipped snippet, pointed at *nodes* (host:port)."""
    snippet = SHIPPED.read_text()
    servers = re.findall(r"^    server 10\.0\.0\.\d+:8080 ", snippet, flags=re.M)
    assert len(servers) == len(nodes), snippet
    for server, node in zip(servers, nodes, strict=True):
        snippet = snippet.replace(server, f"    server {node} ", 1)
    snippet = snippet.replace("    listen 80;", f"    listen 127.0.0.1:{port};")
    work.mkdir(parents=True, exist_ok=True)
    (work / "nodes.conf").write_text(snippet)
    return write_conf(
        work,
        f"""
  log_format nodes '$request_method $request_uri $status upstream=$upstream_addr';
  access_log {work}/logs/access.log nodes;
  include {work}/nodes.conf;
""",
    )


@pytest_twisted.ensureDeferred
async def test_a_node_killed_behind_nginx(tmp_path, postgres_url):
    files = {f"f{i:02}.bin": os.urandom(SIZE) for i in range(16)}
    files["stored.txt"] = b"synced and stored\n"
    upstream = await UpstreamServer().start()
    work = tmp_path / "nginx"
    work.mkdir()
    conf = None
    try:
        url = manifest(upstream, files)
        for name, data in files.items():
            upstream.register(f"/repo/{name}", Trickle(data, bytes_per_sec=RATE, interval=0.05))
        configs = [node_config(tmp_path, name, url, postgres_url) for name in ("n1", "n2")]
        code, out, err = await streamer_cli(configs[0], "sync")
        assert code == 0, out + err
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, configs)
            addresses = [node.base.removeprefix("http://") for node in nodes]
            port = free_port()
            conf = front_conf(work, port, addresses)
            await start_nginx(conf)
            front = f"http://127.0.0.1:{port}"

            # Which node each path goes to (the same for HEAD and GET: the hash of the uri).
            for name in files:
                code, _, err = await run_curl("-I", f"{front}/demo/{name}")
                assert code == 0, err
            home = {}
            for line in access_lines(work):
                method, uri, status, upstream_addr = line.split(" ")
                assert status == "200", line
                home[uri] = addresses.index(upstream_addr.removeprefix("upstream="))
            victim, survivor = 0, 1
            lost = [u for u, n in home.items() if n == victim and u.endswith(".bin")][:2]
            kept = [u for u, n in home.items() if n == survivor and u.endswith(".bin")][:2]
            assert lost and kept, home  # 16 paths over two nodes: both get some
            assert not any(upstream.requests(f"/repo/{name}") for name in files)  # HEAD: none

            def get(uri: str):
                return run_curl("--max-time", "30", front + uri)

            def received(uri: str) -> Path:
                return tmp_path / uri.replace("/", "_")

            streams = {
                uri: run_curl("--max-time", "30", "-o", str(received(uri)), front + uri)
                for uri in lost + kept
            }

            def flowing() -> bool:
                return all(
                    received(uri).exists() and received(uri).stat().st_size > 0 for uri in streams
                )

            await until(flowing, 10, what="bytes flowing to every client")
            nodes[victim].process.signalProcess("KILL")

            for uri in kept:  # the other node's clients keep streaming to the end
                code, _, err = await streams[uri]
                body = received(uri).read_bytes()
                assert (code, body) == (0, files[uri.removeprefix("/demo/")]), err
            for uri in lost:  # cut off mid-body: nginx cannot retry after the first byte
                code, _, _ = await streams[uri]
                body = received(uri).read_bytes()
                assert code != 0 and 0 < len(body) < SIZE, (code, len(body))

            # New requests, for the victim's paths too, go to the survivor.
            before = len(access_lines(work))
            again = [*lost, "/demo/stored.txt"]
            for uri, (code, body, err) in zip(
                again, await gatherResults([get(uri) for uri in again]), strict=True
            ):
                assert (code, body) == (0, files[uri.removeprefix("/demo/")]), err
            for line in access_lines(work)[before:]:
                assert line.endswith(f"upstream={addresses[survivor]}") or (
                    f"{addresses[victim]}, {addresses[survivor]}" in line
                ), line
            assert "Traceback" not in nodes[survivor].output
    finally:
        if conf is not None:
            await stop_nginx(conf)
        await upstream.stop()
