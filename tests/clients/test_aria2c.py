"""aria2c against the streamer: a segmented download (several concurrent Range requests) of
one cold artifact, and many small cold files at once. Each upstream file is fetched exactly
once, every byte is right, and every artifact ends up stored."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import task

from tests.clients.mirror import sha256
from tests.support.clients import run_aria2c, run_curl, run_wget
from tests.support.faults import Trickle

MiB = 1024 * 1024
BIG = os.urandom(8 * MiB + 4321)
QUIET = ("--console-log-level=warn", "--summary-interval=0", "--file-allocation=none")


@pytest_twisted.ensureDeferred
async def test_segmented_download_of_a_cold_file(make_mirror, tmp_path):
    # ~1.5 s upstream, so aria2c's extra connections join while the download is in flight.
    slow = Trickle(BIG, bytes_per_sec=6 * MiB, interval=0.05)
    mirror = await make_mirror({"big.iso": BIG}, {"big.iso": slow})
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], mirror.env.in_flight_requests())

    sampler = task.LoopingCall(sample)
    sampler.start(0.02)
    try:
        code, out, err = await run_aria2c(
            *QUIET,
            "-x",
            "4",
            "-s",
            "4",
            "-k",
            "1M",
            f"--checksum=sha-256={sha256(BIG)}",
            "-d",
            str(tmp_path),
            "-o",
            "big.iso",
            mirror.url("big.iso"),
            timeout=30,
        )
    finally:
        sampler.stop()
    assert code == 0, (out + err).decode()
    assert (tmp_path / "big.iso").read_bytes() == BIG
    assert peak[0] >= 2, "aria2c never had two requests in flight: the test proves nothing"
    assert mirror.upstream_requests("big.iso") == ["GET"]
    assert await mirror.stored_soon("big.iso")
    assert mirror.stored_bytes("big.iso") == BIG
    assert mirror.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_many_small_cold_files_from_an_input_file(make_mirror, tmp_path):
    files = {f"small/f{i:02d}.bin": os.urandom(1000 + 517 * i) for i in range(40)}
    mirror = await make_mirror(files)
    lines = []
    for name, data in files.items():
        lines += [mirror.url(name), f"  out={name}", f"  checksum=sha-256={sha256(data)}"]
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    code, out, err = await run_aria2c(
        *QUIET, "-j", "10", "-i", str(urls), "-d", str(out_dir), timeout=30
    )
    assert code == 0, (out + err).decode()
    for name, data in files.items():
        assert (out_dir / name).read_bytes() == data, name
        assert mirror.upstream_gets(name) == 1, name
        assert await mirror.stored_soon(name), name


@pytest_twisted.ensureDeferred
async def test_mixed_clients_at_once_on_one_cold_file(make_mirror, tmp_path):
    """aria2c (4 segments), curl (whole, a tail range, a resume) and wget -c, all started
    together on one cold artifact: one upstream GET, everyone gets the right bytes."""
    slow = Trickle(BIG, bytes_per_sec=8 * MiB, interval=0.05)
    mirror = await make_mirror({"big.iso": BIG}, {"big.iso": slow})
    url = mirror.url("big.iso")
    (tmp_path / "resume.part").write_bytes(BIG[: 3 * MiB])
    wget_dir = tmp_path / "w"
    wget_dir.mkdir()
    (wget_dir / "big.iso").write_bytes(BIG[: 5 * MiB])
    runs = [
        run_aria2c(
            *QUIET, "-x", "4", "-s", "4", "-k", "1M", "-d", str(tmp_path), "-o", "a.iso", url
        ),
        run_curl("-f", "-o", str(tmp_path / "whole"), url),
        run_curl("-f", "-r", f"{7 * MiB}-", "-o", str(tmp_path / "tail"), url),
        run_curl("-f", "-C", "-", "-o", str(tmp_path / "resume.part"), url),
        run_wget("-q", "-c", "-P", str(wget_dir), url),
    ]
    results = [await run for run in runs]
    for (code, out, err), name in zip(
        results, ["aria2c", "curl", "tail", "resume", "wget"], strict=True
    ):
        assert code == 0, (name, (out + err).decode())
    assert (tmp_path / "a.iso").read_bytes() == BIG
    assert (tmp_path / "whole").read_bytes() == BIG
    assert (tmp_path / "tail").read_bytes() == BIG[7 * MiB :]
    assert (tmp_path / "resume.part").read_bytes() == BIG
    assert (wget_dir / "big.iso").read_bytes() == BIG
    assert mirror.upstream_requests("big.iso") == ["GET"]
    assert await mirror.stored_soon("big.iso")
