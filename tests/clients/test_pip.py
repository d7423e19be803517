"""pip against ``twistd -n streamer``: a pure-Python wheel built here, synced ``on_demand``
by ``streamer sync``, found through the HTML listing (``--find-links``), downloaded and
installed; fetched upstream once, then served from the store. A ``#sha256=`` fragment is
checked by pip: the right hash passes, a wrong one is refused."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest_twisted

from tests.clients.mirror import client_env, sha256
from tests.integration.test_end_to_end import (
    artifact_path,
    streamer_cli,
    write_config,
)
from tests.support.clients import ProcessResult, run_process
from tests.support.faults import Serve
from tests.support.twistd import twistd
from tests.support.upstream import UpstreamServer

NAME, VERSION = "tinypkg", "1.0"
WHEEL = f"{NAME}-{VERSION}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel(path: Path) -> bytes:
    """Write a minimal valid pure-Python wheel (PEP 427) to *path*; return its bytes."""
    info = f"{NAME}-{VERSION}.dist-info"
    members = {
        f"{NAME}/__init__.py": b"ANSWER = 42\n",
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
            "Summary: a wheel made by a test\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests.clients\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in members.items())
    members[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in members.items():
            wheel.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    return path.read_bytes()


def pip(*args: str) -> ProcessResult:
    """``python -m pip ARGS`` isolated from any user/site pip configuration and cache."""
    return run_process(
        sys.executable,
        "-m",
        "pip",
        "--isolated",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        *args,
        timeout=60,
        env=client_env(),
    )


@pytest_twisted.ensureDeferred
async def test_pip_finds_downloads_and_installs_a_lazy_wheel(tmp_path, upstream: UpstreamServer):
    wheel = build_wheel(tmp_path / WHEEL)
    other = b"not a package\n"
    upstream.register(f"/repo/{WHEEL}", Serve(wheel, content_type="application/zip"))
    upstream.register("/repo/README.txt", Serve(other))
    manifest = f"{WHEEL},{sha256(wheel)},{len(wheel)}\nREADME.txt,{sha256(other)},{len(other)}\n"
    upstream.register("/repo/PULP_MANIFEST", Serve(manifest.encode()))
    config = write_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"))
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    stored = artifact_path(tmp_path / "var", wheel)

    def gets() -> int:
        return sum(r.method == "GET" for r in upstream.requests(f"/repo/{WHEEL}"))

    async with twistd(config) as served:
        links = f"{served.base}/demo/"
        wheel_url = f"{links}{WHEEL}"
        assert not stored.exists()

        code, out, err = await pip(
            "download", "--no-index", "--find-links", links, "-d", str(tmp_path / "dl"), NAME
        )
        assert code == 0, (out + err).decode()
        assert (tmp_path / "dl" / WHEEL).read_bytes() == wheel
        assert gets() == 1

        target = tmp_path / "site"
        code, out, err = await pip(
            "install", "--no-index", "--find-links", links, "--target", str(target), NAME
        )
        assert code == 0, (out + err).decode()
        assert (target / NAME / "__init__.py").read_bytes() == b"ANSWER = 42\n"
        assert (target / f"{NAME}-{VERSION}.dist-info" / "METADATA").exists()
        assert gets() == 1, "the second pip run must be served from the store"
        assert stored.exists() and stored.read_bytes() == wheel

        good = f"{wheel_url}#sha256={sha256(wheel)}"
        code, out, err = await pip("download", "--no-deps", "-d", str(tmp_path / "ok"), good)
        assert code == 0, (out + err).decode()
        assert (tmp_path / "ok" / WHEEL).read_bytes() == wheel

        bad = f"{wheel_url}#sha256={sha256(b'something else')}"
        code, out, err = await pip("download", "--no-deps", "-d", str(tmp_path / "bad"), bad)
        assert code != 0, (out + err).decode()
        assert b"DO NOT MATCH THE HASHES" in err, (out + err).decode()
        assert not (tmp_path / "bad" / WHEEL).exists()
        assert gets() == 1
        exit_code = await served.stop()
    assert exit_code == 0, served.output
    assert "Traceback" not in served.output


@pytest_twisted.ensureDeferred
async def test_pip_uses_a_mirrored_simple_index(make_mirror, tmp_path):
    """A PEP 503 "simple" index mirrored lazily: ``/simple/tinypkg/`` serves the catalogued
    ``index.html`` (cold, then warm), whose hashed link leads to the lazy wheel."""
    wheel = build_wheel(tmp_path / WHEEL)
    page = (
        "<!DOCTYPE html><html><body>"
        f'<a href="../../packages/{WHEEL}#sha256={sha256(wheel)}">{WHEEL}</a>'
        "</body></html>\n"
    ).encode()
    files = {f"simple/{NAME}/index.html": page, f"packages/{WHEEL}": wheel}
    behaviours = {f"simple/{NAME}/index.html": Serve(page, content_type="text/html")}
    mirror = await make_mirror(files, behaviours)
    index = mirror.url("simple/")
    for attempt in ("cold", "warm"):
        folder = tmp_path / attempt
        code, out, err = await pip("download", "--index-url", index, "-d", str(folder), NAME)
        assert code == 0, (attempt, (out + err).decode())
        assert (folder / WHEEL).read_bytes() == wheel
        assert await mirror.stored_soon(f"packages/{WHEEL}")
        assert await mirror.stored_soon(f"simple/{NAME}/index.html")
    assert mirror.upstream_gets(f"packages/{WHEEL}") == 1
    assert mirror.upstream_gets(f"simple/{NAME}/index.html") == 1
