"""End to end: the real ``streamer`` commands and ``twistd -n streamer`` in child processes,
real curl, real upstreams on loopback (``python -m http.server`` or the scriptable
UpstreamServer), data in tmp_path.

Child processes run through reactor.spawnProcess / getProcessOutputAndValue, so the in-process
upstream keeps serving while the streamer and curl talk to it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.http import Request
from twisted.web.server import NOT_DONE_YET

from streamer.claims import CLAIMS_FOLDER, LOCKS_FILE
from tests.support.clients import free_port
from tests.support.faults import Behaviour, Generated, StallMidBody, call_later, is_gone
from tests.support.polling import until
from tests.support.twistd import STREAMER, Collect, child_env, twistd
from tests.support.upstream import UpstreamServer

MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_repo(folder: Path, files: dict[str, bytes]) -> None:
    """Write *files* under *folder* and their PULP_MANIFEST (path,sha256,size lines)."""
    lines = []
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        lines.append(f"{name},{sha256(data)},{len(data)}\n")
    (folder / "PULP_MANIFEST").write_text("".join(lines))


def write_config(
    folder: Path,
    manifest_url: str,
    policy: str = "on_demand",
    extra: str = "",
    grace_period: float = 1,
) -> Path:
    """A streamer.toml in *folder*: storage in ./var, one remote "demo" at *manifest_url*."""
    path = folder / "streamer.toml"
    path.write_text(
        f"[server]\ngrace_period = {grace_period}\n"
        '[storage]\npath = "var"\n'
        f"{extra}"
        f'[[remotes]]\nname = "demo"\nurl = "{manifest_url}"\npolicy = "{policy}"\n'
    )
    return path


def artifact_path(storage: Path, data: bytes) -> Path:
    digest = sha256(data)
    return storage / "artifacts" / digest[:2] / digest[2:]


def artifacts(storage: Path) -> Iterator[Path]:
    folder = storage / "artifacts"
    return (p for p in folder.rglob("*") if p.is_file()) if folder.exists() else iter(())


def assert_store_valid(storage: Path) -> int:
    """Every file under artifacts/ hashes to its name; returns how many there are."""
    count = 0
    for path in artifacts(storage):
        name = path.parent.name + path.name
        assert sha256(path.read_bytes()) == name, f"{path} does not hash to its name"
        count += 1
    return count


def temp_files(storage: Path) -> list[Path]:
    """Every file under tmp/ but the claims' locks file (made once, never removed: not a
    temp file but the place every process and node locks its downloads in)."""
    folder = storage / "tmp"
    locks = folder / CLAIMS_FOLDER / LOCKS_FILE
    return [p for p in folder.rglob("*") if p.is_file() and p != locks] if folder.exists() else []


async def streamer_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """Run ``streamer --config CONFIG ARGS``; (exit code, stdout, stderr)."""
    argv = [*STREAMER, "--config", str(config), *args]
    out, err, code = await getProcessOutputAndValue(
        argv[0], argv[1:], env=child_env(), path=str(config.parent)
    )
    return code, out.decode(), err.decode()


async def wait_for(check, what: str, timeout: float = 10.0, output=lambda: b"") -> None:
    """Poll the async *check* (a refused connection counts as "not yet")."""
    await until(check, timeout, what=what, output=output, errors=(Exception,))


async def answers(url: str) -> bool:
    response = await treq.get(url, persistent=False)
    await treq.content(response)
    return response.code == 200


@asynccontextmanager
async def http_server(folder: Path) -> AsyncIterator[Collect]:
    """``python -m http.server PORT --bind 127.0.0.1`` serving *folder*; its log in .output
    (one line per request) and its port in .port."""
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proto = Collect()
    process = reactor.spawnProcess(proto, argv[0], argv, env=child_env(), path=str(folder))
    proto.port = port
    try:
        await wait_for(
            lambda: answers(f"http://127.0.0.1:{port}/PULP_MANIFEST"),
            "http.server answering",
            output=lambda: proto.output,
        )
        yield proto
    finally:
        if not proto.ended.called:
            process.signalProcess("TERM")
        await proto.ended


def headers_of(dump: bytes) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of the last response in a ``curl -D -`` dump."""
    block = dump.replace(b"\r\n", b"\n").strip().split(b"\n\n")[-1].decode("latin-1")
    status_line, *lines = block.split("\n")
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in fields.items()}


