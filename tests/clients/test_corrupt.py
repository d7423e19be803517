"""A corrupt upstream file (right size, wrong sha256) seen through real clients: none of
them may end up with a complete-looking file, nothing is stored, and pip installs nothing."""

from __future__ import annotations

import os

import pytest_twisted

from tests.support.clients import run_aria2c, run_curl, run_wget
from tests.support.faults import WrongBytes

MiB = 1024 * 1024
BODY = os.urandom(MiB)


@pytest_twisted.ensureDeferred
async def test_curl_wget_aria2c_never_see_a_bad_body_as_complete(make_mirror, tmp_path):
    names = ["c.bin", "w.bin", "a.bin"]
    files = {name: BODY + name.encode() for name in names}
    mirror = await make_mirror(files, {name: WrongBytes(files[name]) for name in names})

    code, _, err = await run_curl("-f", "-o", str(tmp_path / "c.bin"), mirror.url("c.bin"))
    assert code != 0, "curl took a corrupt body for complete"
    assert (tmp_path / "c.bin").read_bytes() != files["c.bin"]

    code, _, err = await run_wget("-q", "-P", str(tmp_path / "w"), mirror.url("w.bin"))
    assert code != 0, "wget took a corrupt body for complete"

    code, out, err = await run_aria2c(
        "--console-log-level=warn", "-d", str(tmp_path / "a"), mirror.url("a.bin")
    )
    assert code != 0, "aria2c took a corrupt body for complete"
    assert not (tmp_path / "a" / "a.bin").exists() or (tmp_path / "a" / "a.bin.aria2").exists()

    for name in names:
        assert not mirror.is_stored(name), name
        # A second attempt is refused or fetched again: never a bad body marked complete.
        code, body, _ = await run_curl("-f", mirror.url(name))
        assert code != 0 or body == files[name], name
    assert mirror.temp_files() == []
