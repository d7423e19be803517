"""The console names users type, exactly as DESIGN.md lists them: ``streamer`` and its
subcommands, and ``twistd streamer``, run as installed (the console script and the twistd
dropin on PATH), from a folder outside the source tree."""

from __future__ import annotations

import os
import re
import time

import pytest
import pytest_twisted

from tests.clients.mirror import client_env, sha256
from tests.support.clients import ProcessResult, run_process
from tests.support.faults import Serve
from tests.support.upstream import UpstreamServer

OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
DATA = os.urandom(200_000)


def run(folder, *argv: str, env: dict[str, str] | None = None) -> ProcessResult:
    """Run an installed console command in *folder* (not the source tree)."""
    environment = client_env() if env is None else env
    return run_process("env", "-C", str(folder), *argv, timeout=30, env=environment)


def options_in(help_text: bytes) -> set[str]:
    """The ``-x`` / ``--long`` options a help text declares in its option table (the first
    column of indented lines starting with ``-``; prose is not counted)."""
    found: set[str] = set()
    for line in help_text.decode().splitlines():
        stripped = line.lstrip()
        if line.startswith("  ") and stripped.startswith("-"):
            found.update(OPTION.findall(re.split(r"\s{2,}", stripped, maxsplit=1)[0]))
    return found


# argv, and the options DESIGN.md names for it (plus -h/--help and the aliases shown).
HELP_CASES = {
    "streamer": (("streamer", "--help"), {"--config", "-c"}),
    "sync": (("streamer", "sync", "--help"), set()),
    "fetch": (("streamer", "fetch", "--help"), {"--sha256", "--size", "-o", "--output"}),
    "verify": (("streamer", "verify", "--help"), set()),
    "sign": (("streamer", "sign", "--help"), {"--expires"}),
}


@pytest.mark.parametrize("case", list(HELP_CASES))
@pytest_twisted.ensureDeferred
async def test_streamer_help_names_the_documented_options(case, tmp_path):
    argv, expected = HELP_CASES[case]
    code, out, err = await run(tmp_path, *argv)
    assert code == 0, err
    assert out.startswith(b"usage: streamer"), out
    assert options_in(out) == expected | {"-h", "--help"}, out.decode()
    if case == "streamer":
        for command in (b"sync", b"fetch", b"verify", b"sign"):
            assert command in out


@pytest_twisted.ensureDeferred
async def test_twistd_streamer_help_names_config_and_listen(tmp_path):
    code, out, err = await run(tmp_path, "twistd", "streamer", "--help")
    assert code == 0, err
    assert b"streamer [--config FILE] [--listen ENDPOINT]" in out
    assert options_in(out) == {"--config", "--listen", "-c", "-l", "--help", "--version"}
    assert b"STREAMER_CONFIG" in out


@pytest.fixture
def published(upstream: UpstreamServer) -> str:
    return upstream.register("/pub/data.bin", Serve(DATA))


@pytest_twisted.ensureDeferred
async def test_fetch_validates_and_writes_the_file(tmp_path, published, upstream):
    target = tmp_path / "out" / "data.bin"
    target.parent.mkdir()
    code, out, err = await run(
        tmp_path,
        "streamer", "fetch", published,
        "--sha256", sha256(DATA), "--size", str(len(DATA)), "-o", str(target),
    )  # fmt: skip
    assert code == 0, err
    assert target.read_bytes() == DATA
    assert sha256(DATA).encode() in out
    assert os.listdir(target.parent) == ["data.bin"]
    assert [r.method for r in upstream.requests("/pub/data.bin")] == ["GET"]


@pytest.mark.parametrize(
    "wrong",
    [("--sha256", sha256(b"other")), ("--size", str(len(DATA) + 1))],
    ids=["sha256", "size"],
)
@pytest_twisted.ensureDeferred
async def test_fetch_with_a_wrong_digest_fails_cleanly(wrong, tmp_path, published):
    target = tmp_path / "out" / "data.bin"
    target.parent.mkdir()
    code, out, err = await run(tmp_path, "streamer", "fetch", published, *wrong, "-o", str(target))
    assert code == 1, (out + err).decode()
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err.decode()
    assert lines[0].startswith("error:") and wrong[0].lstrip("-") in lines[0], lines
    assert "Traceback" not in err.decode()
    assert os.listdir(target.parent) == [], "no output (or partial) file may be left"


@pytest_twisted.ensureDeferred
async def test_config_first_sync_verify_and_sign(tmp_path, upstream):
    upstream.register("/repo/data.bin", Serve(DATA))
    manifest = f"data.bin,{sha256(DATA)},{len(DATA)}\n".encode()
    upstream.register("/repo/PULP_MANIFEST", Serve(manifest))
    (tmp_path / "key").write_bytes(b"k" * 32)
    config = tmp_path / "streamer.toml"
    config.write_text(
        '[storage]\npath = "var"\n[security]\nsigning_key_file = "key"\n'
        f'[[remotes]]\nname = "demo"\nurl = "{upstream.url("/repo/PULP_MANIFEST")}"\n'
        'policy = "immediate"\n'
    )
    code, out, err = await run(tmp_path, "streamer", "--config", str(config), "sync", "demo")
    assert code == 0, (out + err).decode()
    assert (tmp_path / "var" / "artifacts" / sha256(DATA)[:2] / sha256(DATA)[2:]).exists()

    # STREAMER_CONFIG stands in for --config.
    env = {**client_env(), "STREAMER_CONFIG": str(config)}
    code, out, err = await run(tmp_path, "streamer", "verify", env=env)
    assert code == 0, (out + err).decode()
    assert b"1 good, 0 bad" in out

    before = time.time()
    code, out, err = await run(
        tmp_path, "streamer", "--config", str(config), "sign", "/demo/data.bin", "--expires", "60"
    )
    assert code == 0, err
    match = re.fullmatch(rb"/demo/data\.bin\?expires=(\d+)&signature=([0-9a-f]{64})\n", out)
    assert match, out
    assert before + 55 <= int(match[1]) <= time.time() + 65