# -- the quickstart, as a test -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_on_demand_miss_then_hit_listing_head_and_ranges(tmp_path):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    hello, blob, deep = b"hello mirror\n", os.urandom(MiB), b"deep down\n"
    write_repo(upstream, {"hello.txt": hello, "blob.bin": blob, "sub/deep.txt": deep})
    storage = tmp_path / "var"
    async with http_server(upstream) as origin:
        config = write_config(tmp_path, f"http://127.0.0.1:{origin.port}/PULP_MANIFEST")
        code, out, err = await streamer_cli(config, "sync")
        assert code == 0, out + err
        assert "3 recorded lazily" in out and "0 failed" in out
        assert list(artifacts(storage)) == []

        async with twistd(config) as served:
            before = await served.metrics()
            code, body, err = await served.curl("/demo/hello.txt")
            assert (code, body) == (0, hello), err
            misses = before["streamer_cache_misses_total"] + 1
            after_miss = await served.metrics_when(
                lambda m: m["streamer_cache_misses_total"] == misses
            )
            await stored_soon(storage, hello)

            code, body, err = await served.curl("/demo/hello.txt")
            assert (code, body) == (0, hello), err
            hits = after_miss["streamer_cache_hits_total"] + 1
            after_hit = await served.metrics_when(lambda m: m["streamer_cache_hits_total"] == hits)
            assert (
                after_hit["streamer_cache_misses_total"]
                == after_miss["streamer_cache_misses_total"]
            )
            assert origin.output.count(b"GET /hello.txt ") == 1

            code, body, err = await served.curl("/demo/")
            assert code == 0, err
            assert b'href="hello.txt"' in body and b'href="blob.bin"' in body
            assert b'href="sub/"' in body

            # HEAD of cold content: the catalog's size, and no body fetched upstream.
            code, dump, err = await served.curl("/demo/blob.bin", "-I")
            assert code == 0, err
            status, headers = headers_of(dump)
            assert (status, headers["content-length"]) == (200, str(MiB))
            assert b"GET /blob.bin " not in origin.output

            # A Range request on cold content: the right slice, and the whole file stored.
            code, dump, err = await served.curl(
                "/demo/blob.bin", "-r", "1000-1999", "-D", "-", "-o", str(tmp_path / "part")
            )
            assert code == 0, err
            status, headers = headers_of(dump)
            assert status == 206 and headers["content-range"] == f"bytes 1000-1999/{MiB}"
            assert (tmp_path / "part").read_bytes() == blob[1000:2000]
            await stored_soon(storage, blob)

            # A Range request on stored content.
            code, body, err = await served.curl("/demo/sub/deep.txt")
            assert (code, body) == (0, deep), err
            await stored_soon(storage, deep)
            code, dump, err = await served.curl(
                "/demo/sub/deep.txt", "-r", "-5", "-D", "-", "-o", str(tmp_path / "tail")
            )
            assert code == 0, err
            status, headers = headers_of(dump)
            assert status == 206 and (tmp_path / "tail").read_bytes() == deep[-5:]

            exit_code = await served.stop()
        assert exit_code == 0, served.output
    assert "Traceback" not in served.output
    assert temp_files(storage) == []
    assert assert_store_valid(storage) == 3


async def _async(value: bool) -> bool:
    return value


def size_at_least(path: Path, size: int):
    """An async check for `wait_for`: *path* exists and holds at least *size* bytes."""
    return lambda: _async(path.exists() and path.stat().st_size >= size)


async def stored_soon(storage: Path, data: bytes) -> None:
    """Wait until *data* is committed to storage (that follows the response by a moment)."""
    path = artifact_path(storage, data)
    await wait_for(lambda: _async(path.exists()), f"{path.name} stored")
    assert path.read_bytes() == data


# -- SIGTERM mid-download -------------------------------------------------------------------


