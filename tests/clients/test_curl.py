"""curl against the streamer: cold (lazy) and warm GET, HEAD, ranges, If-Modified-Since,
``--compressed`` and ``-C -`` resume. Every cold file must be fetched upstream exactly once
and end up stored with the manifest's sha256."""

from __future__ import annotations

import gzip
import os
from email.utils import formatdate, parsedate_to_datetime

import attrs
import pytest_twisted
from twisted.web.http import Request

from tests.clients.mirror import sha256
from tests.support.clients import run_curl
from tests.support.faults import Behaviour, Gzip, Serve

MiB = 1024 * 1024
BLOB = os.urandom(MiB + 12345)
UPSTREAM_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


def headers_of(dump: bytes) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of the last response in a ``curl -D`` dump."""
    block = dump.replace(b"\r\n", b"\n").strip().split(b"\n\n")[-1].decode("latin-1")
    status_line, *lines = block.split("\n")
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in fields.items()}


async def curl(url: str, *args: str, tmp_path) -> tuple[int, dict[str, str], bytes]:
    """``curl ARGS -D headers -o body URL``: (status, headers, body); fails on a curl error."""
    head, body = tmp_path / "curl.headers", tmp_path / "curl.body"
    for path in (head, body):
        path.unlink(missing_ok=True)
    code, _, err = await run_curl(*args, "-D", str(head), "-o", str(body), url, timeout=20)
    assert code == 0, err.decode()
    status, headers = headers_of(head.read_bytes())
    return status, headers, body.read_bytes() if body.exists() else b""


@pytest_twisted.ensureDeferred
async def test_cold_get_streams_and_stores_then_warm_get_is_local(make_mirror, tmp_path):
    mirror = await make_mirror({"pool/blob.bin": BLOB})
    status, cold, body = await curl(mirror.url("pool/blob.bin"), tmp_path=tmp_path)
    assert status == 200 and body == BLOB
    assert cold["content-length"] == str(len(BLOB))
    assert await mirror.stored_soon("pool/blob.bin")
    assert mirror.stored_bytes("pool/blob.bin") == BLOB

    status, warm, body = await curl(mirror.url("pool/blob.bin"), tmp_path=tmp_path)
    assert status == 200 and body == BLOB
    assert mirror.upstream_gets("pool/blob.bin") == 1
    assert warm["etag"] == cold["etag"] == f'"{sha256(BLOB)}"'
    assert warm["content-type"] == cold["content-type"]
    assert mirror.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_head_cold_needs_no_upstream_and_matches_warm(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB})
    status, cold, _ = await curl(mirror.url("blob.bin"), "-I", tmp_path=tmp_path)
    assert status == 200
    assert cold["content-length"] == str(len(BLOB))
    assert mirror.upstream_requests("blob.bin") == []

    await curl(mirror.url("blob.bin"), tmp_path=tmp_path)
    assert await mirror.stored_soon("blob.bin")
    status, warm, _ = await curl(mirror.url("blob.bin"), "-I", tmp_path=tmp_path)
    assert status == 200
    assert warm["content-length"] == cold["content-length"]
    assert warm["etag"] == cold["etag"]
    assert mirror.upstream_gets("blob.bin") == 1


@pytest_twisted.ensureDeferred
async def test_missing_path_is_404(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": b"x"})
    status, _, _ = await curl(mirror.url("nope.bin"), tmp_path=tmp_path)
    assert status == 404
    code, _, _ = await run_curl("-f", "-o", os.devnull, mirror.url("nope.bin"))
    assert code == 22  # curl -f: HTTP error


@pytest_twisted.ensureDeferred
async def test_ranges_cold_then_warm(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB})
    url, total = mirror.url("blob.bin"), len(BLOB)

    status, headers, body = await curl(url, "-r", "1000-1999", tmp_path=tmp_path)
    assert status == 206 and body == BLOB[1000:2000]
    assert headers["content-range"] == f"bytes 1000-1999/{total}"
    assert await mirror.stored_soon("blob.bin")
    # The whole artifact was fetched once, without a Range upstream.
    assert mirror.upstream_requests("blob.bin") == ["GET"]

    for spec, first, last in [
        ("1000-1999", 1000, 1999),
        ("-100", total - 100, total - 1),
        (f"{MiB}-", MiB, total - 1),
        ("0-0", 0, 0),
    ]:
        status, headers, body = await curl(url, "-r", spec, tmp_path=tmp_path)
        assert status == 206, spec
        assert body == BLOB[first : last + 1], spec
        assert headers["content-range"] == f"bytes {first}-{last}/{total}", spec

    status, headers, body = await curl(url, "-r", "0-9,20-29", tmp_path=tmp_path)
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges")
    assert BLOB[0:10] in body and BLOB[20:30] in body
    assert f"bytes 0-9/{total}".encode() in body and f"bytes 20-29/{total}".encode() in body

    status, headers, _ = await curl(url, "-r", f"{total}-", tmp_path=tmp_path)
    assert status == 416 and headers["content-range"] == f"bytes */{total}"
    assert mirror.upstream_gets("blob.bin") == 1


@pytest_twisted.ensureDeferred
async def test_if_modified_since_gives_304_on_stored_content(make_mirror, tmp_path):
    files = {"dated.bin": BLOB}
    mirror = await make_mirror(files, {"dated.bin": Serve(BLOB, last_modified=UPSTREAM_DATE)})
    url = mirror.url("dated.bin")
    status, cold, body = await curl(url, tmp_path=tmp_path)
    assert status == 200 and body == BLOB
    assert await mirror.stored_soon("dated.bin")

    status, warm, _ = await curl(url, "-I", tmp_path=tmp_path)
    modified = warm["last-modified"]
    status, _, body = await curl(url, "-z", modified, tmp_path=tmp_path)
    assert (status, body) == (304, b"")
    earlier = formatdate(parsedate_to_datetime(modified).timestamp() - 86400, usegmt=True)
    status, _, body = await curl(url, "-z", earlier, tmp_path=tmp_path)
    assert (status, body) == (200, BLOB)
    assert mirror.upstream_gets("dated.bin") == 1


@pytest_twisted.ensureDeferred
async def test_last_modified_is_the_same_cold_and_warm(make_mirror, tmp_path):
    """A client that cached the cold answer revalidates it with curl -z against the stored
    copy: same bytes, so the same Last-Modified and a 304."""
    files = {"dated.bin": BLOB}
    mirror = await make_mirror(files, {"dated.bin": Serve(BLOB, last_modified=UPSTREAM_DATE)})
    url = mirror.url("dated.bin")
    status, cold, _ = await curl(url, tmp_path=tmp_path)
    assert status == 200 and await mirror.stored_soon("dated.bin")
    _, warm, _ = await curl(url, "-I", tmp_path=tmp_path)
    assert warm.get("last-modified") == cold.get("last-modified")
    status, _, body = await curl(url, "-z", cold["last-modified"], tmp_path=tmp_path)
    assert (status, body) == (304, b"")


PAYLOAD = b"a tarball's worth of text\n" * 4000


@pytest_twisted.ensureDeferred
async def test_gz_artifact_served_with_content_encoding_gzip(make_mirror, tmp_path):
    """An upstream labels a ``.gz`` file ``Content-Encoding: gzip`` (a common misconfiguration).
    The artifact is the .gz file: it is stored with the manifest's sha256, a plain curl gets
    its exact bytes cold and warm, and ``curl --compressed`` gets the same thing cold and
    warm."""
    files = {
        "a.tar.gz": gzip.compress(PAYLOAD + b"a", mtime=0),
        "b.tar.gz": gzip.compress(PAYLOAD + b"b", mtime=0),
    }
    mirror = await make_mirror(files, {name: Gzip(data) for name, data in files.items()})
    # Plain curl: the wire bytes, cold and warm.
    status, _, body = await curl(mirror.url("a.tar.gz"), tmp_path=tmp_path)
    assert (status, body) == (200, files["a.tar.gz"])
    assert await mirror.stored_soon("a.tar.gz")
    assert mirror.stored_bytes("a.tar.gz") == files["a.tar.gz"]
    status, _, body = await curl(mirror.url("a.tar.gz"), tmp_path=tmp_path)
    assert (status, body) == (200, files["a.tar.gz"])

    # curl --compressed: whatever it saves, it saves the same cold and warm.
    status, cold, cold_body = await curl(mirror.url("b.tar.gz"), "--compressed", tmp_path=tmp_path)
    assert status == 200 and cold_body in (files["b.tar.gz"], PAYLOAD + b"b")
    assert await mirror.stored_soon("b.tar.gz")
    assert mirror.stored_bytes("b.tar.gz") == files["b.tar.gz"]
    status, warm, warm_body = await curl(mirror.url("b.tar.gz"), "--compressed", tmp_path=tmp_path)
    assert status == 200
    assert (sha256(warm_body), len(warm_body)) == (sha256(cold_body), len(cold_body)), (
        "curl --compressed saves different files cold and warm"
    )
    assert warm.get("content-encoding") == cold.get("content-encoding")
    assert mirror.upstream_gets("a.tar.gz") == mirror.upstream_gets("b.tar.gz") == 1


@attrs.frozen
class GzipIfAsked(Behaviour):
    """Like nginx with ``gzip on``: gzip-encodes the body when the request accepts gzip."""

    body: bytes

    def render(self, request: Request) -> bytes:
        accepted = (request.getHeader(b"accept-encoding") or b"").lower()
        request.setHeader(b"content-type", b"text/plain")
        body = self.body
        if b"gzip" in accepted:
            body = gzip.compress(body, mtime=0)
            request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


@pytest_twisted.ensureDeferred
async def test_compressed_client_does_not_make_upstream_compress(make_mirror, tmp_path):
    """``curl --compressed`` sends Accept-Encoding: gzip; the streamer must still fetch the
    manifest's bytes (identity) from an upstream that would compress on request."""
    text = b"plain text that an upstream would gladly gzip\n" * 2000
    mirror = await make_mirror({"notes.txt": text}, {"notes.txt": GzipIfAsked(text)})
    status, _, body = await curl(mirror.url("notes.txt"), "--compressed", tmp_path=tmp_path)
    assert (status, body) == (200, text)
    assert await mirror.stored_soon("notes.txt")
    status, _, body = await curl(mirror.url("notes.txt"), "--compressed", tmp_path=tmp_path)
    assert (status, body) == (200, text)
    assert mirror.upstream_gets("notes.txt") == 1


@pytest_twisted.ensureDeferred
async def test_resume_with_continue_at_cold_and_warm(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB})
    url = mirror.url("blob.bin")
    for label, have in [("cold", 300_000), ("warm", 700_000)]:
        partial = tmp_path / f"{label}.part"
        partial.write_bytes(BLOB[:have])
        code, out, err = await run_curl(
            "-C", "-", "-w", "%{http_code}", "-o", str(partial), url, timeout=20
        )
        assert code == 0, (label, err)
        assert out == b"206", label
        assert partial.read_bytes() == BLOB, label
        assert await mirror.stored_soon("blob.bin"), label
    assert mirror.upstream_requests("blob.bin") == ["GET"]
    assert mirror.temp_files() == []
