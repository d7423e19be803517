"""wget against the streamer: cold and warm downloads, ``-c`` continue, ``--spider`` and a
recursive ``wget -r -np`` crawl of the HTML listing under the base path."""

from __future__ import annotations

import os
import re

import pytest_twisted

from tests.clients.mirror import sha256
from tests.support.clients import run_wget
from tests.support.faults import Serve

MiB = 1024 * 1024
BLOB = os.urandom(2 * MiB + 777)

TREE = {
    "a.txt": b"alpha\n",
    "with space.txt": b"a name with a space\n",
    "plus+sign.txt": b"a plus\n",
    "sub/deep.bin": os.urandom(300_000),
    "sub/more/z.txt": b"zed\n",
    "empty.txt": b"",
}


@pytest_twisted.ensureDeferred
async def test_cold_then_warm_download(make_mirror, tmp_path):
    mirror = await make_mirror({"pool/blob.bin": BLOB, "with space.txt": b"spaced\n"})
    for attempt in ("cold", "warm"):
        out = tmp_path / f"{attempt}.bin"
        code, _, err = await run_wget("-q", "-O", str(out), mirror.url("pool/blob.bin"))
        assert code == 0, (attempt, err)
        assert out.read_bytes() == BLOB, attempt
        assert await mirror.stored_soon("pool/blob.bin")
    code, _, err = await run_wget("-q", "-P", str(tmp_path), mirror.url("with space.txt"))
    assert code == 0, err
    assert (tmp_path / "with space.txt").read_bytes() == b"spaced\n"
    assert await mirror.stored_soon("with space.txt")
    assert mirror.upstream_gets("pool/blob.bin") == 1
    assert mirror.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_continue_a_partial_file_cold_and_warm(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB})
    for attempt, have in [("cold", 500_000), ("warm", MiB + 3)]:
        folder = tmp_path / attempt
        folder.mkdir()
        (folder / "blob.bin").write_bytes(BLOB[:have])
        code, _, err = await run_wget("-c", "-S", "-P", str(folder), mirror.url("blob.bin"))
        assert code == 0, (attempt, err)
        assert b"206 Partial Content" in err, (attempt, err)
        assert (folder / "blob.bin").read_bytes() == BLOB, attempt
        assert await mirror.stored_soon("blob.bin"), attempt
    assert mirror.upstream_requests("blob.bin") == ["GET"]


@pytest_twisted.ensureDeferred
async def test_spider_checks_without_downloading(make_mirror, tmp_path):
    mirror = await make_mirror({"blob.bin": BLOB})
    code, _, err = await run_wget("--spider", mirror.url("blob.bin"))
    assert code == 0, err
    assert b"Remote file exists" in err
    assert mirror.upstream_gets("blob.bin") == 0
    code, _, err = await run_wget("--spider", mirror.url("missing.bin"))
    assert code == 8, err  # wget: the server issued an error response
    assert not mirror.is_stored("blob.bin")


REQUESTED = re.compile(rb"^--\S+ \S+--  (\S+)$", re.MULTILINE)


@pytest_twisted.ensureDeferred
async def test_recursive_crawl_of_the_listing_stays_under_the_base_path(make_mirror, tmp_path):
    mirror = await make_mirror(TREE)
    out = tmp_path / "crawl"
    code, _, log = await run_wget(
        "-r",
        "-np",
        "-nH",
        "--cut-dirs=1",
        "-e",
        "robots=off",
        "-P",
        str(out),
        mirror.base_url,
        timeout=30,
    )
    assert code == 0, log.decode()
    requested = [url.decode() for url in REQUESTED.findall(log)]
    assert requested, log.decode()
    outside = [url for url in requested if not url.startswith(mirror.base_url)]
    assert outside == [], f"wget left {mirror.base_url}: {outside}"

    got = {
        str(path.relative_to(out)): path.read_bytes()
        for path in out.rglob("*")
        if path.is_file() and path.name != "index.html"
    }
    assert sorted(got) == sorted(TREE)
    for name, data in TREE.items():
        assert sha256(got[name]) == sha256(data), name
    # The listing pages themselves were saved too (one per folder).
    assert {p.relative_to(out).as_posix() for p in out.rglob("index.html")} == {
        "index.html",
        "sub/index.html",
        "sub/more/index.html",
    }
    for name in TREE:
        assert mirror.upstream_gets(name) == 1, name
        assert await mirror.stored_soon(name), name


DATED = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(100_000)}


@pytest_twisted.ensureDeferred
async def test_mirror_mode_twice_downloads_nothing_the_second_time(make_mirror, tmp_path):
    """``wget -m`` (timestamping) run twice: the second run finds every file unchanged,
    whether the first run got it cold (streamed) and the second warm (stored)."""
    behaviours = {
        name: Serve(data, last_modified="Wed, 21 Oct 2015 07:28:00 GMT")
        for name, data in DATED.items()
    }
    mirror = await make_mirror(DATED, behaviours)
    out = tmp_path / "mirror"
    args = ("-m", "-np", "-nH", "--cut-dirs=1", "-e", "robots=off", "-P", str(out))
    code, _, log = await run_wget(*args, mirror.base_url)
    assert code == 0, log.decode()
    for name, data in DATED.items():
        assert (out / name).read_bytes() == data
        assert await mirror.stored_soon(name)
    code, _, log = await run_wget(*args, mirror.base_url)
    assert code == 0, log.decode()
    saved = re.findall(r"[\u2018'](\S+)[\u2019'] saved", log.decode())
    assert saved, log.decode()  # the listings (no Last-Modified) are fetched again
    again = [name for name in saved if not name.endswith("index.html")]
    assert again == [], f"wget -m fetched unchanged files again: {again}"