@attrs.frozen
class Throttled(Behaviour):
    """*body*'s bytes at one block per *interval* seconds (a download that takes a while)."""

    body: Generated
    interval: float = 0.01

    def render(self, request: Request) -> object:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % self.body.size)
        if request.method == b"HEAD":
            return b""
        call_later(request, 0, self._tick, request, self.body.chunks())
        return NOT_DONE_YET

    def _tick(self, request: Request, chunks: Iterator[bytes]) -> None:
        if is_gone(request):
            return
        block = next(chunks, None)
        if block is None:
            request.finish()
            return
        request.write(block)
        call_later(request, self.interval, self._tick, request, chunks)


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_download_exits_cleanly_and_keeps_the_store_valid(
    tmp_path, upstream: UpstreamServer
):
    big = Generated(200 * MiB)  # at 64 KiB per 10 ms: ~30 s, far longer than the test
    small = b"small and whole\n"
    upstream.register("/repo/small.txt", _Bytes(small))
    upstream.register("/repo/big.bin", Throttled(big))
    manifest = f"small.txt,{sha256(small)},{len(small)}\nbig.bin,{big.sha256()},{big.size}\n"
    upstream.register("/repo/PULP_MANIFEST", _Bytes(manifest.encode()))
    storage = tmp_path / "var"
    config = write_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"))
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err

    async with twistd(config) as served:
        code, body, err = await served.curl("/demo/small.txt")
        assert (code, body) == (0, small), err
        partial = tmp_path / "big.part"
        download = served.curl("/demo/big.bin", "-o", str(partial))
        await wait_for(
            size_at_least(partial, MiB),
            "1 MiB of big.bin at the client",
            output=lambda: served.proto.output,
        )
        assert temp_files(storage), "the lazy download should be teeing into tmp/"
        exit_code = await served.stop()
        curl_code, _, _ = await download
    assert exit_code == 0, served.output
    assert "Traceback" not in served.output
    assert curl_code != 0, "the cut-off transfer must not look complete to curl"
    assert partial.stat().st_size < big.size
    assert temp_files(storage) == []
    assert assert_store_valid(storage) == 1
    assert artifact_path(storage, small).exists()
    assert not (storage / "artifacts" / big.sha256()[:2] / big.sha256()[2:]).exists()
    code, out, err = await streamer_cli(config, "verify")
    assert code == 0, out + err
    assert "1 good, 0 bad" in out


@attrs.frozen
class _Bytes(Behaviour):
    """A plain 200 with *data* (HEAD: headers only)."""

    data: bytes

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % len(self.data))
        return b"" if request.method == b"HEAD" else self.data


# -- immediate sync, then serving from the store only ---------------------------------------

FILES = {"a.txt": b"alpha\n", "pkg/b.bin": os.urandom(300_000), "pkg/c.txt": b"gamma\n" * 100}


async def immediate_sync(tmp_path: Path, upstream: UpstreamServer) -> Path:
    folder = tmp_path / "upstream"
    folder.mkdir()
    write_repo(folder, FILES)
    upstream.serve_tree("/repo", folder)
    config = write_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"), policy="immediate")
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    assert f"{len(FILES)} downloaded" in out
    for data in FILES.values():
        assert artifact_path(tmp_path / "var", data).read_bytes() == data
    return config


@pytest_twisted.ensureDeferred
async def test_immediate_sync_then_serving_makes_no_upstream_request(
    tmp_path, upstream: UpstreamServer
):
    config = await immediate_sync(tmp_path, upstream)
    upstream.clear_log()
    async with twistd(config) as served:
        for name, data in FILES.items():
            code, body, err = await served.curl(f"/demo/{name}")
            assert (code, body) == (0, data), err
            code, dump, err = await served.curl(f"/demo/{name}", "-I")
            assert headers_of(dump)[1]["content-length"] == str(len(data))
        code, body, _ = await served.curl("/demo/pkg/")
        assert b'href="b.bin"' in body and b'href="c.txt"' in body
        metrics = await served.metrics_when(lambda m: m["streamer_cache_hits_total"] >= len(FILES))
        assert metrics["streamer_cache_misses_total"] == 0
        assert await served.stop() == 0, served.output
    assert upstream.all_requests() == []


# -- verify ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_verify_moves_a_corrupted_artifact_aside_and_it_is_fetched_again(
    tmp_path, upstream: UpstreamServer
):
    config = await immediate_sync(tmp_path, upstream)
    storage = tmp_path / "var"
    victim = FILES["pkg/b.bin"]
    path = artifact_path(storage, victim)
    path.write_bytes(b"bit rot" + victim[7:])
    code, out, err = await streamer_cli(config, "verify")
    assert code == 1, out + err
    assert f"BAD {sha256(victim)}" in out and "2 good, 1 bad" in out
    assert not path.exists()
    assert len(list((storage / "quarantine").iterdir())) == 1
    assert assert_store_valid(storage) == 2

    # The catalog forgot it was stored: the next request fetches it again, whole and valid.
    upstream.clear_log()
    async with twistd(config) as served:
        code, body, err = await served.curl("/demo/pkg/b.bin")
        assert (code, body) == (0, victim), err
        await stored_soon(storage, victim)
        assert await served.stop() == 0, served.output
    assert len(upstream.requests("/repo/pkg/b.bin")) == 1
    code, out, err = await streamer_cli(config, "verify")
    assert code == 0 and "3 good, 0 bad" in out, out + err


