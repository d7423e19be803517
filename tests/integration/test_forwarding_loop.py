"""A remote, mirror or redirect pointing back at the streamer: the request that comes back
carries our ``Via`` entry and is answered 508 at once (real ``twistd``, two processes, curl).

Without the check the streamer asked itself for the file it was fetching, and the nested
requests waited for each other until read timeouts (tens of seconds, the remote's download
slots held meanwhile).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import pytest_twisted

from streamer.config import instance_name
from tests.integration.test_end_to_end import streamer_cli
from tests.support.clients import free_port
from tests.support.faults import Redirect, Serve
from tests.support.squid import Squid, squid_available
from tests.support.twistd import twistd
from tests.support.upstream import UpstreamServer

HERE = b"served by the upstream\n"
GONE = b"missing upstream\n"


def manifest(files: dict[str, bytes]) -> bytes:
    lines = (
        f"{name},{hashlib.sha256(data).hexdigest()},{len(data)}\n" for name, data in files.items()
    )
    return "".join(lines).encode()


async def synced_config(folder: Path, url: str, remote_extra: str = "") -> Path:
    """A config of two processes, storage in ./var, one remote "demo" whose listing at
    *url* is synced (a short read timeout: a loop left to time out would take 3 s a hop,
    not milliseconds)."""
    path = folder / "streamer.toml"
    path.write_text(
        "[server]\nprocesses = 2\ngrace_period = 1\n"
        '[storage]\npath = "var"\n'
        f'[[remotes]]\nname = "demo"\nurl = "{url}"\nsock_read_timeout = 3\n{remote_extra}'
    )
    code, out, err = await streamer_cli(path, "sync")
    assert code == 0, out + err
    return path


def assert_cut_short(status: int, body: bytes, took: float) -> None:
    """The client got the upstream error naming the 508, well before any read timeout."""
    assert status == 502, body
    assert b"508" in body, body
    assert took < 1.0, f"{took:.2f} s: the loop was not cut short"


async def timed_curl(served, path: str) -> tuple[int, bytes, float]:
    """(HTTP status, body, seconds) of ``curl`` for *path*."""
    started = time.monotonic()
    code, out, err = await served.curl(path, "-w", "\n%{http_code}")
    took = time.monotonic() - started
    assert code == 0, err
    body, _, status = out.rpartition(b"\n")
    return int(status), body, took


@pytest_twisted.ensureDeferred
async def test_a_mirror_that_is_the_streamer_itself_is_refused_at_once(
    tmp_path, upstream: UpstreamServer
):
    upstream.register("/repo/here.txt", Serve(HERE))
    upstream.register("/repo/PULP_MANIFEST", Serve(manifest({"here.txt": HERE, "gone.txt": GONE})))
    port = free_port()
    mirror = f'mirrors = ["http://127.0.0.1:{port}/demo/"]\n'
    config = await synced_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"), mirror)

    async with twistd(config, port) as served:
        # A normal cold request: its upstream sees one Via entry, ours.
        status, body, _ = await timed_curl(served, "/demo/here.txt")
        assert (status, body) == (200, HERE)
        [request] = upstream.requests("/repo/here.txt")
        assert request.headers["via"] == f"1.1 {instance_name(str(tmp_path / 'var'))}"

        # Missing upstream: the mirror is the streamer, which refuses its own request.
        status, body, took = await timed_curl(served, "/demo/gone.txt")
        assert_cut_short(status, body, took)
        assert len(upstream.requests("/repo/gone.txt")) == 1  # no retries, no hammering
    assert served.output.count("loop detected") == 1, served.output
    assert "Traceback" not in served.output


@pytest_twisted.ensureDeferred
async def test_a_remote_whose_url_is_the_streamer_itself_is_refused_at_once(
    tmp_path, upstream: UpstreamServer
):
    # The listing is synced from a server on the port the streamer takes over afterwards:
    # every entry's url then names the streamer itself.
    upstream.register("/demo/PULP_MANIFEST", Serve(manifest({"self.txt": GONE})))
    port = upstream.port
    config = await synced_config(tmp_path, upstream.url("/demo/PULP_MANIFEST"))
    await upstream.stop()

    async with twistd(config, port) as served:
        status, body, took = await timed_curl(served, "/demo/self.txt")
        assert_cut_short(status, body, took)
        # Asked again: the process that answered first has the source on a cooldown, the
        # other one (if the request reached it) refuses its own request at once as well.
        status, body, took = await timed_curl(served, "/demo/self.txt")
        assert status == 502, body
        assert took < 1.0, f"{took:.2f} s: the loop was not cut short"
    assert served.output.count("loop detected") in (1, 2), served.output


@pytest_twisted.ensureDeferred
async def test_an_upstream_redirect_back_to_the_streamer_is_refused_at_once(
    tmp_path, upstream: UpstreamServer
):
    port = free_port()
    upstream.register("/repo/moved.txt", Redirect(f"http://127.0.0.1:{port}/demo/moved.txt"))
    upstream.register("/repo/PULP_MANIFEST", Serve(manifest({"moved.txt": GONE})))
    config = await synced_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"))

    async with twistd(config, port) as served:
        status, body, took = await timed_curl(served, "/demo/moved.txt")
        assert_cut_short(status, body, took)
        assert len(upstream.requests("/repo/moved.txt")) == 1
    assert served.output.count("loop detected") == 1, served.output


@pytest.fixture
def squid():
    """A real squid forward proxy (it appends its own Via entry and forwards ours)."""
    reason = squid_available()
    if reason is not None:
        pytest.skip(reason)
    proxy = Squid()
    pytest_twisted.blockon(proxy.start())
    yield proxy
    pytest_twisted.blockon(proxy.stop())


@pytest_twisted.ensureDeferred
async def test_a_loop_through_squid_back_to_the_streamer_is_refused_at_once(
    tmp_path, upstream: UpstreamServer, squid: Squid
):
    """Streamer -> squid -> streamer: the request comes back with squid's entry after ours."""
    upstream.register("/repo/PULP_MANIFEST", Serve(manifest({"gone.txt": GONE})))
    port = free_port()
    remote = f'mirrors = ["http://127.0.0.1:{port}/demo/"]\nproxy_url = "{squid.open_url}"\n'
    config = await synced_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"), remote)

    async with twistd(config, port) as served:
        status, body, took = await timed_curl(served, "/demo/gone.txt")
        assert_cut_short(status, body, took)
        assert len(upstream.requests("/repo/gone.txt")) == 1
    [line] = [line for line in served.output.splitlines() if "loop detected" in line]
    assert f"Via: 1.1 {instance_name(str(tmp_path / 'var'))}, 1.1 " in line, line
    assert any("/demo/gone.txt" in line for line in squid.access_log())
