"""``streamer fetch`` as installed: where the bytes go without ``-o`` (the url's file name, as
``curl -O`` and ``wget`` do) and with ``-o -`` (standard output), that nothing else is left
behind (not even in the temporary folder), and that bad --sha256 / --size are refused in one
line before anything is fetched."""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from tests.clients.mirror import client_env, sha256
from tests.clients.test_console import run
from tests.support.faults import Serve

DATA = os.urandom(150_000)


@pytest.fixture
def folders(tmp_path):
    """``(work, temp)``: the folder the command runs in, and its TMPDIR."""
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    return work, temp


def fetch(folders, *argv: str):
    work, temp = folders
    return run(work, "streamer", "fetch", *argv, env=client_env() | {"TMPDIR": str(temp)})


@pytest_twisted.ensureDeferred
async def test_without_output_the_urls_file_name_is_written_and_nothing_else(folders, upstream):
    url = upstream.register("/pub/data.bin", Serve(DATA))
    code, out, err = await fetch(folders, url + "?token=x", "--sha256", sha256(DATA))
    assert code == 0, err
    assert out.decode().splitlines() == [
        f"size: {len(DATA)}",
        f"sha256: {sha256(DATA)}",
        "written: data.bin",
    ]
    work, temp = folders
    assert os.listdir(work) == ["data.bin"] and (work / "data.bin").read_bytes() == DATA
    assert os.listdir(temp) == []


@pytest_twisted.ensureDeferred
async def test_without_output_an_existing_file_is_never_replaced(folders, upstream):
    url = upstream.register("/pub/data.bin", Serve(DATA))
    work, temp = folders
    (work / "data.bin").write_bytes(b"mine")
    code, out, err = await fetch(folders, url)
    assert (code, out) == (2, b"")
    assert err.decode() == "error: data.bin exists: give -o data.bin to replace it\n"
    assert (work / "data.bin").read_bytes() == b"mine"
    assert upstream.requests("/pub/data.bin") == []
    code, out, err = await fetch(folders, upstream.url("/pub/"))
    assert code == 2 and err.decode().count("\n") == 1 and "names no file" in err.decode()
    (work / "folder").mkdir()
    code, out, err = await fetch(folders, url, "-o", "folder")
    assert (code, err.decode()) == (2, "error: 'folder' is a folder: give -o a file name\n")
    assert os.listdir(work / "folder") == [] and os.listdir(temp) == []


@pytest.mark.parametrize("output", [[], ["-o", "-"]], ids=["no-output", "stdout"])
@pytest_twisted.ensureDeferred
async def test_a_failed_fetch_leaves_nothing_anywhere(folders, upstream, output):
    url = upstream.register("/pub/data.bin", Serve(DATA))
    code, out, err = await fetch(folders, url, "--sha256", sha256(b"other"), *output)
    assert (code, out) == (1, b""), err
    assert err.decode().startswith("error: fetch failed: sha256 mismatch")
    assert err.decode().count("\n") == 1
    work, temp = folders
    assert os.listdir(work) == [] and os.listdir(temp) == []


@pytest_twisted.ensureDeferred
async def test_output_dash_writes_the_validated_bytes_to_stdout(folders, upstream):
    url = upstream.register("/pub/data.bin", Serve(DATA))
    code, out, err = await fetch(folders, url, "--size", str(len(DATA)), "-o", "-")
    assert code == 0, err
    assert out == DATA
    assert err.decode().splitlines() == [
        f"size: {len(DATA)}",
        f"sha256: {sha256(DATA)}",
        "written: standard output",
    ]
    work, temp = folders
    assert os.listdir(work) == [] and os.listdir(temp) == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--sha256", "xyz"),
        ("--sha256", "0" * 63),
        ("--sha256", "0" * 65),
        ("--sha256", "g" * 64),
        ("--size", "-1"),
        ("--size", "abc"),
        ("--size", "1.5"),
        ("--size", "\u0661\u0662"),  # Arabic-Indic digits: int() takes them, we do not
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_sha256_or_size_is_refused_in_one_line(folders, upstream, option, value):
    url = upstream.register("/pub/data.bin", Serve(DATA))
    code, out, err = await fetch(folders, url, option, value, "-o", "out.bin")
    assert (code, out) == (2, b"")
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"streamer: {option}: must be "), lines
    assert upstream.requests("/pub/data.bin") == []
    assert os.listdir(folders[0]) == []