# -- signed URLs -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_signed_urls_from_streamer_sign_are_accepted_and_tampered_ones_refused(
    tmp_path, upstream: UpstreamServer
):
    folder = tmp_path / "upstream"
    folder.mkdir()
    data = b"signed content\n"
    write_repo(folder, {"s.txt": data, "other.txt": b"other\n"})
    upstream.serve_tree("/repo", folder)
    (tmp_path / "signing.key").write_bytes(os.urandom(32).hex().encode())
    config = write_config(
        tmp_path,
        upstream.url("/repo/PULP_MANIFEST"),
        extra='[security]\nsigning_key_file = "signing.key"\n',
    )
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    code, signed, err = await streamer_cli(config, "sign", "/demo/s.txt", "--expires", "60")
    assert code == 0, err
    signed = signed.strip()
    path, _, query = signed.partition("?")
    assert path == "/demo/s.txt" and "signature=" in query and "expires=" in query
    code, again, err = await streamer_cli(config, "sign", "/demo/s.txt", "--expires", "120")
    assert code == 0 and again.strip() != signed, err

    async with twistd(config) as served:
        status = ["-o", "/dev/null", "-w", "%{http_code}"]
        assert await served.curl(signed) == (0, data, b"")
        # Another valid signature for the same path is a hit: the query is not in the cache key.
        assert await served.curl(again.strip()) == (0, data, b"")
        await served.metrics_when(lambda m: m["streamer_cache_hits_total"] == 1)

        digest = query.rsplit("signature=", 1)[1][:64]
        flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")
        tampered = signed.replace(digest, flipped)
        assert (await served.curl(tampered, *status))[1] == b"403"
        assert (await served.curl("/demo/s.txt", *status))[1] == b"403"
        other = signed.replace("/demo/s.txt", "/demo/other.txt")
        assert (await served.curl(other, *status))[1] == b"403"
        assert (await served.curl("/metrics", *status))[1] == b"200"
        assert await served.stop() == 0, served.output
    assert len(upstream.requests("/repo/s.txt")) == 1
    assert upstream.requests("/repo/other.txt") == []


# -- a validated download completing during the grace period -------------------------------


@attrs.define
class HoldLastBlock(Behaviour):
    """*body* at full speed except its last block, which waits for ``release()``."""

    body: Generated
    _held: list[tuple[Request, bytes]] = attrs.field(factory=list)

    def render(self, request: Request) -> object:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % self.body.size)
        blocks = list(self.body.chunks())
        for block in blocks[:-1]:
            request.write(block)
        self._held.append((request, blocks[-1]))
        return NOT_DONE_YET

    def release(self) -> None:
        held, self._held = self._held, []
        for request, block in held:
            if not is_gone(request):
                request.write(block)
                request.finish()


@pytest_twisted.ensureDeferred
async def test_a_download_completing_during_the_grace_period_is_stored(
    tmp_path, upstream: UpstreamServer
):
    """SIGTERM while a lazy download is in flight; it completes within the grace period and
    its client gets the whole file: the validated download must be committed too, not have
    its temp file deleted by the shutdown while the commit (fsync, rename) is under way.

    The commit runs in a thread, so whether shutdown overtakes it is a race: three rounds
    make a lost commit show up on (nearly) every run."""
    body = Generated(64 * MiB)  # its fsync takes a while
    manifest = f"f.bin,{body.sha256()},{body.size}\n"
    upstream.register("/repo/PULP_MANIFEST", _Bytes(manifest.encode()))
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        behaviour = HoldLastBlock(body)
        upstream.register("/repo/f.bin", behaviour)
        storage = folder / "var"
        config = write_config(folder, upstream.url("/repo/PULP_MANIFEST"), grace_period=10)
        code, out, err = await streamer_cli(config, "sync")
        assert code == 0, out + err
        received = folder / "f.bin"
        async with twistd(config) as served:
            download = served.curl("/demo/f.bin", "-o", str(received))
            await wait_for(
                size_at_least(received, body.size - MiB),
                "all but the last block at the client",
                output=lambda: served.proto.output,
            )
            served.process.signalProcess("TERM")
            await wait_for(
                lambda: _async(b"SIGTERM: stopping gracefully" in served.proto.output),
                "the service draining",
                output=lambda: served.proto.output,
            )
            behaviour.release()
            code, _, err = await download
            assert code == 0, err
            exit_code = await served.stop()
        assert exit_code == 0, served.output
        assert received.stat().st_size == body.size
        received.unlink()
        assert temp_files(storage) == []
        assert assert_store_valid(storage) == 1, f"round {round_}: {served.output}"


