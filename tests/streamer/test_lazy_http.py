"""HTTP semantics of lazy answers: one ETag (the sha256) before and after storing, so
revalidation gives 304; conditional and If-Range requests on cold content; prompt failover
despite long backoffs; a request arriving while a finished download is being committed;
Range on ``streamed`` content; pipelined GET/HEAD mixes on one connection."""

from __future__ import annotations

import os
import threading
import time

import pytest_twisted
import treq
from twisted.internet import defer, threads

from tests.support.clients import raw_http, run_curl
from tests.support.faults import Gated, Serve, StatusThenServe, Trickle
from tests.support.lazy import sha256
from tests.support.polling import holds_within

BODY = bytes(range(256)) * 1024  # 256 KiB


def _tag(body: bytes) -> str:
    return f'"{sha256(body)}"'


@pytest_twisted.inlineCallbacks
def test_cold_and_stored_answers_share_the_etag_and_revalidation_gives_304(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/a.bin", Serve(BODY, etag='"upstream-v1"'))
    yield env.publish("repo/a.bin", BODY, ("up", url))

    cold = yield treq.get(env.url("repo/a.bin"))
    assert cold.code == 200
    assert (yield cold.content()) == BODY
    etag = cold.headers.getRawHeaders("etag")
    assert etag == [_tag(BODY)]
    assert (yield holds_within(lambda: env.stored(BODY)))

    # The client revalidates its cold copy against the stored artifact.
    warm = yield treq.get(env.url("repo/a.bin"), headers={"If-None-Match": etag[0]})
    assert warm.code == 304
    assert (yield warm.content()) == b""
    assert warm.headers.getRawHeaders("etag") == etag
    head = yield treq.head(env.url("repo/a.bin"))
    assert head.headers.getRawHeaders("etag") == etag
    assert len(env.upstream.requests("/a.bin")) == 1


@pytest_twisted.inlineCallbacks
def test_conditional_requests_on_cold_content_need_no_upstream(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/c.bin", Serve(BODY))
    yield env.publish("repo/c.bin", BODY, ("up", url))
    tag = _tag(BODY)

    for method in (treq.get, treq.head):
        response = yield method(env.url("repo/c.bin"), headers={"If-None-Match": f'"x", {tag}'})
        assert response.code == 304
        assert (yield response.content()) == b""
        assert response.headers.getRawHeaders("etag") == [tag]
    weak = yield treq.get(env.url("repo/c.bin"), headers={"If-None-Match": "W/" + tag})
    assert weak.code == 304, "If-None-Match compares weakly"
    failed = yield treq.get(env.url("repo/c.bin"), headers={"If-Match": '"other"'})
    assert failed.code == 412
    assert env.upstream.all_requests() == [], "no condition needed the upstream"
    assert not env.streamer.in_flight

    # Conditions that do not hold: the body is served (and downloaded once).
    other = yield treq.get(
        env.url("repo/c.bin"), headers={"If-None-Match": '"other"', "If-Match": tag}
    )
    assert other.code == 200
    assert (yield other.content()) == BODY
    assert len(env.upstream.requests("/c.bin")) == 1
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_if_range_on_cold_content(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    gate = Gated(Serve(BODY))
    url = env.upstream.register("/r.bin", gate)
    yield env.publish("repo/r.bin", BODY, ("up", url))
    tag = _tag(BODY)
    same = treq.get(env.url("repo/r.bin"), headers={"Range": "bytes=5-9", "If-Range": tag})
    changed = treq.get(env.url("repo/r.bin"), headers={"Range": "bytes=5-9", "If-Range": '"older"'})
    dated = treq.get(
        env.url("repo/r.bin"),
        headers={"Range": "bytes=5-9", "If-Range": "Mon, 02 Jan 2023 03:04:05 GMT"},
    )
    assert (yield holds_within(lambda: gate.waiting == 1))
    gate.release()
    same, changed, dated = yield defer.gatherResults([same, changed, dated])
    assert same.code == 206
    assert (yield same.content()) == BODY[5:10]
    # Another version, or a date we cannot compare: the whole body, as RFC 9110 says.
    for response in (changed, dated):
        assert response.code == 200
        assert (yield response.content()) == BODY
    assert len(env.upstream.requests("/r.bin")) == 1
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_long_backoffs_do_not_delay_failover(lazy_env, upstream_factory):
    env = lazy_env.start()
    # "Retry-After: 60": the origin is not asked again before then (its retries would all
    # come too early), and the live request moves on to the next entry (a mirror on another
    # origin) at once.
    mirror = upstream_factory()
    env.remote("busy", max_retries=3)
    env.remote("good", mirror)
    busy = env.upstream.register("/busy", StatusThenServe(503, 100, Serve(BODY), retry_after=60))
    good = mirror.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("busy", busy), ("good", good))

    started = time.monotonic()
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert out == BODY
    assert len(env.upstream.requests("/busy")) == 1, "no retry before its Retry-After"
    assert len(mirror.requests("/good")) == 1
    assert elapsed < env.streamer.options.retry_delay_cap + 5, elapsed
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_failures_without_retry_after_keep_their_capped_retries(lazy_env):
    env = lazy_env.start()
    env.remote("flaky", max_retries=3)
    env.remote("good")
    flaky = env.upstream.register("/flaky", StatusThenServe(503, 100, Serve(BODY)))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("flaky", flaky), ("good", good))

    started = time.monotonic()
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    elapsed = time.monotonic() - started
    assert (code, out) == (0, BODY), err
    assert len(env.upstream.requests("/flaky")) == 4, "the remote's retries still happen"
    assert elapsed < 3 * env.streamer.options.retry_delay_cap + 5, elapsed


@pytest_twisted.inlineCallbacks
def test_request_during_the_commit_of_a_finished_download(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/f", Serve(BODY))
    yield env.publish("repo/f", BODY, ("up", url))
    committing, release = threading.Event(), threading.Event()
    commit = env.storage.commit

    def slow_commit(*args, **kwargs):
        committing.set()
        release.wait(10)
        return commit(*args, **kwargs)

    env.storage.commit = slow_commit
    try:
        first = yield run_curl("-f", env.url("repo/f"))
        assert first.exit_code == 0 and first.stdout == BODY
        assert (yield threads.deferToThread(committing.wait, 10))
        assert env.streamer.in_flight, "the commit is still running"
        second = yield run_curl("-f", env.url("repo/f"))
        assert second.exit_code == 0, second.stderr
        assert second.stdout == BODY
    finally:
        release.set()
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.stored(BODY) and env.temp_files() == []
    assert len(env.upstream.requests("/f")) == 1
    assert env.metrics.value("streamer_downloads_total") == 1
    statuses = [status for path, _, code, status in env.finished if path == "/repo/f"]
    assert statuses == ["miss", "hit"], "validated bytes, no upstream request: a hit"
    third = yield run_curl("-f", env.url("repo/f"))
    assert third.stdout == BODY
    assert env.finished[-1][3] == "hit"


@pytest_twisted.inlineCallbacks
def test_a_commit_batch_lets_go_of_its_claims_in_its_thread_and_marks_them_at_once(
    lazy_env, monkeypatch
):
    """Downloads finishing together share one commit batch: their claims are let go in the
    committing thread right after the rename (a follower in another process reads the
    stored artifact once the lock is free: it is there), no claim leaves a file, and their
    stored flags go to the catalog in one call, made by the committing thread."""
    from twisted.internet import reactor

    from streamer.claims import LOCKS_FILE, Claim, Claims

    env = lazy_env.start(commit_delay=0.2)
    env.streamer.claims = Claims(env.storage, reactor)
    env.remote("up")
    bodies = {f"repo/{n}": bytes([n]) * (1000 + n) for n in range(3)}
    for path, body in bodies.items():
        url = env.upstream.register(f"/{path}", Serve(body))
        yield env.publish(path, body, ("up", url))
    released = []
    release = Claim.release

    def recording_release(self):
        if self._fd is not None:
            stored = env.storage.has(os.path.basename(self.path))
            released.append((threading.current_thread(), stored))
        release(self)

    marked = []
    many = env.catalog.mark_stored_many_here

    def recording_many(sha256s):
        marked.append((sorted(sha256s), threading.current_thread()))
        return many(sha256s)

    monkeypatch.setattr(Claim, "release", recording_release)
    monkeypatch.setattr(env.catalog, "mark_stored_many_here", recording_many)
    answers = yield defer.gatherResults([treq.get(env.url(path)) for path in bodies])
    assert [a.code for a in answers] == [200] * 3
    contents = yield defer.gatherResults([a.content() for a in answers])
    assert contents == list(bodies.values())
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert len(released) == 3
    assert all(thread is not threading.main_thread() and stored for thread, stored in released)
    assert os.listdir(env.streamer.claims.folder) == [LOCKS_FILE]
    [(shas, thread)] = marked  # one call, in the committing thread: the reactor sent nothing
    assert shas == sorted(sha256(body) for body in bodies.values())
    assert thread is not threading.main_thread()
    looked = yield defer.gatherResults([env.catalog.lookup(path) for path in bodies])
    assert all(entries[0].stored for entries in looked)
    env.streamer.claims.close()


@pytest_twisted.inlineCallbacks
def test_stop_fires_once_the_files_waiting_for_their_commit_batch_are_stored_and_marked(
    lazy_env,
):
    """Answered downloads whose files wait in the commit batch (a small one held in memory
    and one in a temp file) are not over: the streamer's stop waits for their commit and
    their stored flags, so nothing cleans their temp files up under them."""
    env = lazy_env.start(commit_delay=0.3)
    env.remote("up")
    bodies = {"repo/small": b"s" * 1000, "repo/large": BODY}
    for path, body in bodies.items():
        yield env.publish(path, body, ("up", env.upstream.register(f"/{path}", Serve(body))))
    answers = yield defer.gatherResults([treq.get(env.url(path)) for path in bodies])
    contents = yield defer.gatherResults([a.content() for a in answers])
    assert contents == list(bodies.values())
    assert not any(env.stored(body) for body in bodies.values()), "waiting for the batch"
    stopping = env.streamer.stop()
    assert not stopping.called
    yield stopping
    assert all(env.stored(body) for body in bodies.values())
    looked = yield defer.gatherResults([env.catalog.lookup(path) for path in bodies])
    assert all(entries[0].stored for entries in looked)
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_a_file_stored_whose_stored_flag_could_not_be_set_is_logged_and_let_go(
    lazy_env, monkeypatch
):
    """The catalog fails to mark a committed batch: its files are in storage (whole), their
    answers were sent, the failure is logged for each, nothing waits for ever (the stop
    settles, no download stays in flight) and the next request is served from storage."""
    from twisted.logger import globalLogPublisher

    from store.errors import CatalogError

    env = lazy_env.start(commit_delay=0.05)
    env.remote("up")
    bodies = {"repo/small": b"s" * 1000, "repo/large": BODY}
    for path, body in bodies.items():
        yield env.publish(path, body, ("up", env.upstream.register(f"/{path}", Serve(body))))

    def unwritable(_sha256s):
        raise CatalogError("catalog database: disk I/O error")

    monkeypatch.setattr(env.catalog, "mark_stored_many_here", unwritable)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        answers = yield defer.gatherResults([treq.get(env.url(path)) for path in bodies])
        contents = yield defer.gatherResults([a.content() for a in answers])
        assert contents == list(bodies.values())
        assert (yield holds_within(lambda: not env.streamer.in_flight and not env.streamer._own))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert all(env.stored(body) for body in bodies.values())
    looked = yield defer.gatherResults([env.catalog.lookup(path) for path in bodies])
    assert not any(entries[0].stored for entries in looked)
    failures = [e["log_failure"] for e in events if e.get("log_failure") is not None]
    assert len(failures) == 2 and all(f.check(CatalogError) for f in failures)
    again = yield treq.get(env.url("repo/large"))
    assert again.code == 200 and (yield again.content()) == BODY
    assert len(env.upstream.requests("/repo/large")) == 1
    yield env.streamer.stop()


@pytest_twisted.inlineCallbacks
def test_a_cold_small_file_costs_no_file_read_no_second_type_guess_and_no_artifact_open(
    lazy_env, monkeypatch
):
    """Work a cold request no longer does: its held-back last byte comes from the chunk in
    memory (no pread of the temp file), the content type is guessed once, and the claim's
    check for an artifact committed meanwhile is one stat, not a walk down the artifacts
    folder (the content resource's own look on disk is the only open)."""
    from twisted.internet import reactor

    import streamer.lazy as lazy_module
    from streamer.claims import Claims

    env = lazy_env.start()
    env.streamer.claims = Claims(env.storage, reactor)
    env.remote("up")
    body = b"small and cold" * 100
    url = env.upstream.register("/s.bin", Serve(body))
    yield env.publish("repo/s.bin", body, ("up", url))
    preads, guesses, opens = [], [], []
    pread = os.pread

    def recording_pread(fd, length, offset):
        preads.append(os.readlink(f"/proc/self/fd/{fd}"))
        return pread(fd, length, offset)

    guess = lazy_module.content_type_for
    opened = env.storage.open
    monkeypatch.setattr(os, "pread", recording_pread)
    monkeypatch.setattr(lazy_module, "content_type_for", lambda p: guesses.append(p) or guess(p))
    monkeypatch.setattr(
        env.storage, "open", lambda sha, size=None: opens.append(sha) or opened(sha, size)
    )
    response = yield treq.get(env.url("repo/s.bin"))
    assert response.code == 200 and (yield response.content()) == body
    assert response.headers.getRawHeaders("content-type") == ["application/octet-stream"]
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    bodies = [p for p in preads if p.startswith((env.storage.temp_root, env.storage.artifacts_dir))]
    assert [p for p in bodies if "/claims/" not in p] == []
    assert guesses == ["repo/s.bin"]
    assert opens == [sha256(body)]
    env.streamer.claims.close()


@pytest_twisted.inlineCallbacks
def test_range_on_streamed_content_nobody_else_reads(lazy_env):
    env = lazy_env.start()
    env.remote("up", policy="streamed")
    url = env.upstream.register("/s", Trickle(BODY, bytes_per_sec=512 * 1024, interval=0.02))
    yield env.publish("repo/s", BODY, ("up", url))
    response = yield treq.get(env.url("repo/s"), headers={"Range": "bytes=100-199"})
    assert response.code == 206
    (inflight,) = env.streamer.in_flight.values()
    assert (yield response.content()) == BODY[100:200]
    # The range completes only once the whole artifact was downloaded (from byte 0) and
    # validated; a streamed artifact is then dropped: nothing kept.
    assert inflight.succeeded
    assert "range" not in env.upstream.requests("/s")[0].headers
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == [] and not env.stored(BODY)


@pytest_twisted.inlineCallbacks
def test_range_client_leaving_a_streamed_download_cancels_it(lazy_env):
    env = lazy_env.start()
    env.remote("up", policy="streamed")
    url = env.upstream.register("/s", Trickle(BODY, bytes_per_sec=64 * 1024, interval=0.02))
    yield env.publish("repo/s", BODY, ("up", url))
    head = b"GET /repo/s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
    result = yield raw_http("127.0.0.1", env.port.getHost().port, head, timeout=0.3)
    # Nine bytes at once; the tenth waits for validation, and the client gives up first.
    assert result.timed_out and result.data.endswith(b"\r\n\r\n" + BODY[:9])
    # Nobody follows the streamed download any more: it is cancelled, nothing kept.
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert (yield env.upstream.wait_until_idle(timeout=2.0))
    assert env.temp_files() == [] and not env.stored(BODY)


@pytest_twisted.inlineCallbacks
def test_on_demand_range_client_leaving_still_stores_the_artifact(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/o", Trickle(BODY, bytes_per_sec=512 * 1024, interval=0.02))
    yield env.publish("repo/o", BODY, ("up", url))
    for spec in ("bytes=0-9", "bytes=-10"):
        code, out, err = yield run_curl("-f", "-r", spec.split("=")[1], env.url("repo/o"))
        assert code == 0, err
        assert out == (BODY[:10] if spec == "bytes=0-9" else BODY[-10:])
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert len(env.upstream.requests("/o")) == 1
    assert env.temp_files() == []


def _responses(data: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a stream of pipelined HTTP/1.1 responses (framed by Content-Length)."""
    out = []
    for method in methods:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"response to {method} missing"
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, data[:length]))
        data = data[length:]
    assert data == b"", "nothing after the last response"
    return out


@pytest_twisted.inlineCallbacks
def test_pipelined_lazy_gets_and_heads_on_one_connection(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    env.remote("stream", policy="streamed")
    other = BODY[::-1]
    third = b"third" * 5000
    url_a = env.upstream.register("/a", Serve(BODY))
    url_b = env.upstream.register("/b", Trickle(other, bytes_per_sec=1024 * 1024, interval=0.02))
    url_c = env.upstream.register("/c", Serve(third))
    yield env.publish("repo/a", BODY, ("up", url_a))
    yield env.publish("repo/b", other, ("up", url_b))
    yield env.publish("repo/c", third, ("stream", url_c))
    plan = [
        ("GET", "/repo/a", ""),
        ("HEAD", "/repo/b", ""),
        ("GET", "/repo/b", "Range: bytes=10-19\r\n"),
        ("HEAD", "/repo/a", ""),
        ("GET", "/repo/c", ""),
        ("GET", "/repo/nothing", ""),
        ("GET", "/repo/b", ""),
        ("GET", "/repo/a", "Range: bytes=0-4,-3\r\n"),
        ("GET", "/repo/c", "Connection: close\r\n"),
    ]
    wire = b"".join(
        f"{m} {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode() for m, p, extra in plan
    )
    result = yield raw_http("127.0.0.1", env.port.getHost().port, wire, timeout=20)
    assert result.clean, result.reason
    answers = _responses(result.data, [m for m, _, _ in plan])
    assert [a[0] for a in answers] == [200, 200, 206, 200, 200, 404, 200, 206, 200]
    assert answers[0][2] == BODY
    assert answers[1][1]["content-length"] == str(len(other)) and answers[1][2] == b""
    assert answers[2][2] == other[10:20]
    assert answers[3][1]["etag"] == _tag(BODY)
    assert answers[4][2] == third
    assert answers[6][2] == other
    assert answers[7][1]["content-type"].startswith("multipart/byteranges")
    assert BODY[:5] in answers[7][2] and BODY[-3:] in answers[7][2]
    assert answers[8][2] == third
    assert len(env.upstream.requests("/a")) == 1
    assert len(env.upstream.requests("/b")) == 1
    assert len(env.upstream.requests("/c")) == 2, "streamed content is fetched per request"
    assert (yield holds_within(lambda: env.stored(BODY) and env.stored(other)))
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_a_finished_cold_request_leaves_nothing_for_the_cyclic_collector(lazy_env):
    """A cold request's objects (its lazy request, follower, download, HTTP request and
    headers) are freed by reference counting as it ends: each one left in a cycle cost a
    trip through the cyclic collector (about 47 objects per cold request before, the
    follower holding its caller's callbacks and the download its downloader)."""
    import gc

    from twisted.internet import reactor

    from streamer.claims import Claims
    from streamer.follower import Follower
    from streamer.inflight import InFlight
    from streamer.lazy import _LazyRequest

    env = lazy_env.start()
    env.streamer.claims = Claims(env.storage, reactor)
    env.remote("up")
    bodies = {f"repo/g{n}": bytes([n]) * 5000 for n in range(3)}
    for path, body in bodies.items():
        url = env.upstream.register(f"/{path}", Serve(body))
        yield env.publish(path, body, ("up", url))
    first = yield treq.get(env.url("repo/g0"))  # connections and pools made once
    yield first.content()
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for path in ("repo/g1", "repo/g2"):
            answer = yield treq.get(env.url(path))
            assert (yield answer.content()) == bodies[path]
        assert (yield holds_within(lambda: not env.streamer.in_flight))
        yield holds_within(lambda: False, timeout=0.1)  # the commits' callbacks ran
        gc.collect()
        kinds = (_LazyRequest, Follower, InFlight)
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
    env.streamer.claims.close()


@pytest_twisted.inlineCallbacks
def test_a_cold_request_s_via_goes_upstream_with_ours_appended(lazy_env):
    """Through another proxy or streamer: the next hop sees every entry, so a loop through
    it comes back with ours in it (a streamer that sent only its own would not see it)."""
    env = lazy_env.start()
    env.remote("up", via="streamer-a1")
    url = env.upstream.register("/v.bin", Serve(BODY))
    yield env.publish("repo/v.bin", BODY, ("up", url))
    cold = yield treq.get(env.url("repo/v.bin"), headers={"Via": "1.1 other, 1.0 proxy"})
    assert (yield cold.content()) == BODY
    [request] = env.upstream.requests("/v.bin")
    assert request.headers["via"] == "1.1 other, 1.0 proxy, 1.1 streamer-a1"


@pytest_twisted.inlineCallbacks
def test_a_request_whose_via_names_us_is_a_loop_answered_508_without_upstream(lazy_env):
    env = lazy_env.start()
    env.remote("up", via="streamer-a1")
    url = env.upstream.register("/l.bin", Serve(BODY))
    yield env.publish("repo/l.bin", BODY, ("up", url))
    looped = {"Via": "1.1 streamer-a1, 1.1 other (Squid/6.6)"}

    cold = yield treq.get(env.url("repo/l.bin"), headers=looped)
    assert (cold.code, cold.phrase) == (508, b"Loop Detected")
    assert b"loop detected" in (yield cold.content())
    assert env.upstream.requests("/l.bin") == []
    # HEAD asks nobody; a stored file is served as a cache hit is, loop or not (as squid).
    head = yield treq.head(env.url("repo/l.bin"), headers=looped)
    assert head.code == 200
    plain = yield treq.get(env.url("repo/l.bin"))
    assert (yield plain.content()) == BODY
    assert (yield holds_within(lambda: env.stored(BODY)))
    warm = yield treq.get(env.url("repo/l.bin"), headers=looped)
    assert (warm.code, (yield warm.content())) == (200, BODY)
    assert len(env.upstream.requests("/l.bin")) == 1
