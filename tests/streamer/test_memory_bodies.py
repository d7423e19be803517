"""Small bodies held in memory until validated (`streamer.inflight.MEMORY_BODY`): a client gets
nothing before the download was validated, then the whole body at once; so a failure before
the end is retried, or fails over to the next entry (or is a plain 502/504) without the client
noticing, where a streamed body's clients would be cut off. The validated body is stored by
the committing thread (no temp file in ``tmp/`` while it downloads)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from streamer.inflight import MEMORY_BODY
from tests.support.clients import run_curl
from tests.support.faults import Gated, ResetAfter, Serve, StallMidBody, Steps, WrongBytes
from tests.support.lazy import parse_response
from tests.support.polling import holds_within, until

BODY = bytes(range(256)) * 64  # 16 KiB
assert len(BODY) <= MEMORY_BODY


@pytest_twisted.inlineCallbacks
def test_a_small_body_reset_mid_way_fails_over_and_the_client_never_notices(lazy_env):
    """Before: curl exit 18/56 after 4096 bytes (they had been sent as they came), and no
    failover: "no silent retry into a response that already carries bytes"."""
    env = lazy_env.start()
    env.remote("a")
    env.remote("b")
    reset = env.upstream.register("/reset", ResetAfter(4096, BODY))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("a", reset), ("b", good))
    code, out, err = yield run_curl("-i", env.url("repo/f"))
    assert code == 0, err
    status, headers, body = parse_response(out)
    assert (status, body) == (200, BODY)
    assert headers["content-length"] == [str(len(BODY))]
    assert len(env.upstream.requests("/reset")) == 1 and len(env.upstream.requests("/good")) == 1
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_a_small_body_reset_mid_way_is_retried_as_a_sync_would(lazy_env):
    """Nothing was handed to a client: the downloader retries (the remote's max_retries) as it
    does into a temp file, the held bytes of the failed attempt forgotten. Before: curl exit
    18/56 after 4096 bytes and a cooldown; then (held in memory, no retry) a 502."""
    env = lazy_env.start()
    env.remote("up", max_retries=1)
    url = env.upstream.register("/f", Steps([ResetAfter(4096, BODY), Serve(BODY)]))
    yield env.publish("repo/f", BODY, ("up", url))
    code, out, err = yield run_curl("-i", env.url("repo/f"))
    assert code == 0, err
    status, headers, body = parse_response(out)
    assert (status, body) == (200, BODY)
    assert headers["content-length"] == [str(len(BODY))]
    assert len(env.upstream.requests("/f")) == 2
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_a_small_body_with_wrong_bytes_fails_over_before_the_first_byte(lazy_env):
    """Right size, wrong digest: before, the client got the body but its last byte and an
    aborted connection; now the request fails over to the next entry and gets a 200."""
    env = lazy_env.start()
    env.remote("bad")
    env.remote("good")
    bad = env.upstream.register("/bad", WrongBytes(BODY))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("bad", bad), ("good", good))
    code, out, err = yield run_curl("-i", env.url("repo/f"))
    assert code == 0, err
    assert parse_response(out)[::2] == (200, BODY)
    assert len(env.upstream.requests("/bad")) == 1 and len(env.upstream.requests("/good")) == 1
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_a_bad_small_body_is_a_502_with_nothing_sent_or_stored(lazy_env):
    env = lazy_env.start()
    env.remote("bad")
    bad = env.upstream.register("/bad", WrongBytes(BODY))
    yield env.publish("repo/f", BODY, ("bad", bad))
    for ranges in ((), ("-r", "0-99")):  # a range is held back the same way
        code, out, err = yield run_curl("-i", *ranges, env.url("repo/f"))
        assert code == 0, err
        status, headers, body = parse_response(out)
        assert status == 502 and headers["content-type"][0].startswith("text/plain"), out
        assert BODY[:100] not in body
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert not env.stored(BODY) and env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_clients_of_a_small_body_get_nothing_until_it_was_validated(lazy_env):
    """No temp file while it downloads, nothing sent before the last upstream byte, then every
    client (one of them joining after validation, before the commit) gets the whole body."""
    env = lazy_env.start(commit_delay=0.5)
    env.remote("up")
    gate = Gated(Serve(BODY))
    url = env.upstream.register("/f", gate)
    yield env.publish("repo/f", BODY, ("up", url))
    first = run_curl("-i", env.url("repo/f"))
    yield until(lambda: gate.waiting)
    inflight = env.streamer.in_flight[next(iter(env.streamer.in_flight))]
    assert env.temp_files() == [] and inflight.path is None
    gate.release()
    code, out, err = yield first
    assert code == 0, err
    assert parse_response(out)[::2] == (200, BODY)
    assert inflight.succeeded and env.temp_files() == [] and not env.stored(BODY)
    code, out, err = yield run_curl("-r", "100-199", env.url("repo/f"))  # before the commit
    assert (code, out) == (0, BODY[100:200]), err
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert len(env.upstream.requests("/f")) == 1
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_a_small_body_stalled_mid_way_is_a_504_not_a_cut_off_body(lazy_env):
    """Before: the client got 8192 bytes, then an aborted connection."""
    env = lazy_env.start()
    env.remote("up", sock_read_timeout=0.3)
    url = env.upstream.register("/stall", StallMidBody(8192, BODY))
    yield env.publish("repo/f", BODY, ("up", url))
    code, out, err = yield run_curl("-i", env.url("repo/f"))
    assert code == 0, err
    status, _headers, body = parse_response(out)
    assert status == 504 and BODY[:100] not in body, out
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert not env.stored(BODY) and env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_a_validated_small_body_is_sent_in_one_write_without_a_producer(lazy_env, monkeypatch):
    """Nothing to pause in one write the kernel takes whole: no producer is registered for it
    (before: the follower registered itself, pumped once and unregistered)."""
    from twisted.web.server import Request

    from streamer.follower import Follower

    writes: list[tuple[Request, bytes]] = []
    producers: list[object] = []
    write, register = Request.write, Request.registerProducer

    def recorded_write(self: Request, data: bytes) -> None:
        writes.append((self, data))
        write(self, data)

    def recorded_register(self: Request, producer: object, streaming: bool) -> None:
        producers.append(producer)
        register(self, producer, streaming)

    monkeypatch.setattr(Request, "write", recorded_write)
    monkeypatch.setattr(Request, "registerProducer", recorded_register)
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/f", Serve(BODY))
    yield env.publish("repo/f", BODY, ("up", url))
    code, out, err = yield run_curl(env.url("repo/f"))
    assert (code, out) == (0, BODY), err
    assert not [p for p in producers if isinstance(p, Follower)]
    ours = env.port.factory  # (the upstream is a twisted.web site in this process too)
    assert [data for request, data in writes if request.site is ours and data] == [BODY]


@pytest_twisted.inlineCallbacks
def test_bodies_past_the_memory_budget_go_through_temp_files(lazy_env):
    """The bodies a process holds (downloading, or waiting for a slow disk's commit) stay
    within `memory_budget`: a download that would pass it writes a temp file, as a larger one
    does; once the held ones are done, small bodies are held in memory again."""
    env = lazy_env.start(memory_budget=len(BODY) + 100, commit_delay=0.3)
    env.remote("up")
    other = BODY[::-1]
    gates = {name: Gated(Serve(body)) for name, body in (("a", BODY), ("b", other))}
    for name, body in (("a", BODY), ("b", other)):
        url = env.upstream.register(f"/{name}", gates[name])
        yield env.publish(f"repo/{name}", body, ("up", url))
    first = run_curl(env.url("repo/a"))
    yield until(lambda: gates["a"].waiting)
    second = run_curl(env.url("repo/b"))
    yield until(lambda: gates["b"].waiting)
    held = {i.entry.path: i.in_memory for i in env.streamer.in_flight.values()}
    assert held == {"repo/a": True, "repo/b": False}
    assert len(env.temp_files()) == 1  # b's
    gates["a"].release()
    gates["b"].release()
    code, out, err = yield first
    assert (code, out) == (0, BODY), err
    code, out, err = yield second
    assert (code, out) == (0, other), err
    assert (yield holds_within(lambda: env.stored(BODY) and env.stored(other)))
    assert (yield holds_within(lambda: env.streamer._held == 0))


@pytest_twisted.inlineCallbacks
def test_a_request_joining_a_small_body_another_process_validated_is_a_hit(lazy_env):
    """Another process (its own `Claims` on the same storage) validated a body it holds in
    memory and its commit is pending: a request here waits for the stored artifact, gets it
    whole, and is a hit, as a request joining such a download in its own process is. Before:
    "coalesced", so the README's second curl, when it reached the other process while the
    first one's commit was pending, was not counted as a hit."""
    from twisted.internet import reactor

    from downloaders.tempfiles import write_temp_file
    from streamer.claims import Claim, Claims

    env = lazy_env.start()
    env.streamer.claims = Claims(env.storage, reactor)
    owner_side = Claims(env.storage, reactor)  # the other process
    env.remote("up")
    url = env.upstream.register("/f", Serve(BODY))
    yield env.publish("repo/f", BODY, ("up", url))
    (entry,) = yield env.catalog.entries_for_remote("up")
    claim = owner_side.claim_or_follow(entry, lambda _: None)
    assert isinstance(claim, Claim)
    claim.stored_later([(b"content-type", [b"application/octet-stream"])], 200)
    answer = run_curl("-i", env.url("repo/f"))
    yield until(lambda: entry.sha256 in env.streamer.in_flight)  # following the owner
    assert env.finished == []  # nothing before the artifact is stored
    env.storage.commit(write_temp_file(env.storage.temp_dir, BODY), entry.sha256, len(BODY))
    claim.release()  # as the committing thread does, right after the rename
    code, out, err = yield answer
    assert code == 0, err
    assert parse_response(out)[::2] == (200, BODY)
    assert env.finished == [("/repo/f", "GET", 200, "hit")]
    assert env.upstream.requests("/f") == []  # one download per artifact: the owner's
    env.streamer.claims.close()
    owner_side.close()


@pytest_twisted.inlineCallbacks
def test_a_busy_server_commits_fewer_larger_batches_and_a_lone_file_soon(lazy_env):
    """A lone cold file is stored ``commit_delay`` after its answer (the README's second curl,
    or a follower in another process, waits no longer); once files come in numbers (a batch of
    four), the next ones gather for ``commit_busy_delay``: fewer batches, each of which costs a
    trip to the committing thread and one to the catalog's. Each client gets its body at once
    either way: the commit comes after the answer."""
    env = lazy_env.start(commit_delay=0.2, commit_busy_delay=1.0)
    env.remote("up")
    bodies = [bytes([n]) * 1024 + BODY for n in range(6)]
    gates = []
    for n, body in enumerate(bodies):
        behaviour = Serve(body)
        if 1 <= n <= 4:
            behaviour = Gated(behaviour)
            gates.append(behaviour)
        url = env.upstream.register(f"/f{n}", behaviour)
        yield env.publish(f"repo/f{n}", body, ("up", url))

    code, out, err = yield run_curl(env.url("repo/f0"))
    assert (code, out) == (0, bodies[0]), err
    assert (yield holds_within(lambda: env.stored(bodies[0]), 0.8))  # alone: commit_delay

    crowd = [run_curl(env.url(f"repo/f{n}")) for n in range(1, 5)]
    yield until(lambda: all(gate.waiting for gate in gates))
    for gate in gates:  # validated together: one batch of four
        gate.release()
    for n, result in enumerate((yield defer.gatherResults(crowd)), start=1):
        assert result[:2] == (0, bodies[n]), result[2]
    assert (yield holds_within(lambda: all(map(env.stored, bodies[1:5])), 0.8))

    code, out, err = yield run_curl(env.url("repo/f5"))
    assert (code, out) == (0, bodies[5]), err
    assert not (yield holds_within(lambda: env.stored(bodies[5]), 0.5))  # gathering longer
    assert (yield holds_within(lambda: env.stored(bodies[5]), 3.0))
    assert env.temp_files() == []
