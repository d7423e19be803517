"""Edge cases real clients hit: listing URLs without a trailing slash, awkward file names,
resuming a file that is already complete, HTTP/1.0 clients, and the ``streamed`` policy."""

from __future__ import annotations

import os
import re
from urllib.parse import urljoin

import pytest_twisted

from tests.clients.mirror import sha256
from tests.support.clients import run_curl, run_wget
from tests.support.faults import Trickle

NAMES = {
    "hash#tag.txt": b"hash\n",
    "question?mark.txt": b"question\n",
    "100%.txt": b"percent\n",
    "na\u00efve caf\u00e9.txt": b"unicode\n",
    "semi;colon&amp.txt": b"semi\n",
    "dir with space/inner file.txt": b"inner\n",
}
BLOB = os.urandom(400_000)


@pytest_twisted.ensureDeferred
async def test_folder_without_trailing_slash_resolves_links_correctly(make_mirror, tmp_path):
    """``/fixtures`` and ``/fixtures/sub`` (no slash): a client resolving the listing's
    relative links against the URL it asked for must land on the files (a redirect to the
    slash form, as web servers do, or links that work from there)."""
    mirror = await make_mirror({"top.txt": b"top\n", "sub/deep.txt": b"deep\n"})
    for folder, name in [("", "top.txt"), ("sub", "deep.txt")]:
        url = mirror.base_url.rstrip("/") + (f"/{folder}" if folder else "")
        code, out, err = await run_curl("-L", "-w", "\n%{url_effective}", url)
        assert code == 0, err
        page, effective = out.rsplit(b"\n", 1)
        hrefs = re.findall(rb'href="([^"]+)"', page)
        assert name.encode() in hrefs, page
        target = urljoin(effective.decode(), name)
        code, body, err = await run_curl("-f", target)
        assert code == 0, (target, err)
        assert body.decode().strip() in ("top", "deep")


@pytest_twisted.ensureDeferred
async def test_awkward_names_via_curl_and_a_wget_crawl(make_mirror, tmp_path):
    mirror = await make_mirror(NAMES)
    for name, data in NAMES.items():
        code, body, err = await run_curl("-f", mirror.url(name))
        assert (code, body) == (0, data), (name, err)
    out = tmp_path / "crawl"
    code, _, log = await run_wget(
        "-r", "-np", "-nH", "--cut-dirs=1", "-e", "robots=off", "--restrict-file-names=nocontrol",
        "-P", str(out), mirror.base_url,
    )  # fmt: skip
    assert code == 0, log.decode()
    got = {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and p.name != "index.html"
    }
    assert got == NAMES
    for name in NAMES:
        assert mirror.upstream_gets(name) == 1, name


@pytest_twisted.ensureDeferred
async def test_resuming_a_complete_file_is_a_no_op_cold_and_warm(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB, "other.bin": BLOB[::-1]})
    # curl -C - on a complete file: 416 with bytes */N, which curl takes as "done".
    done = tmp_path / "blob.bin"
    done.write_bytes(BLOB)
    code, out, err = await run_curl(
        "-C", "-", "-w", "%{http_code}", "-o", str(done), mirror.url("blob.bin")
    )
    assert code == 0, err
    assert out == b"416" and done.read_bytes() == BLOB
    # wget -c on a complete file: nothing to do.
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "other.bin").write_bytes(BLOB[::-1])
    code, _, err = await run_wget("-c", "-P", str(folder), mirror.url("other.bin"))
    assert code == 0, err
    assert (folder / "other.bin").read_bytes() == BLOB[::-1]
    # Both answers came from the catalog: nothing was fetched for a client that needs nothing.
    assert mirror.upstream_gets("blob.bin") == mirror.upstream_gets("other.bin") == 0


@pytest_twisted.ensureDeferred
async def test_http10_client_cold_and_warm(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB})
    for attempt in ("cold", "warm"):
        code, body, err = await run_curl("--http1.0", "-f", mirror.url("blob.bin"))
        assert (code, sha256(body)) == (0, sha256(BLOB)), (attempt, err)
        assert await mirror.stored_soon("blob.bin")
    assert mirror.upstream_gets("blob.bin") == 1


@pytest_twisted.ensureDeferred
async def test_streamed_policy_serves_every_client_and_stores_nothing(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB}, policy="streamed")
    for _ in range(2):
        code, body, err = await run_curl("-f", mirror.url("blob.bin"))
        assert (code, sha256(body)) == (0, sha256(BLOB)), err
        code, body, err = await run_wget("-q", "-O", "-", mirror.url("blob.bin"))
        assert (code, sha256(body)) == (0, sha256(BLOB)), err
    assert mirror.upstream_gets("blob.bin") == 4
    assert not mirror.is_stored("blob.bin")
    assert mirror.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_spider_crawl_checks_links_without_fetching_artifacts(make_mirror, tmp_path):
    """A link checker (``wget --spider -r``) walks the listing with HEAD requests: every
    link is found, and no artifact is downloaded from upstream for it."""
    files = {"a.txt": b"alpha\n", "sub/b.bin": BLOB}
    mirror = await make_mirror(files)
    code, _, log = await run_wget(
        "--spider", "-r", "-np", "-e", "robots=off", "-P", str(tmp_path / "s"), mirror.base_url
    )
    assert code == 0, log.decode()
    assert b"Found no broken links." in log, log.decode()
    for name in files:
        assert mirror.url(name).encode() in log, name
        assert mirror.upstream_gets(name) == 0, name


@pytest_twisted.ensureDeferred
async def test_a_client_giving_up_does_not_cancel_the_download_that_fills_the_store(
    make_mirror, tmp_path
):
    big = os.urandom(4 * 1024 * 1024)
    slow = Trickle(big, bytes_per_sec=4 * 1024 * 1024, interval=0.05)  # ~1 s
    mirror = await make_mirror({"big.bin": big}, {"big.bin": slow})
    code, body, _ = await run_curl("--max-time", "0.3", mirror.url("big.bin"))
    assert code == 28 and len(body) < len(big)  # curl: operation timed out
    assert await mirror.stored_soon("big.bin", timeout=10)
    code, body, err = await run_curl("-f", mirror.url("big.bin"))
    assert (code, sha256(body)) == (0, sha256(big)), err
    assert mirror.upstream_gets("big.bin") == 1
