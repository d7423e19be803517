"""Lazy content through a real upstream and real clients: cold GET, storing, headers, HEAD,
Range on content that is still downloading, and the streamed policy."""

from __future__ import annotations

import os
import stat

import pytest_twisted
import treq

from tests.support.clients import run_curl
from tests.support.faults import Gated, Generated, Serve, Trickle
from tests.support.lazy import parse_response, sha256
from tests.support.polling import holds_within

BODY = bytes(range(256)) * 1024  # 256 KiB


@pytest_twisted.inlineCallbacks
def test_cold_get_streams_stores_and_next_get_is_a_hit(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/files/a.bin", Serve(BODY))
    yield env.publish("repo/a.bin", BODY, ("up", url))

    code, out, err = yield run_curl("-f", env.url("repo/a.bin"))
    assert code == 0, err
    assert out == BODY
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == []
    entries = yield env.catalog.lookup("repo/a.bin")
    assert entries[0].stored
    # Stored with the artifacts' mode (the tee file is made with it; commit fixes any other).
    assert stat.S_IMODE(os.stat(env.storage.path_for(sha256(BODY))).st_mode) == 0o644

    code, out, _ = yield run_curl("-f", env.url("repo/a.bin"))
    assert code == 0 and out == BODY
    assert len(env.upstream.requests("/files/a.bin")) == 1
    assert env.metrics.value("streamer_downloads_total") == 1


@pytest_twisted.inlineCallbacks
def test_headers_forwarded_hop_by_hop_dropped_no_empty_content_encoding(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    headers = {
        "Cache-Control": "max-age=60",
        "Expires": "Thu, 01 Jan 2099 00:00:00 GMT",
        "Content-Disposition": 'attachment; filename="a.bin"',
        "Content-Encoding": "",
        "Set-Cookie": "session=secret",
        "Connection": "X-Private",
        "X-Private": "internal",
        "Keep-Alive": "timeout=5",
        "Upgrade": "h2c",
        "Proxy-Authenticate": "Basic",
    }
    url = env.upstream.register(
        "/a.tar",
        Serve(
            BODY,
            headers=headers,
            content_type="application/x-tar",
            etag='"up-etag"',
            last_modified="Mon, 02 Jan 2023 03:04:05 GMT",
        ),
    )
    yield env.publish("repo/a.tar", BODY, ("up", url))

    code, out, err = yield run_curl("-sSi", env.url("repo/a.tar"))
    assert code == 0, err
    status, h, body = parse_response(out)
    assert status == 200
    assert body == BODY
    assert h["content-type"] == ["application/x-tar"]
    assert h["content-length"] == [str(len(BODY))]
    assert h["etag"] == [f'"{sha256(BODY)}"'], "our validator, not the upstream's"
    assert h["last-modified"] == ["Mon, 02 Jan 2023 03:04:05 GMT"]
    assert h["cache-control"] == ["max-age=60"]
    assert h["expires"] == ["Thu, 01 Jan 2099 00:00:00 GMT"]
    assert h["content-disposition"] == ['attachment; filename="a.bin"']
    assert h["accept-ranges"] == ["bytes"]
    for dropped in (
        "content-encoding",
        "set-cookie",
        "x-private",
        "keep-alive",
        "upgrade",
        "proxy-authenticate",
        "transfer-encoding",
    ):
        assert dropped not in h, dropped
    yield holds_within(lambda: not env.streamer.in_flight)


@pytest_twisted.inlineCallbacks
def test_cold_and_warm_answers_carry_the_same_representation_headers(lazy_env):
    """The artifact is the published bytes: an upstream's ``Content-Encoding: gzip`` on a
    ``.gz`` is not passed on (a decoding client would save other bytes cold than warm), the
    type comes from the extension both times, and the upstream's Last-Modified is kept by the
    stored copy."""
    env = lazy_env.start()
    env.remote("up")
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    url = env.upstream.register(
        "/x.gz", Serve(BODY, headers={"Content-Encoding": "gzip", "Last-Modified": date})
    )
    yield env.publish("repo/x.gz", BODY, ("up", url))
    answers = []
    for _ in ("cold", "warm"):
        code, out, err = yield run_curl("-sSi", env.url("repo/x.gz"))
        assert code == 0, err
        status, headers, body = parse_response(out)
        assert (status, body) == (200, BODY)
        answers.append(headers)
        yield holds_within(lambda: not env.streamer.in_flight and env.stored(BODY))
    cold, warm = answers
    for headers in (cold, warm):
        assert "content-encoding" not in headers
        assert headers["content-type"] == ["application/gzip"]
        assert headers["last-modified"] == [date]
    assert cold["etag"] == warm["etag"]
    assert len(env.upstream.requests("/x.gz")) == 1


@pytest_twisted.inlineCallbacks
def test_chunked_upstream_gets_content_length_from_the_catalog(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/c.bin", Serve(BODY, chunked=True, chunk_size=1000))
    yield env.publish("repo/c.rpm", BODY, ("up", url))
    code, out, err = yield run_curl("-sSi", env.url("repo/c.rpm"))
    assert code == 0, err
    status, headers, body = parse_response(out)
    assert (status, body) == (200, BODY)
    assert headers["content-length"] == [str(len(BODY))]
    assert "transfer-encoding" not in headers
    yield holds_within(lambda: not env.streamer.in_flight)


@pytest_twisted.inlineCallbacks
def test_head_on_cold_content_makes_no_upstream_request(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/h.json", Serve(BODY))
    yield env.publish("repo/h.json", BODY, ("up", url))
    code, out, err = yield run_curl("-sSI", env.url("repo/h.json"))
    assert code == 0, err
    head = out.lower()
    assert head.startswith(b"http/1.1 200")
    assert b"content-length: %d\r\n" % len(BODY) in head
    assert b"content-type: application/json" in head
    assert b'etag: "%s"' % sha256(BODY).encode() in head
    assert env.upstream.all_requests() == []
    assert not env.stored(BODY)


@pytest_twisted.inlineCallbacks
def test_streamed_policy_serves_and_keeps_nothing(lazy_env):
    env = lazy_env.start()
    env.remote("up", policy="streamed")
    url = env.upstream.register("/s.bin", Serve(BODY))
    yield env.publish("repo/s.bin", BODY, ("up", url))
    for _ in range(2):
        code, out, err = yield run_curl("-f", env.url("repo/s.bin"))
        assert code == 0, err
        assert out == BODY
        assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert not env.stored(BODY)
    assert env.temp_files() == []
    assert len(env.upstream.requests("/s.bin")) == 2


@pytest_twisted.inlineCallbacks
def test_streamed_policy_serves_an_artifact_another_remote_stored(lazy_env):
    """`streamed` keeps nothing of its own, but the store is by sha256: once another remote
    stored the same bytes, the streamed path is answered from disk, with no upstream request."""
    env = lazy_env.start()
    env.remote("kept")
    env.remote("live", policy="streamed")
    kept = env.upstream.register("/kept/a.bin", Serve(BODY))
    live = env.upstream.register("/live/a.bin", Serve(BODY))
    yield env.publish("kept/a.bin", BODY, ("kept", kept))
    yield env.publish("live/a.bin", BODY, ("live", live))
    code, out, err = yield run_curl("-f", env.url("kept/a.bin"))
    assert (code, out) == (0, BODY), err
    assert (yield holds_within(lambda: env.stored(BODY)))
    for _ in range(2):
        code, out, err = yield run_curl("-f", "-H", "Range: bytes=10-19", env.url("live/a.bin"))
        assert (code, out) == (0, BODY[10:20]), err
        code, out, err = yield run_curl("-f", env.url("live/a.bin"))
        assert (code, out) == (0, BODY), err
    assert env.upstream.requests("/live/a.bin") == []
    assert env.finished[-1][3] == "hit"


@pytest_twisted.inlineCallbacks
def test_a_range_on_streamed_content_downloads_from_byte_0(lazy_env):
    """Only whole validated artifacts answer ranges, so a range of content nobody stored is
    cut from a download of the artifact from its first byte: the last 100 bytes of a
    streamed file cost the whole file upstream, on every request."""
    env = lazy_env.start()
    env.remote("live", policy="streamed")
    url = env.upstream.register("/live/b.bin", Serve(BODY))
    yield env.publish("live/b.bin", BODY, ("live", url))
    for _ in range(2):
        code, out, err = yield run_curl("-sSi", "-H", "Range: bytes=-100", env.url("live/b.bin"))
        assert code == 0, err
        status, headers, body = parse_response(out)
        assert (status, body) == (206, BODY[-100:])
        assert headers["content-range"] == [f"bytes {len(BODY) - 100}-{len(BODY) - 1}/{len(BODY)}"]
        assert (yield holds_within(lambda: not env.streamer.in_flight))
    requests = env.upstream.requests("/live/b.bin")
    assert len(requests) == 2
    assert all("range" not in headers for _method, headers in requests), requests
    assert not env.stored(BODY) and env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_empty_artifact(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/empty", Serve(b""))
    yield env.publish("repo/empty", b"", ("up", url))
    code, out, err = yield run_curl("-sSi", env.url("repo/empty"))
    assert code == 0, err
    status, headers, body = parse_response(out)
    assert (status, headers["content-length"], body) == (200, ["0"], b"")
    assert (yield holds_within(lambda: env.stored(b"")))


# --- Range on lazy content -----------------------------------------------------------------


BIG = Generated(3 * 1024 * 1024 + 123, block_size=65536)
BIG_BODY = b"".join(BIG.chunks())


@pytest_twisted.inlineCallbacks
def test_single_ranges_on_cold_content_across_chunk_boundaries(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    yield env.publish("repo/big", BIG_BODY, ("up", url))
    cases = {
        "bytes=65530-65545": BIG_BODY[65530:65546],
        "bytes=0-0": BIG_BODY[:1],
        "bytes=-100": BIG_BODY[-100:],
        "bytes=3145000-": BIG_BODY[3145000:],
        "bytes=1000000-1999999": BIG_BODY[1000000:2000000],
    }
    results = yield _gather([treq.get(env.url("repo/big"), headers={"Range": r}) for r in cases])
    size = len(BIG_BODY)
    for (spec, expected), response in zip(cases.items(), results, strict=True):
        assert response.code == 206, spec
        body = yield response.content()
        assert body == expected, spec
        first = size - 100 if spec == "bytes=-100" else int(spec[6:].split("-")[0])
        assert response.headers.getRawHeaders("content-range") == [
            f"bytes {first}-{first + len(expected) - 1}/{size}"
        ]
    assert len(env.upstream.requests("/big")) == 1
    assert (yield holds_within(lambda: env.stored(BIG_BODY)))


@pytest_twisted.inlineCallbacks
def test_range_starts_before_the_download_ends_and_completes_once_validated(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/slow", Trickle(BODY, bytes_per_sec=len(BODY) / 1.0))
    yield env.publish("repo/slow", BODY, ("up", url))
    response = yield treq.get(env.url("repo/slow"), headers={"Range": "bytes=10-19"})
    assert response.code == 206
    (inflight,) = env.streamer.in_flight.values()
    assert not inflight.succeeded, "the range should start while the download still runs"
    assert (yield response.content()) == BODY[10:20]
    # Its last byte waited for the whole artifact's size and digest check.
    assert inflight.succeeded
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_multiple_ranges_and_unsatisfiable_range(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    gate = Gated(Serve(BODY))
    url = env.upstream.register("/m", gate)
    yield env.publish("repo/m", BODY, ("up", url))

    code, out, err = yield run_curl("-sSi", "-r", "999999-", env.url("repo/m"))
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 416")
    assert b"content-range: bytes */%d" % len(BODY) in out.lower()
    assert gate.waiting == 0, "a 416 needs no upstream request"

    pending = treq.get(env.url("repo/m"), headers={"Range": "bytes=0-9,100000-100009,-5"})
    assert (yield holds_within(lambda: gate.waiting == 1))
    gate.release()
    response = yield pending
    assert response.code == 206
    content_type = response.headers.getRawHeaders("content-type")[0]
    assert content_type.startswith("multipart/byteranges; boundary=")
    boundary = content_type.split("boundary=")[1].encode()
    body = yield response.content()
    assert response.length == len(body)  # twisted moves Content-Length to .length
    parts = body.split(b"--" + boundary)
    payloads = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts[1:-1]]
    assert payloads == [BODY[0:10], BODY[100000:100010], BODY[-5:]]
    assert b"content-range: bytes 100000-100009/%d" % len(BODY) in body.lower()
    assert (yield holds_within(lambda: env.stored(BODY)))


def _gather(deferreds):
    from twisted.internet import defer

    return defer.gatherResults(deferreds, consumeErrors=True)


@pytest_twisted.inlineCallbacks
def test_a_plain_get_skips_preconditions_and_ranges_a_conditional_one_gets_them(
    lazy_env, monkeypatch
):
    """A GET with no precondition and no Range (most) does not work them out for each entry
    tried; with one, they are evaluated as before (here a 304 from the catalog's ETag and a
    206, each on content not stored yet), and a plain GET still carries the ETag."""
    import streamer.lazy

    evaluated: list[bytes] = []
    evaluate = streamer.lazy.evaluate_conditions
    monkeypatch.setattr(
        streamer.lazy,
        "evaluate_conditions",
        lambda request, *args: evaluated.append(request.path) or evaluate(request, *args),
    )
    env = lazy_env.start()
    env.remote("up")
    bodies = {"a": BODY, "b": BODY[::-1], "c": BODY[1:] + BODY[:1]}  # three artifacts
    for name, data in bodies.items():
        url = env.upstream.register(f"/files/{name}.bin", Serve(data))
        yield env.publish(f"repo/{name}.bin", data, ("up", url))
    code, out, err = yield run_curl("-i", env.url("repo/a.bin"))
    assert code == 0, err
    status, headers, body = parse_response(out)
    assert (status, body, evaluated) == (200, BODY, [])
    assert headers["etag"] == [f'"{sha256(BODY)}"']
    etag = f'If-None-Match: "{sha256(bodies["b"])}"'
    code, out, err = yield run_curl("-i", "-H", etag, env.url("repo/b.bin"))
    assert code == 0 and parse_response(out)[0] == 304, err
    code, out, err = yield run_curl("-i", "-r", "0-9", env.url("repo/c.bin"))
    assert code == 0 and parse_response(out)[::2] == (206, bodies["c"][:10]), err
    assert evaluated == [b"/repo/b.bin", b"/repo/c.bin"]
