"""The fault matrix through the streamer's lazy GET.

A real `ContentResource` in a Site on 127.0.0.1, a real SQLite catalog and `ArtifactStorage`
under tmp_path, catalog entries pointing at the fault upstream, and real curl. For each fault
of `tests.faults.matrix`: the documented client outcome (200 with the whole body, a response
aborted after some bytes, or 404/502/504 before the first byte), then

* the store holds only valid artifacts (the good one after success, nothing after a failure),
* no temp file, no download in flight, no upstream connection beyond idle keep-alive ones,
* the process's file descriptors back to their baseline,
* a failed entry is on a cooldown (the next request does not hit the upstream again),
* and the service still serves the next request.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import pytest
import pytest_twisted

from importer.remote import Remote
from tests.faults.matrix import BODY, FAULTS, Fault, RecordingBackoff, fault_ids, sha256
from tests.support import faults
from tests.support.clients import run_curl
from tests.support.lazy import LazyEnv, parse_response
from tests.support.polling import holds_within
from tests.support.upstream import UpstreamServer

UPSTREAM_PATH = "/files/artifact.bin"
SERVED_PATH = "flaky/artifact.bin"


@attrs.define(kw_only=True)
class RecordingRemote(Remote):
    """A real `Remote` whose downloaders get a `RecordingBackoff` (no real backoff waits)."""

    backoff: Any = attrs.field(factory=RecordingBackoff, eq=False, repr=False)

    def get_downloader(self, url: str | None = None, entry: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("backoff", self.backoff)
        return super().get_downloader(url=url, entry=entry, **kwargs)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def stored_artifacts(env: LazyEnv) -> list[str]:
    return [sha for sha, _path in env.storage.iter_artifacts()]


async def curl(env: LazyEnv, path: str) -> tuple[int, int, dict[str, list[str]], bytes]:
    """(curl exit code, status, headers, body) of ``GET path`` (status 0 if none arrived)."""
    code, out, _err = await run_curl("-i", env.url(path), timeout=20)
    if not out.startswith(b"HTTP/"):
        return code, 0, {}, b""
    status, headers, body = parse_response(out)
    return code, status, headers, body


async def idle(env: LazyEnv, *servers: UpstreamServer) -> None:
    """Close the remotes' pools; every upstream connection must then close."""
    for remote in env.remotes.values():
        await remote.close()
    for server in servers:
        assert await server.wait_until_idle(2.0), f"{server.open_connections} left open"


@pytest.mark.parametrize("fault", FAULTS, ids=fault_ids)
@pytest_twisted.ensureDeferred
async def test_lazy_get_under_fault(fault: Fault, lazy_env: LazyEnv, upstream_factory, certs):
    # The outcomes of the matrix are those of a body streamed to the client as it arrives; the
    # matrix's bodies are small enough to be held in memory until validated, which this test
    # turns off (bodies held in memory: tests/streamer/test_memory_bodies.py).
    env = lazy_env.start(no_progress_timeout=5.0, cooldown=30.0, memory_body=0)
    healthy = lazy_env.upstream
    env.remote("healthy", healthy)
    healthy.register("/warm.bin", faults.Serve(BODY[:100]))
    healthy.register("/next.bin", faults.Serve(BODY[::-1]))
    await env.publish("healthy/warm.bin", BODY[:100], ("healthy", healthy.url("/warm.bin")))
    await env.publish("healthy/next.bin", BODY[::-1], ("healthy", healthy.url("/next.bin")))

    server: UpstreamServer = upstream_factory(tls=getattr(certs, fault.tls) if fault.tls else None)
    url = server.register(UPSTREAM_PATH, fault.behaviour())
    remote = RecordingRemote(
        name="flaky", url=server.url("/PULP_MANIFEST"), ca_cert=str(certs.ca_pem), **fault.settings
    )
    env.remotes["flaky"] = remote
    await env.publish(SERVED_PATH, fault.body, ("flaky", url))

    # Baseline: threads, catalog connections and the listening socket exist already.
    code, status, _, _ = await curl(env, "healthy/warm.bin")
    assert (code, status) == (0, 200)
    assert await holds_within(lambda: not env.streamer.in_flight)
    await idle(env, healthy)
    baseline_fds = open_fds()
    stored_before = set(stored_artifacts(env))

    # The fault, as a client sees it.
    code, status, headers, body = await curl(env, SERVED_PATH)
    expected = fault.lazy
    if expected.outcome == "ok":
        assert (code, status) == (0, 200)
        assert body == fault.body
        assert await holds_within(lambda: env.stored(fault.body))
    elif expected.outcome == "aborted":
        # Bytes were handed to the client's transport, so no failover: the connection is
        # reset. Whatever had not left the server's buffer yet is dropped with it.
        assert code != 0, "a cut-off body must not look complete to the client"
        assert status in (0, 200)
        assert len(body) < len(fault.body)
        if status:
            assert headers["content-length"] == [str(len(fault.body))]
    else:
        assert (code, status) == (0, expected.outcome), body
        assert headers["content-type"][0].startswith("text/plain")
        assert b"Traceback" not in body and len(body) < 1000
        if expected.retry_after is not None:
            assert expected.retry_after(int(headers["retry-after"][0])), headers
    if expected.outcome == 503:
        assert "retry-after" in headers, "a busy upstream's 503 says when to come back"
    assert len(server.requests(UPSTREAM_PATH)) == expected.requests
    if fault.tls:
        assert server.total_connections == 1, "a certificate failure must not be retried"
    if fault.retry_after is not None and expected.outcome == "ok":
        # The same retries as a sync (a Retry-After ends the download instead: see above).
        check = fault.retry_after
        values = remote.backoff.retry_afters
        assert check(values) if callable(check) else values == check, values

    # Nothing invalid in the store, no temp file, nothing in flight.
    assert await holds_within(lambda: not env.streamer.in_flight)
    assert await holds_within(lambda: env.temp_files() == []), env.temp_files()
    new = set(stored_artifacts(env)) - stored_before
    assert new == ({sha256(fault.body)} if expected.outcome == "ok" else set())
    report = env.storage.verify()
    assert report.bad == [] and report.checked == report.good

    # The next request for the same path: a hit, or the entry's cooldown (no upstream request).
    code, status, headers, body = await curl(env, SERVED_PATH)
    assert len(server.requests(UPSTREAM_PATH)) == expected.requests
    if expected.outcome == "ok":
        assert (code, status, body) == (0, 200, fault.body)
    elif expected.outcome == 404:
        # The upstream said the file is gone: the same answer, with no date to retry at.
        assert status == 404 and "retry-after" not in headers, (status, headers)
    else:
        assert status in (502, 503, 504) and "retry-after" in headers, (status, headers)

    # No upstream connection left open; the service still serves; fds back to the baseline.
    await idle(env, server)
    code, status, _, body = await curl(env, "healthy/next.bin")
    assert (code, status, body) == (0, 200, BODY[::-1])
    assert await holds_within(lambda: not env.streamer.in_flight)
    await idle(env, server, healthy)
    assert await holds_within(lambda: open_fds() <= baseline_fds, timeout=2.0), (
        f"{open_fds()} fds open, {baseline_fds} before the fault"
    )
    assert env.temp_files() == []
