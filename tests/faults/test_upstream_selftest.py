"""Self-test of the fault-injecting upstream: each behaviour does on the wire what it says,
observed with curl and a raw TCP client, and leaves no timer or connection behind."""

from __future__ import annotations

import gzip
import hashlib
import time

import pytest
import pytest_twisted

from tests.support import faults
from tests.support.clients import free_port, raw_http, run_aria2c, run_curl, run_process, run_wget
from tests.support.polling import until

BODY = bytes(range(256)) * 64  # 16 KiB, every byte value


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: upstream\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


def split(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def no_timer_left_behind():
    yield
    assert faults.pending_timers() == []


# --- success paths ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_serve_body_and_request_log(upstream):
    url = upstream.register("/a.bin", faults.Serve(BODY))
    code, out, err = await run_curl("-H", "Authorization: Basic Zm9vOmJhcg==", url)
    assert (code, out) == (0, BODY), err
    [(method, headers)] = upstream.requests("/a.bin")
    assert method == "GET"
    assert headers["authorization"] == "Basic Zm9vOmJhcg=="
    assert upstream.total_connections == 1
    assert await upstream.wait_until_idle(2.0)
    assert upstream.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_serve_head_range_and_conditional(upstream):
    upstream.register(
        "/a.bin", faults.Serve(BODY, etag='"v1"', last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
    )
    head = await raw_http("127.0.0.1", upstream.port, get("/a.bin", "HEAD"))
    headers, body = split(head.data)
    assert b"HTTP/1.1 200" in headers and b"Content-Length: 16384" in headers
    assert b'ETag: "v1"' in headers and b"Last-Modified: Mon, 01 Jan 2024" in headers
    assert body == b""

    code, out, _ = await run_curl("-r", "100-199", upstream.url("/a.bin"))
    assert (code, out) == (0, BODY[100:200])
    code, out, _ = await run_curl("-H", "Range: bytes=-10", upstream.url("/a.bin"))
    assert out == BODY[-10:]
    code, out, _ = await run_curl(
        "-s", "-o", "/dev/null", "-w", "%{http_code}", "-r", "99999-", upstream.url("/a.bin")
    )
    assert out == b"416"
    code, out, _ = await run_curl(
        "-o", "/dev/null", "-w", "%{http_code}", "-H", 'If-None-Match: "v1"', upstream.url("/a.bin")
    )
    assert out == b"304"
    for since, status in (
        ("Mon, 01 Jan 2024 00:00:00 GMT", b"304"),
        ("Sun, 31 Dec 2023 00:00:00 GMT", b"200"),
    ):
        code, out, _ = await run_curl(
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            f"If-Modified-Since: {since}",
            upstream.url("/a.bin"),
        )
        assert out == status
    assert [m for m, _ in upstream.requests("/a.bin")] == ["HEAD"] + ["GET"] * 6


@pytest_twisted.ensureDeferred
async def test_serve_chunked_has_terminator(upstream):
    upstream.register("/c", faults.Serve(BODY, chunked=True, chunk_size=1000))
    result = await raw_http("127.0.0.1", upstream.port, get("/c"))
    headers, body = split(result.data)
    assert b"Transfer-Encoding: chunked" in headers and b"Content-Length" not in headers
    assert body.startswith(b"3e8\r\n") and body.endswith(b"\r\n0\r\n\r\n")
    code, out, _ = await run_curl(upstream.url("/c"))
    assert (code, out) == (0, BODY)


@pytest_twisted.ensureDeferred
async def test_serve_file_generated_and_tree(upstream, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_bytes(BODY)
    (tmp_path.parent / "secret.txt").write_bytes(b"secret")
    upstream.register("/file", faults.ServeFile(tmp_path / "sub" / "f.txt"))
    tree = upstream.serve_tree("/repo", tmp_path)
    generated = faults.Generated(3 * 65536 + 7)
    upstream.register("/gen", generated)

    code, out, _ = await run_curl("-r", "10-19", upstream.url("/file"))
    assert out == BODY[10:20]
    code, out, _ = await run_curl(tree + "sub/f.txt")
    assert (code, out) == (0, BODY)
    code, out, _ = await run_curl(
        "-w", "%{http_code}", "-o", "/dev/null", "--path-as-is", tree + "../secret.txt"
    )
    assert out == b"404"
    code, out, _ = await run_curl(
        "-w", "%{http_code}", "-o", "/dev/null", tree + "%2e%2e/secret.txt"
    )
    assert out == b"404"
    code, out, _ = await run_curl(upstream.url("/gen"))
    assert len(out) == generated.size and sha256(out) == generated.sha256()
    assert b"".join(generated.chunks()) == out


@pytest_twisted.ensureDeferred
async def test_gzip_bytes_kept_exact(upstream):
    gz = faults.Gzip.of(b"payload " * 1000)
    upstream.register("/x.tar.gz", gz)
    code, out, err = await run_curl("-D", "-", "-o", "/dev/null", upstream.url("/x.tar.gz"))
    assert b"Content-Encoding: gzip" in out
    code, out, _ = await run_curl(upstream.url("/x.tar.gz"))  # no --compressed
    assert out == gz.body and gzip.decompress(out) == b"payload " * 1000
    code, out, _ = await run_curl("--compressed", upstream.url("/x.tar.gz"))
    assert out == b"payload " * 1000  # what a decoding client would store instead


# --- broken bodies ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reset_after_n_bytes(upstream):
    upstream.register("/r", faults.ResetAfter(1000, BODY))
    result = await raw_http("127.0.0.1", upstream.port, get("/r"))
    headers, body = split(result.data)
    assert b"Content-Length: 16384" in headers and body == BODY[:1000]
    assert not result.clean and not result.timed_out, result.reason
    code, _, err = await run_curl(upstream.url("/r"))
    assert code == 56, err  # "Failure when receiving data from the peer"


@pytest_twisted.ensureDeferred
async def test_reset_before_headers(upstream):
    upstream.register("/r0", faults.ResetBeforeHeaders())
    result = await raw_http("127.0.0.1", upstream.port, get("/r0"))
    assert result.data == b"" and not result.clean


@pytest_twisted.ensureDeferred
async def test_close_early_under_content_length(upstream):
    upstream.register("/short", faults.CloseEarly(500, BODY))
    result = await raw_http("127.0.0.1", upstream.port, get("/short"))
    headers, body = split(result.data)
    assert b"Content-Length: 16384" in headers and body == BODY[:500]
    assert result.clean  # an orderly FIN, not a reset
    code, out, _ = await run_curl(upstream.url("/short"))
    assert code == 18 and out == BODY[:500]  # "partial file"


@pytest_twisted.ensureDeferred
async def test_chunked_without_last_chunk(upstream):
    upstream.register("/nolast", faults.ChunkedNoLastChunk(BODY, chunk_size=4096))
    result = await raw_http("127.0.0.1", upstream.port, get("/nolast"))
    headers, body = split(result.data)
    assert b"Transfer-Encoding: chunked" in headers
    assert body.endswith(BODY[-4096:] + b"\r\n") and not body.endswith(b"0\r\n\r\n")
    assert result.clean
    code, _, err = await run_curl(upstream.url("/nolast"))
    assert code == 18, err


@pytest.mark.parametrize("size", [1 << 20, 4 << 20])
@pytest_twisted.ensureDeferred
async def test_clean_close_faults_close_bodies_larger_than_the_socket_buffers(upstream, size):
    """The close still happens when the body overflows the transport's write buffer."""
    body = bytes(range(256)) * (size // 256)
    upstream.register("/nolast-big", faults.ChunkedNoLastChunk(body, chunk_size=65536))
    upstream.register("/short-big", faults.CloseEarly(size - 10, body))
    code, _, err = await run_curl("--max-time", "10", upstream.url("/nolast-big"))
    assert code == 18, err
    code, out, err = await run_curl("--max-time", "10", upstream.url("/short-big"))
    assert code == 18 and out == body[: size - 10], err


@pytest_twisted.ensureDeferred
async def test_wrong_bytes_and_wrong_size(upstream):
    wrong = faults.WrongBytes(BODY)
    upstream.register("/wb", wrong)
    upstream.register("/big", faults.WrongSize(BODY, extra=10))
    upstream.register("/small", faults.WrongSize(BODY, extra=-10))
    code, out, _ = await run_curl(upstream.url("/wb"))
    assert code == 0 and len(out) == len(BODY) and out != BODY and out == wrong.served
    assert sha256(out) != sha256(BODY)
    code, out, _ = await run_curl(upstream.url("/big"))
    assert code == 0 and out == BODY + b"x" * 10
    code, out, _ = await run_curl(upstream.url("/small"))
    assert code == 0 and out == BODY[:-10]


# --- stalls and slowness -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stall_after_headers_and_mid_body(upstream):
    upstream.register("/s0", faults.StallAfterHeaders(BODY))
    upstream.register("/s1", faults.StallMidBody(100, BODY))
    result = await raw_http("127.0.0.1", upstream.port, get("/s0"), timeout=0.5)
    headers, body = split(result.data)
    assert result.timed_out and b"200 OK" in headers and body == b""
    result = await raw_http("127.0.0.1", upstream.port, get("/s1"), timeout=0.5)
    assert result.timed_out and split(result.data)[1] == BODY[:100]
    code, _, _ = await run_curl("--max-time", "0.5", upstream.url("/s1"))
    assert code == 28  # timeout
    assert await upstream.wait_until_idle(2.0)


@pytest_twisted.ensureDeferred
async def test_trickle_paces_and_stops_when_client_leaves(upstream):
    upstream.register("/t", faults.Trickle(b"0123456789", bytes_per_sec=40))
    started = time.monotonic()
    code, out, _ = await run_curl(upstream.url("/t"))
    assert (code, out) == (0, b"0123456789")
    assert time.monotonic() - started >= 0.2  # 10 bytes at 40 B/s

    upstream.register("/slow", faults.Trickle(BODY, bytes_per_sec=1))
    result = await raw_http("127.0.0.1", upstream.port, get("/slow"), timeout=1.5)
    assert result.timed_out and 1 <= len(split(result.data)[1]) <= 2
    assert await upstream.wait_until_idle(2.0)
    assert faults.pending_timers() == []  # the pending tick was cancelled with the connection


@pytest_twisted.ensureDeferred
async def test_delay_then_serve(upstream):
    upstream.register("/d", faults.Delay(0.3, faults.Serve(b"late")))
    started = time.monotonic()
    code, out, _ = await run_curl(upstream.url("/d"))
    assert (code, out) == (0, b"late") and time.monotonic() - started >= 0.3
    result = await raw_http("127.0.0.1", upstream.port, get("/d"), timeout=0.1)
    assert result.timed_out and result.data == b""
    assert await upstream.wait_until_idle(2.0)


@pytest_twisted.ensureDeferred
async def test_gated_holds_concurrent_requests(upstream):
    gate = faults.Gated(faults.Serve(b"go"))
    url = upstream.register("/g", gate)
    runs = [run_curl(url) for _ in range(3)]
    await until(lambda: gate.waiting == 3)
    assert upstream.max_concurrent_connections == 3 and upstream.open_connections == 3
    gate.release()
    for run in runs:
        assert await run == (0, b"go", b"")
    code, out, _ = await run_curl(url)
    assert out == b"go"


# --- statuses and redirects --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_then_serve_with_retry_after(upstream):
    upstream.register("/busy", faults.StatusThenServe(429, 2, faults.Serve(b"ok"), retry_after=3))
    date = "Wed, 21 Oct 2037 07:28:00 GMT"
    upstream.register(
        "/down", faults.StatusThenServe(503, 1, faults.Serve(b"ok"), retry_after=date)
    )
    upstream.register("/plain", faults.StatusThenServe(503, 1, faults.Serve(b"ok")))
    for _ in range(2):
        code, out, _ = await run_curl("-i", upstream.url("/busy"))
        assert out.startswith(b"HTTP/1.1 429") and b"Retry-After: 3\r\n" in out
    code, out, _ = await run_curl("-i", upstream.url("/busy"))
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nok")
    code, out, _ = await run_curl("-i", upstream.url("/down"))
    assert out.startswith(b"HTTP/1.1 503") and f"Retry-After: {date}".encode() in out
    assert faults.http_date(date) > time.time()
    code, out, _ = await run_curl("-i", upstream.url("/plain"))
    assert out.startswith(b"HTTP/1.1 503") and b"Retry-After" not in out


@pytest_twisted.ensureDeferred
async def test_status_forever_and_auth(upstream):
    for status in (500, 404, 401, 403):
        upstream.register(f"/{status}", faults.Status(status))
        for _ in range(2):
            code, out, _ = await run_curl(
                "-o", "/dev/null", "-w", "%{http_code}", upstream.url(f"/{status}")
            )
            assert out == str(status).encode()
    url = upstream.register(
        "/private", faults.RequireBasicAuth("alice", "s3cret", faults.Serve(b"in"))
    )
    code, out, _ = await run_curl("-i", url)
    assert out.startswith(b"HTTP/1.1 401") and b'WWW-Authenticate: Basic realm="upstream"' in out
    code, out, _ = await run_curl("-u", "alice:s3cret", url)
    assert out == b"in"
    code, out, _ = await run_curl("-o", "/dev/null", "-w", "%{http_code}", "-u", "alice:nope", url)
    assert out == b"401"


@pytest_twisted.ensureDeferred
async def test_status_with_chunked_and_close_delimited_bodies(upstream):
    upstream.register("/chunked", faults.Status(404, framing="chunked"))
    upstream.register("/close", faults.Status(503, framing="close"))
    result = await raw_http("127.0.0.1", upstream.port, get("/chunked"))
    head, body = split(result.data)
    assert head.startswith(b"HTTP/1.1 404") and b"Transfer-Encoding: chunked" in head
    assert b"Content-Length" not in head and body.endswith(b"\r\n0\r\n\r\n")
    result = await raw_http("127.0.0.1", upstream.port, get("/close"))
    head, body = split(result.data)
    assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head
    assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
    assert body == b"503 from upstream\n"
    for path, status in (("/chunked", b"404"), ("/close", b"503")):
        code, out, _ = await run_curl("-s", "-w", " %{http_code}", upstream.url(path))
        assert code == 0 and out.endswith(b"from upstream\n " + status)


@pytest_twisted.ensureDeferred
async def test_steps_fault_once_then_succeed(upstream):
    url = upstream.register(
        "/once", faults.Steps([faults.ResetAfter(10, BODY), faults.Serve(BODY)])
    )
    code, _, _ = await run_curl(url)
    assert code == 56
    code, out, _ = await run_curl(url)
    assert (code, out) == (0, BODY)
    assert len(upstream.requests("/once")) == 2


@pytest_twisted.ensureDeferred
async def test_redirects(upstream):
    upstream.register("/target", faults.Serve(b"arrived"))
    upstream.register("/moved", faults.Redirect("/target", status=301))
    upstream.register("/abs", faults.Redirect(upstream.url("/target")))
    upstream.register("/loop", faults.RedirectLoop())
    upstream.register("/file", faults.RedirectTo("file:///etc/passwd"))
    code, out, _ = await run_curl("-L", upstream.url("/moved"))
    assert (code, out) == (0, b"arrived")
    code, out, _ = await run_curl("-L", upstream.url("/abs"))
    assert out == b"arrived"
    code, _, _ = await run_curl("-L", "--max-redirs", "5", upstream.url("/loop"))
    assert code == 47  # too many redirects
    assert len(upstream.requests("/loop")) == 6
    code, out, _ = await run_curl("-i", upstream.url("/file"))
    assert out.startswith(b"HTTP/1.1 302") and b"Location: file:///etc/passwd\r\n" in out
    code, out, _ = await run_curl("-L", upstream.url("/file"))
    assert code != 0 and b"root:" not in out  # curl refuses to follow into file://


@pytest_twisted.ensureDeferred
async def test_huge_and_many_headers(upstream):
    upstream.register("/huge", faults.HugeHeaders(70_000))
    upstream.register("/many", faults.ManyHeaders(1000))
    result = await raw_http("127.0.0.1", upstream.port, get("/huge"))
    headers, body = split(result.data)
    assert b"X-Huge: " + b"a" * 70_000 + b"\r\n" in headers + b"\r\n" and body == b"ok\n"
    result = await raw_http("127.0.0.1", upstream.port, get("/many"))
    headers, body = split(result.data)
    assert headers.count(b"\r\nX-H-") == 1000 and body == b"ok\n"


# --- the server itself -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_path_pipelining_and_query(upstream):
    upstream.register("/p", faults.Serve(b"pp"))
    code, out, _ = await run_curl("-o", "/dev/null", "-w", "%{http_code}", upstream.url("/nope"))
    assert out == b"404"
    pipelined = b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" + get("/p?x=1")
    result = await raw_http("127.0.0.1", upstream.port, pipelined)
    assert result.data.count(b"HTTP/1.1 200 OK") == 2 and result.clean
    assert len(upstream.requests("p")) == 2
    assert [path for path, _ in upstream.all_requests()] == ["/nope", "/p", "/p"]


@pytest_twisted.ensureDeferred
async def test_stop_aborts_open_connections_and_leak_detection(upstream_factory):
    server = upstream_factory()
    server.register("/hang", faults.StallAfterHeaders())
    pending = raw_http("127.0.0.1", server.port, get("/hang"), timeout=10)
    await until(lambda: server.open_connections == 1)
    assert await server.wait_until_idle(0.2) is False  # a leak is reported, not hidden
    await server.stop()
    assert server.open_connections == 0 and server.total_connections == 1
    result = await pending
    assert not result.timed_out and not result.clean  # the server reset it


# --- TLS ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_https_with_trustme_ca(tls_upstream, certs):
    url = tls_upstream.register("/s", faults.Serve(b"secure"))
    assert url.startswith("https://127.0.0.1:")
    code, out, err = await run_curl("--cacert", str(certs.ca_pem), url)
    assert (code, out) == (0, b"secure"), err
    code, out, _ = await run_curl(
        "--cacert", str(certs.ca_pem), tls_upstream.url("/s", host="localhost")
    )
    assert out == b"secure"
    code, _, _ = await run_curl(url)  # system CAs do not know the trustme CA
    assert code == 60
    code, _, _ = await run_curl("--cacert", str(certs.ca_pem), tls_upstream.url("/s"), "-r", "0-2")
    assert code == 0


@pytest_twisted.ensureDeferred
async def test_https_invalid_certificates(upstream_factory, certs):
    wrong = upstream_factory(tls=certs.wrong_host)
    untrusted = upstream_factory(tls=certs.untrusted)
    for server in (wrong, untrusted):
        url = server.register("/s", faults.Serve(b"secure"))
        code, _, err = await run_curl("--cacert", str(certs.ca_pem), url)
        assert code == 60, err  # certificate problem
        code, out, _ = await run_curl("-k", url)
        assert out == b"secure"


@pytest_twisted.ensureDeferred
async def test_https_requiring_client_certificate(upstream_factory, certs):
    server = upstream_factory(tls=certs.server_tls(require_client_cert=True))
    url = server.register("/m", faults.Serve(b"mutual"))
    ca = ("--cacert", str(certs.ca_pem))
    code, out, _ = await run_curl(
        *ca, "--cert", str(certs.client_cert), "--key", str(certs.client_key), url
    )
    assert (code, out) == (0, b"mutual")
    code, out, _ = await run_curl(*ca, "--cert", str(certs.client_pem), url)
    assert out == b"mutual"
    code, out, _ = await run_curl(*ca, url)
    assert code != 0 and out == b""
    bad = ("--cert", str(certs.untrusted_client_cert), "--key", str(certs.untrusted_client_key))
    code, out, _ = await run_curl(*ca, *bad, url)
    assert code != 0 and out == b""
    assert server.requests("/m") == server.requests("/m")[:2]


# --- clients -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_helpers(upstream, tmp_path):
    port = free_port()
    assert 0 < port < 65536
    result = await run_process("sleep", "5", timeout=0.2)
    assert result.exit_code == -9
    url = upstream.register("/w", faults.Serve(b"wget me"))
    code, _, err = await run_process("wget", "--no-proxy", "-q", "-O", str(tmp_path / "w"), url)
    assert code == 0, err
    assert (tmp_path / "w").read_bytes() == b"wget me"


@pytest_twisted.ensureDeferred
async def test_https_faults_and_streaming(tls_upstream, certs):
    ca = ("--cacert", str(certs.ca_pem))
    generated = faults.Generated(8 * 1024 * 1024 + 3)
    tls_upstream.register("/gen", generated)
    tls_upstream.register("/reset", faults.ResetAfter(1000, BODY))
    tls_upstream.register("/short", faults.CloseEarly(1000, BODY))
    tls_upstream.register("/nolast", faults.ChunkedNoLastChunk(BODY))
    code, out, _ = await run_curl(*ca, tls_upstream.url("/gen"))
    assert code == 0 and sha256(out) == generated.sha256()
    code, out, _ = await run_curl(*ca, tls_upstream.url("/reset"))
    assert code in (35, 56) and out == BODY[:1000]  # reset under TLS: no close_notify
    code, out, _ = await run_curl(*ca, tls_upstream.url("/short"))
    assert code == 18 and out == BODY[:1000]
    code, _, _ = await run_curl(*ca, tls_upstream.url("/nolast"))
    assert code == 18


@pytest_twisted.ensureDeferred
async def test_https_expired_certificate(upstream_factory, certs):
    server = upstream_factory(tls=certs.expired)
    code, _, err = await run_curl(
        "--cacert", str(certs.ca_pem), server.register("/e", faults.Serve(b""))
    )
    assert code == 60 and b"expired" in err


@pytest_twisted.ensureDeferred
async def test_generated_body_streams_without_buffering(upstream):
    """The server holds a few blocks, not the body, while a client reads 64 MiB."""
    import tracemalloc

    generated = faults.Generated(64 * 1024 * 1024)
    url = upstream.register("/big", generated)
    tracemalloc.start()
    try:
        code, out, _ = await run_curl("-o", "/dev/null", "-w", "%{size_download}", url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0 and out == b"%d" % generated.size
    assert peak < 8 * 1024 * 1024, peak


@pytest_twisted.ensureDeferred
async def test_wget_and_aria2c_helpers(upstream, tmp_path):
    url = upstream.register("/f.bin", faults.Serve(BODY))
    code, _, err = await run_wget("-q", "-O", str(tmp_path / "w.bin"), url)
    assert code == 0, err
    assert (tmp_path / "w.bin").read_bytes() == BODY
    code, out, err = await run_aria2c("-q", "-d", str(tmp_path), "-o", "a.bin", url)
    assert code == 0, out + err
    assert (tmp_path / "a.bin").read_bytes() == BODY
    code, _, _ = await run_wget(
        "-q", "-O", str(tmp_path / "x"), upstream.register("/x", faults.CloseEarly(10, BODY))
    )
    assert code != 0