@pytest_twisted.ensureDeferred
async def test_an_answer_given_during_the_grace_period_reaches_the_client(
    tmp_path, upstream: UpstreamServer
):
    """SIGTERM while the only request waits on an upstream that stalls mid-body: the download
    times out during the grace period, and its 504 reaches the client before the process
    exits 0. Before: the 504 was logged, then the stop went on in the same reactor turn and
    the reactor stopped with the answer still unwritten: the client got an empty reply."""
    body = os.urandom(20_000)  # a small body, held in memory until validated
    upstream.register("/repo/PULP_MANIFEST", _Bytes(f"f.bin,{sha256(body)},{len(body)}\n".encode()))
    upstream.register("/repo/f.bin", StallMidBody(5000, body))
    config = write_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"), grace_period=10)
    config.write_text(config.read_text() + "sock_read_timeout = 1\nmax_retries = 0\n")
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    async with twistd(config) as served:
        answer = served.curl("/demo/f.bin", "-w", "\n%{http_code}")
        await until(lambda: upstream.requests("/repo/f.bin"))
        served.process.signalProcess("TERM")
        code, out, err = await answer
        exit_code = await served.exited()
    assert exit_code == 0, served.output
    assert (code, out.rpartition(b"\n")[2]) == (0, b"504"), (code, out, err)
    assert b"upstream timed out" in out


# -- streamed and file:// remotes: settings from the configuration reach the downloaders ----


@pytest_twisted.ensureDeferred
async def test_streamed_remote_keeps_nothing_and_file_remote_reads_allowed_paths(
    tmp_path, upstream: UpstreamServer
):
    served_folder, local_folder = tmp_path / "served", tmp_path / "local"
    served_folder.mkdir()
    local_folder.mkdir()
    streamed, local = b"streamed bytes\n" * 1000, b"from a local folder\n"
    write_repo(served_folder, {"s.bin": streamed})
    write_repo(local_folder, {"l.txt": local})
    upstream.serve_tree("/repo", served_folder)
    storage = tmp_path / "var"
    config = tmp_path / "streamer.toml"
    config.write_text(
        '[server]\ngrace_period = 1\n[storage]\npath = "var"\n'
        '[security]\nallowed_import_paths = ["local"]\n'
        f'[[remotes]]\nname = "live"\nurl = "{upstream.url("/repo/PULP_MANIFEST")}"\n'
        'policy = "streamed"\n'
        f'[[remotes]]\nname = "disk"\nurl = "{(local_folder / "PULP_MANIFEST").as_uri()}"\n'
        'policy = "on_demand"\nbase_path = "mirror/disk"\n'
    )
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    async with twistd(config) as served:
        for _ in range(2):
            code, body, err = await served.curl("/live/s.bin")
            assert (code, body) == (0, streamed), err
        code, body, err = await served.curl("/mirror/disk/l.txt")
        assert (code, body) == (0, local), err
        await stored_soon(storage, local)
        await served.metrics_when(lambda m: m["streamer_cache_misses_total"] == 3)
        assert await served.stop() == 0, served.output
    assert len(upstream.requests("/repo/s.bin")) == 2
    assert not artifact_path(storage, streamed).exists()
    assert assert_store_valid(storage) == 1
    assert temp_files(storage) == []

    # A file:// remote outside allowed_import_paths is refused with a clear error.
    config.write_text(
        '[storage]\npath = "var"\n'
        f'[[remotes]]\nname = "disk"\nurl = "{(local_folder / "PULP_MANIFEST").as_uri()}"\n'
    )
    code, out, err = await streamer_cli(config, "sync")
    assert code == 1, out + err
    assert "Traceback" not in err and "allowed" in err, err


# -- the README quickstart, run as written ---------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart_script() -> str:
    """The shell block of the README's "Try it end to end" section."""
    text = README.read_text()
    section = text[text.index("## Try it end to end") :]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match, "the quickstart section has no sh block"
    return match.group(1)


@pytest_twisted.ensureDeferred
async def test_the_readme_quickstart_works_as_written(tmp_path):
    """The README block run by bash, only its folder and ports moved (tmp_path, free ports)."""
    script = quickstart_script()
    for fixed in ("/tmp/demo", ":8000", " 8000 ", ":8080"):
        assert fixed in script, f"the quickstart no longer uses {fixed!r}: update this test"
    upstream_port, service_port = free_port(), free_port()
    script = (
        script.replace("/tmp/demo", str(tmp_path / "demo"))
        .replace(":8000", f":{upstream_port}")
        .replace(" 8000 ", f" {upstream_port} ")
        .replace(":8080", f":{service_port}")
    )
    # Whatever happens, no background job outlives the script.
    wrapped = "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\nset -e\n" + script
    env = child_env()
    # The console scripts and python of the interpreter running the tests come first.
    env["PATH"] = sysconfig.get_path("scripts") + os.pathsep + env.get("PATH", "")
    out, err, code = await getProcessOutputAndValue(
        "/bin/bash", ["-c", wrapped], env=env, path=str(tmp_path)
    )
    out, err = out.decode(), err.decode()
    assert code == 0, out + err
    assert "demo: 0 downloaded, 0 already present, 2 recorded lazily, 0 failed" in out, out
    assert out.count("hello mirror\n") == 2, out
    assert 'href="blob.bin"' in out and 'href="hello.txt"' in out, out
    assert "streamer_cache_misses_total 1.0" in out and "streamer_cache_hits_total 1.0" in out
    assert "SIGTERM: stopping gracefully" in out and "Traceback" not in out + err, out + err
    storage = tmp_path / "demo" / "var"
    assert artifact_path(storage, b"hello mirror\n").exists()
    assert temp_files(storage) == []


# -- connection settings and mirrors reach the lazy downloads -------------------------------


@pytest_twisted.ensureDeferred
async def test_remote_headers_auth_and_mirrors_reach_sync_and_lazy_downloads(
    tmp_path, upstream_factory
):
    origin, mirror = upstream_factory(), upstream_factory()
    folder = tmp_path / "upstream"
    folder.mkdir()
    data = os.urandom(100_000)
    write_repo(folder, {"only-on-mirror.bin": data, "both.txt": b"both\n"})
    origin.register("/repo/PULP_MANIFEST", _Bytes((folder / "PULP_MANIFEST").read_bytes()))
    origin.register("/repo/both.txt", _Bytes(b"both\n"))
    mirror.serve_tree("/m", folder)
    config = write_config(tmp_path, origin.url("/repo/PULP_MANIFEST"))
    config.write_text(
        config.read_text()
        + 'username = "user"\npassword = "s3cret"\nheaders = { "X-Token" = "t0k3n" }\n'
        + 'user_agent = "e2e-agent/1"\n'
        + f'mirrors = ["{mirror.url("/m/")}"]\n'
    )
    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    async with twistd(config) as served:
        code, body, err = await served.curl("/demo/both.txt")
        assert (code, body) == (0, b"both\n"), err
        code, body, err = await served.curl("/demo/only-on-mirror.bin")
        assert (code, body) == (0, data), err
        await stored_soon(tmp_path / "var", data)
        await stored_soon(tmp_path / "var", b"both\n")
        assert await served.stop() == 0, served.output
    assert "s3cret" not in served.output
    # Logs: the origin's 404 (url and reason) before the failover, and one access line per
    # request with method, path, status, bytes, duration and cache status.
    failed = origin.url("/repo/only-on-mirror.bin")
    assert f"upstream failure: {failed}: not_found" in served.output
    assert re.search(r'"GET /demo/both.txt" 200 5 \d+\.\d{3}s cache=miss', served.output)
    assert re.search(
        rf'"GET /demo/only-on-mirror.bin" 200 {len(data)} \d+\.\d{{3}}s cache=miss', served.output
    )
    sent = [
        *origin.requests("/repo/PULP_MANIFEST"),
        *origin.requests("/repo/both.txt"),
        *origin.requests("/repo/only-on-mirror.bin"),
    ]
    assert len(sent) == 3
    for _, headers in sent:
        assert headers["x-token"] == "t0k3n" and headers["user-agent"].endswith(" e2e-agent/1")
        assert headers["authorization"].startswith("Basic ")
    assert len(mirror.requests("/m/only-on-mirror.bin")) == 1
    assert assert_store_valid(tmp_path / "var") == 2
