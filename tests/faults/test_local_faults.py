"""Local faults, driven from outside: other processes on the same storage, a full or read-only
storage, too few file descriptors, and files in ``artifacts/`` that are not regular files.

Each test runs the real service (in this process, or ``twistd -n streamer`` as a child) and
real clients or a real ``streamer sync`` beside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from store import CatalogEntry, open_catalog
from store.tempdirs import FOLDER_PREFIX
from streamer.claims import LOCKS_FILE
from streamer.config import load_config
from streamer.service import StreamerService
from tests.service.test_twistd import run
from tests.support.clients import run_curl, run_process
from tests.support.faults import Gated, Serve, Trickle
from tests.support.polling import until
from tests.support.service import ServiceEnv
from tests.support.twistd import TWISTD, start_twistd
from tests.support.upstream import UpstreamServer

STREAMER = ["-m", "streamer.cli"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_config(
    folder: Path, upstream: UpstreamServer, policy: str = "immediate", server: str = ""
) -> Path:
    """A configuration with storage under *folder*/var and one remote at *upstream*/repo;
    *server* lines are added to its ``[server]`` table."""
    config = folder / "streamer.toml"
    config.write_text(
        "[server]\n"
        'listen = "tcp:0:interface=127.0.0.1"\n'
        "grace_period = 1\n"
        f"{server}"
        "[storage]\n"
        f'path = "{folder / "var"}"\n'
        "[[remotes]]\n"
        'name = "repo"\n'
        f'url = "{upstream.url("/repo/PULP_MANIFEST")}"\n'
        f'policy = "{policy}"\n'
        "max_retries = 0\n"
    )
    return config


def publish(upstream: UpstreamServer, files: dict[str, bytes], behaviour=Serve) -> None:
    lines = "".join(f"{name},{sha256(data)},{len(data)}\n" for name, data in files.items())
    upstream.register("/repo/PULP_MANIFEST", Serve(lines.encode()))
    for name, data in files.items():
        upstream.register(f"/repo/{name}", behaviour(data))


def temp_files(root: Path) -> list[Path]:
    """Every file under the storage's tmp/ (the lock files beside the folders aside)."""
    return [p for p in (root / "tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]


# -- other processes on the same storage ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_service_started_and_stopped_beside_a_running_sync_leaves_its_files(
    tmp_path, upstream
):
    """The service cleans tmp/ at start and stop; a sync downloading into the same storage
    meanwhile completes, and every one of its files is committed."""
    files = {f"f{i}.bin": os.urandom(3000) for i in range(4)}
    # About 2 s per file: the sync is mid-download while the service starts and stops.
    publish(upstream, files, lambda data: Trickle(data, bytes_per_sec=1500, interval=0.05))
    config = write_config(tmp_path, upstream)
    var = tmp_path / "var"
    sync = run_process(sys.executable, *STREAMER, "--config", str(config), "sync", timeout=30)
    # Every file has started (its bytes are in a temp file of the sync; the listing too).
    await until(lambda: sum(p.stat().st_size > 0 for p in temp_files(var)) > 4, timeout=10)
    assert not sync.called

    service = StreamerService(load_config(config, environ={}))
    service.startService()
    await until(lambda: service.ready)
    await service.stopService()
    assert not sync.called, "the sync should still be downloading"

    code, out, err = await sync
    assert code == 0, (out + err).decode()
    for data in files.values():
        digest = sha256(data)
        assert (var / "artifacts" / digest[:2] / digest[2:]).read_bytes() == data
    assert list((var / "tmp").iterdir()) == []  # each process removed its own folder


@pytest_twisted.ensureDeferred
async def test_service_start_removes_the_files_of_a_process_that_died(tmp_path, upstream):
    """A process killed mid-download leaves its folder; its lock went with it, so the next
    service start removes the folder at once (however young), and a loose file too."""
    config = write_config(tmp_path, upstream)
    var = tmp_path / "var"
    crash = (
        "import os, sys\n"
        "from store import ArtifactStorage\n"
        "storage = ArtifactStorage(sys.argv[1])\n"
        "with open(os.path.join(storage.temp_dir, '.download-x'), 'wb') as f:\n"
        "    f.write(b'partial')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    code, _out, err = await run_process(sys.executable, "-c", crash, str(var))
    assert code == -9, err.decode()
    (left,) = temp_files(var)
    assert left.parent.name.startswith(FOLDER_PREFIX)

    service = StreamerService(load_config(config, environ={}))
    service.startService()
    try:
        await until(lambda: service.ready)
        assert temp_files(var) == []
        assert [p.name for p in (var / "tmp").iterdir()] == []
    finally:
        await service.stopService()


# -- a full or read-only storage -----------------------------------------------------------


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {done.stderr.strip()}")


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """``mount ARGS TARGET`` for the block (skip the test where mounting is not permitted)."""
    target.mkdir(parents=True, exist_ok=True)
    _mount(*args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the filesystem of *folder* with one file until about *leave* bytes are free."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        while True:
            fs = os.statvfs(folder)
            free = fs.f_bavail * fs.f_frsize - leave
            if free <= 0:
                break
            try:
                f.write(b"\0" * min(free, 64 * 1024))
                f.flush()
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
    return filler


async def curl(url: str, *args: str) -> tuple[int, str, bytes]:
    """GET *url* with curl: (curl's exit code, the status, the body)."""
    code, out, _err = await run_curl("-sS", "-w", "\n%{http_code}", *args, url)
    body, _, status = out.rpartition(b"\n")
    return code, status.decode(), body


@pytest_twisted.async_yield_fixture
async def small_storage_service(tmp_path, upstream):
    """A running service whose storage (and catalog) is a 1 MiB tmpfs."""
    with mounted(tmp_path / "var", "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        env = await ServiceEnv(tmp_path, upstream).start()
        try:
            yield env
        finally:
            await env.stop()


@pytest_twisted.ensureDeferred
async def test_full_storage_is_a_503_without_cooldown_and_healthz_says_so(
    tmp_path, upstream, small_storage_service
):
    env = small_storage_service
    data = os.urandom(100_000)
    upstream.register("/files/a.bin", Serve(data))
    await env.add("a.bin", data, stored=False, url=upstream.url("/files/a.bin"))
    filler = fill(tmp_path / "var")

    code, status, body = await curl(env.url("fixtures/a.bin"))
    assert (code, status) == (0, "503")
    assert body == b"storage full\n"
    assert upstream.requests("/files/a.bin") == []  # refused before any upstream request
    code, status, body = await curl(env.url("healthz"))
    assert status == "503" and body.startswith(b"storage full (ENOSPC"), body

    filler.unlink()  # room again: served at once, no cooldown held against the upstream
    code, status, body = await curl(env.url("fixtures/a.bin"))
    assert (code, status, body) == (0, "200", data)
    await until(lambda: env.storage.has(sha256(data)))
    assert (await curl(env.url("healthz")))[1:] == ("200", b"ok\n")


@pytest_twisted.ensureDeferred
async def test_storage_filling_up_mid_download_aborts_and_stores_nothing(
    tmp_path, upstream, small_storage_service
):
    """Two downloads that each fit but not together: the tee file of one fails mid-stream.
    Its client is cut (a 503 if no byte was sent yet), nothing partial is stored or left in
    tmp/, and the next request goes upstream again (no cooldown)."""
    env = small_storage_service
    blobs = {name: os.urandom(300_000) for name in ("a.bin", "b.bin")}
    gates = {name: Gated(Trickle(data, bytes_per_sec=1_000_000)) for name, data in blobs.items()}
    for name, data in blobs.items():
        upstream.register(f"/files/{name}", gates[name])
        await env.add(name, data, stored=False, url=upstream.url(f"/files/{name}"))
    filler = fill(tmp_path / "var", leave=450_000)

    # Both downloads start (each fits), then their bytes arrive side by side.
    getting = [defer.ensureDeferred(curl(env.url(f"fixtures/{name}"))) for name in blobs]
    await until(lambda: all(gate.waiting for gate in gates.values()))
    for gate in gates.values():
        gate.release()
    results = [await d for d in getting]
    failed = [
        (name, result)
        for name, result in zip(blobs, results, strict=True)
        if result != (0, "200", blobs[name])
    ]
    assert len(failed) == 1, results
    name, (code, status, body) = failed[0]
    if status == "503":
        assert body == b"storage full\n"
    else:  # cut mid-body: curl reports the transfer as incomplete (18) or broken (56)
        assert status == "200" and code in (18, 56) and len(body) < len(blobs[name])
    assert not env.storage.has(sha256(blobs[name]))
    await until(lambda: not env.lazy.in_flight)
    assert env.temp_files() == []

    filler.unlink()
    before = len(upstream.requests(f"/files/{name}"))
    assert await curl(env.url(f"fixtures/{name}")) == (0, "200", blobs[name])
    assert len(upstream.requests(f"/files/{name}")) == before + 1


@pytest_twisted.ensureDeferred
async def test_storage_filling_up_while_small_bodies_wait_for_their_commit(
    tmp_path, upstream, small_storage_service, log_events
):
    """Two small bodies held in memory (room for each, checked before it starts, not for
    both): both clients get the whole body (sent once validated), one is stored, the other's
    commit meets ENOSPC: one error line with the errno, no traceback (before: a critical
    line with a traceback per body), nothing left in tmp/, and the next request downloads it
    again and stores it once there is room."""
    env = small_storage_service
    blobs = {name: os.urandom(60_000) for name in ("a.bin", "b.bin")}
    gates = {name: Gated(Serve(data)) for name, data in blobs.items()}
    for name, data in blobs.items():
        upstream.register(f"/files/{name}", gates[name])
        await env.add(name, data, stored=False, url=upstream.url(f"/files/{name}"))
    filler = fill(tmp_path / "var", leave=100_000)

    getting = {name: defer.ensureDeferred(curl(env.url(f"fixtures/{name}"))) for name in blobs}
    await until(lambda: all(gate.waiting for gate in gates.values()))
    for gate in gates.values():
        gate.release()
    for name, d in getting.items():
        assert await d == (0, "200", blobs[name])
    await until(lambda: not env.lazy.in_flight)
    stored = [name for name, data in blobs.items() if env.storage.has(sha256(data))]
    assert len(stored) == 1, stored
    assert env.temp_files() == []
    (lost,) = set(blobs) - set(stored)
    said = [e for e in log_events if sha256(blobs[lost]) in e]
    assert any("storage full (ENOSPC" in e for e in said), said
    assert not any("Traceback" in e or "'log_level': <LogLevel=critical>" in e for e in said)

    filler.unlink()
    assert await curl(env.url(f"fixtures/{lost}")) == (0, "200", blobs[lost])
    await until(lambda: env.storage.has(sha256(blobs[lost])))


@pytest_twisted.ensureDeferred
async def test_storage_filling_up_while_a_large_body_is_written_beside_the_reactor(
    tmp_path, upstream
):
    """Past its first MiB a body is written to its temp file on a thread beside the reactor
    (`downloaders.inorder`): a full disk there is reported as inline. The client is cut,
    nothing is stored or left in tmp/, and the service goes on serving."""
    with mounted(tmp_path / "var", "-t", "tmpfs", "-o", "size=8m", "tmpfs"):
        env = await ServiceEnv(tmp_path, upstream).start()
        try:
            blobs = {name: os.urandom(3 * 1024 * 1024) for name in ("a.bin", "b.bin")}
            gates = {name: Gated(Serve(data)) for name, data in blobs.items()}
            for name, data in blobs.items():
                upstream.register(f"/files/{name}", gates[name])
                await env.add(name, data, stored=False, url=upstream.url(f"/files/{name}"))
            # Room for each alone (checked before it starts), not for both: b.bin runs out
            # about 1.5 MiB in, past the bytes written inline.
            filler = fill(tmp_path / "var", leave=int(4.5 * 1024 * 1024))
            first = defer.ensureDeferred(curl(env.url("fixtures/a.bin")))
            second = defer.ensureDeferred(curl(env.url("fixtures/b.bin")))
            await until(lambda: all(gate.waiting for gate in gates.values()))
            gates["a.bin"].release()
            assert await first == (0, "200", blobs["a.bin"])
            gates["b.bin"].release()
            code, status, body = await second
            assert status == "200" and code in (18, 56), (code, status)
            assert len(body) < len(blobs["b.bin"])
            assert not env.storage.has(sha256(blobs["b.bin"]))
            await until(lambda: not env.lazy.in_flight)
            assert env.temp_files() == []

            filler.unlink()
            assert await curl(env.url("fixtures/b.bin")) == (0, "200", blobs["b.bin"])
            await until(lambda: env.storage.has(sha256(blobs["b.bin"])))
        finally:
            await env.stop()


@pytest_twisted.ensureDeferred
async def test_read_only_storage_is_a_503_and_healthz_says_so(tmp_path, upstream):
    env = await ServiceEnv(tmp_path, upstream).start()
    try:
        stored, lazy = b"stored bytes\n", os.urandom(10_000)
        upstream.register("/files/lazy.bin", Serve(lazy))
        await env.add("stored.txt", stored, stored=True)
        await env.add("lazy.bin", lazy, stored=False, url=upstream.url("/files/lazy.bin"))
        env.storage.temp_dir  # noqa: B018 - made before the storage turns read-only
        with mounted(tmp_path / "var", "--bind", str(tmp_path / "var")):
            _mount("-o", "remount,ro,bind", str(tmp_path / "var"))
            assert await curl(env.url("fixtures/lazy.bin")) == (
                0,
                "503",
                b"storage read-only\n",
            )
            assert upstream.requests("/files/lazy.bin") == []
            code, status, body = await curl(env.url("healthz"))
            assert status == "503" and body.startswith(b"storage read-only (EROFS"), body
            assert await curl(env.url("fixtures/stored.txt")) == (0, "200", stored)
        # Writable again: no cooldown, the same request goes through.
        assert await curl(env.url("fixtures/lazy.bin")) == (0, "200", lazy)
        assert (await curl(env.url("healthz")))[1:] == ("200", b"ok\n")
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_service_refuses_to_start_on_read_only_storage_with_one_line(tmp_path, upstream):
    config = write_config(tmp_path, upstream)
    var = tmp_path / "var"
    for folder in ("artifacts", "tmp"):
        (var / folder).mkdir(parents=True)
    with mounted(var, "--bind", str(var)):
        _mount("-o", "remount,ro,bind", str(var))
        out, err, code = await run(
            [*TWISTD, "-n", "--pidfile=", "streamer", "--config", str(config)], tmp_path
        )
    assert code != 0
    assert err.splitlines() == [
        f"streamer: storage at {var} cannot take new files: "
        "storage read-only (EROFS: Read-only file system)"
    ], out + err
    assert "Traceback" not in out + err


async def catalog_lazy(config: Path, files: dict[str, bytes], url) -> None:
    """Record *files* of remote ``repo`` in the catalog of *config*, not stored."""
    settings = load_config(config, environ={})
    catalog = open_catalog(settings.catalog.url, settings.storage.path)
    await catalog.open()
    try:
        entries = [
            CatalogEntry(f"repo/{name}", "repo", url(name), len(data), {"sha256": sha256(data)})
            for name, data in files.items()
        ]
        await catalog.replace_remote("repo", entries)
    finally:
        await catalog.close()


async def leave_descriptors(pid: int, count: int) -> None:
    """Lower *pid*'s open-file (soft) limit so that *count* more descriptors can be opened;
    the hard limit stays, so the soft one can be raised again. Waits first until the
    connections of earlier requests are closed (the count holds still for 0.2 s)."""
    seen: list[int] = []

    def settled() -> bool:
        seen.append(len(os.listdir(f"/proc/{pid}/fd")))
        return len(seen) > 20 and len(set(seen[-20:])) == 1

    await until(settled)
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    free = [fd for fd in range(len(used) + count + 1) if fd not in used]
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[count], hard))


@pytest.mark.parametrize(
    ("left", "where"),
    [(1, "content request GET /repo/a.bin"), (3, "cannot download")],
    ids=["opening-the-artifact", "making-the-temp-file"],
)
@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_is_a_503_without_cooldown(tmp_path, upstream, left, where):
    """``twistd -n streamer`` with one or three descriptors left: the client's connection takes
    one, then opening the artifact (is it stored? its folder, then the file) or, with three,
    what the download opens (its lock, the process's temp folder and the upstream connection:
    this small body is held in memory, without a temp file) fails: 503
    ``too many open files``, EMFILE in the log (one line, no traceback), and the same request
    is served once descriptors are back."""
    data = os.urandom(20_000)
    upstream.register("/files/a.bin", Serve(data))
    # The limit is lowered for one process: it must be the one that takes the request (with
    # a helper process beside it, the kernel could hand the connection to either).
    config = write_config(tmp_path, upstream, policy="on_demand", server="processes = 1\n")
    await catalog_lazy(config, {"a.bin": data}, lambda name: upstream.url(f"/files/{name}"))
    served = start_twistd(tmp_path, ["--config", str(config)])
    proto, process, base = served.proto, served.process, served.base
    try:
        await served.healthy()
        assert (await curl(base + "/repo/missing.bin"))[1] == "404"  # the catalog is open
        limits = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
        await leave_descriptors(process.pid, left)
        try:
            got = await curl(base + "/repo/a.bin")
        finally:
            resource.prlimit(process.pid, resource.RLIMIT_NOFILE, limits)
        assert got == (0, "503", b"too many open files\n"), proto.output.decode()
        assert upstream.requests("/files/a.bin") == []
        assert await curl(base + "/repo/a.bin") == (0, "200", data)
    finally:
        code = await served.stop()
    output = proto.output.decode()
    assert code == 0, output
    assert f"{where}" in output and "too many open files (EMFILE: Too many open files)" in output
    assert "Traceback" not in output


# -- what is not a regular file in artifacts/ ------------------------------------------------


def unique_prefix(taken: set[str], kib: int) -> bytes:
    """Random bytes (*kib* KiB) whose artifact folder (``artifacts/<ab>``) is in no *taken*."""
    while (sha256(data := os.urandom(kib * 1024))[:2]) in taken:
        pass
    taken.add(sha256(data)[:2])
    return data


def artifact_path(var: Path, data: bytes) -> Path:
    digest = sha256(data)
    return var / "artifacts" / digest[:2] / digest[2:]


@pytest_twisted.ensureDeferred
async def test_a_fifo_or_symlink_in_artifacts_is_not_served_and_does_not_freeze(tmp_path, upstream):
    """A FIFO at an artifact's path used to block the whole service on its open(); a symbolic
    link was served (any file the service can read, with the artifact's ETag). Both are
    treated as not stored: the bytes come from upstream, the next commit replaces them."""
    prefixes: set[str] = set()
    fifo_data, link_data, under_link = (unique_prefix(prefixes, size) for size in (5, 6, 7))
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for clients\n")
    files = {"fifo.bin": fifo_data, "link.bin": link_data, "under-link.bin": under_link}
    for name, data in files.items():
        upstream.register(f"/files/{name}", Serve(data))
    config = write_config(tmp_path, upstream, policy="on_demand")
    await catalog_lazy(config, files, lambda name: upstream.url(f"/files/{name}"))
    var = tmp_path / "var"
    for data in (fifo_data, link_data):
        artifact_path(var, data).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(artifact_path(var, fifo_data))
    artifact_path(var, link_data).symlink_to(secret)
    # artifacts/<ab> a link to a folder elsewhere, holding a file named like the artifact
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / artifact_path(var, under_link).name).write_bytes(b"not for clients\n")
    artifact_path(var, under_link).parent.symlink_to(elsewhere)

    served = start_twistd(tmp_path, ["--config", str(config)])
    proto, base = served.proto, served.base
    try:
        await served.healthy()
        for name, data in files.items():
            assert await curl(base + f"/repo/{name}", "--max-time", "5") == (0, "200", data)
        assert (await curl(base + "/healthz", "--max-time", "5"))[1] == "200"
        for data in (fifo_data, link_data):  # the commit put the valid file in their place
            path = artifact_path(var, data)
            await until(lambda path=path: path.is_file() and not path.is_symlink())
            assert path.read_bytes() == data
        assert secret.read_bytes() == b"not for clients\n"
        # Nothing is stored through the linked folder: served from upstream each time.
        assert (elsewhere / artifact_path(var, under_link).name).read_bytes() == secret.read_bytes()
        assert [p.name for p in elsewhere.iterdir()] == [artifact_path(var, under_link).name]
    finally:
        code = await served.stop()
    output = proto.output.decode()
    assert code == 0, output
    assert "is a FIFO: treated as not stored" in output
    assert "is (or is under) a symbolic link: treated as not stored" in output
    assert "is a symbolic link: refusing to store through it" in output


@pytest_twisted.ensureDeferred
async def test_a_symlink_or_fifo_in_the_claims_folder_is_never_written_through(tmp_path, upstream):
    """``tmp/claims/<sha256>`` a symbolic link to a file elsewhere (planted before the start,
    met by the start's sweep, and planted while serving, met by a request) or a FIFO: the
    link's target is never opened for writing (before: it was truncated and the claim's
    notices written into it; a FIFO was a 500 `Illegal seek`), or a folder. What is planted is
    removed as no claim (a folder with what it holds, never through a link in it; before: it
    stayed, one warning per request), and the request is served and stored as usual."""
    names = ("swept.bin", "linked.bin", "fifo.bin", "folder.bin")
    files = {name: os.urandom(20_000) for name in names}
    for name, data in files.items():
        upstream.register(f"/files/{name}", Serve(data))
    config = write_config(tmp_path, upstream, policy="on_demand")
    await catalog_lazy(config, files, lambda name: upstream.url(f"/files/{name}"))
    claims = tmp_path / "var" / "tmp" / "claims"
    claims.mkdir(parents=True)
    victims = {name: tmp_path / f"victim-{name}" for name in ("swept.bin", "linked.bin")}
    for victim in victims.values():
        victim.write_bytes(b"precious\n")
    (claims / sha256(files["swept.bin"])).symlink_to(victims["swept.bin"])

    served = start_twistd(tmp_path, ["--config", str(config)])
    try:
        await served.healthy()
        (claims / sha256(files["linked.bin"])).symlink_to(victims["linked.bin"])
        os.mkfifo(claims / sha256(files["fifo.bin"]))
        planted = claims / sha256(files["folder.bin"])
        (planted / "inside").mkdir(parents=True)
        (planted / "inside" / "link").symlink_to(victims["linked.bin"])
        for name, data in files.items():
            got = await curl(served.base + f"/repo/{name}", "--max-time", "5")
            assert got == (0, "200", data), name
        for victim in victims.values():
            assert victim.read_bytes() == b"precious\n"
        var = tmp_path / "var"
        for data in files.values():
            await until(lambda data=data: artifact_path(var, data).is_file())
        # Nothing planted is left, and no claim: only the locks file every claim locks in.
        await until(lambda: [p.name for p in claims.iterdir()] == [LOCKS_FILE])
        assert (claims / LOCKS_FILE).is_file() and (claims / LOCKS_FILE).stat().st_size == 0
    finally:
        code = await served.stop()
    output = served.proto.output.decode()
    assert code == 0, output
    assert "Traceback" not in output
    assert "is a symbolic link, not a claim: removed" in output
    assert "is a FIFO, not a claim: removed" in output
    assert "is a folder, not a claim: removed" in output


@pytest_twisted.ensureDeferred
async def test_a_stored_artifact_of_the_wrong_size_is_not_served(tmp_path, upstream):
    """An artifact cut short on disk (or grown) while the catalog has its size: not served
    as if it were the artifact (before: a 200 with the short file, a 416 for a range past
    its end, both carrying the artifact's ETag), but fetched again, and its commit puts the
    validated file in its place (before: the damaged file stayed, 'stored already')."""
    files = {"short.bin": os.urandom(6000), "long.bin": os.urandom(5000)}
    for name, data in files.items():
        upstream.register(f"/files/{name}", Serve(data))
    config = write_config(tmp_path, upstream, policy="on_demand")
    await catalog_lazy(config, files, lambda name: upstream.url(f"/files/{name}"))
    var = tmp_path / "var"
    for data in files.values():
        artifact_path(var, data).parent.mkdir(parents=True, exist_ok=True)
    artifact_path(var, files["short.bin"]).write_bytes(files["short.bin"][:2000])
    artifact_path(var, files["long.bin"]).write_bytes(files["long.bin"] + b"tail")

    served = start_twistd(tmp_path, ["--config", str(config)])
    try:
        await served.healthy()
        url = served.base + "/repo/short.bin"
        assert await curl(url, "-r", "3000-3999") == (0, "206", files["short.bin"][3000:4000])
        assert await curl(served.base + "/repo/long.bin") == (0, "200", files["long.bin"])
        for data in files.values():
            path = artifact_path(var, data)
            await until(lambda path=path, data=data: path.read_bytes() == data)
        assert await curl(url) == (0, "200", files["short.bin"])
        assert len(upstream.requests("/files/short.bin")) == 1  # then served as stored
    finally:
        code = await served.stop()
    output = served.proto.output.decode()
    assert code == 0, output
    assert "has 2000 bytes, the catalog says 6000: treated as not stored" in output


@pytest_twisted.ensureDeferred
async def test_a_folder_at_an_artifacts_path_is_one_line_per_commit_and_left_for_verify(
    tmp_path, upstream
):
    """A folder planted at an artifact's path cannot be replaced by a commit (a rename does
    not replace a folder). Each request is served the right bytes from upstream; each
    commit attempt is one line saying so (before: a failure with its traceback); the folder
    and what it holds are left alone (it may be a user's) until ``streamer verify`` moves it
    aside, after which the next request stores the artifact. A small body (committed from
    memory, in a batch) and a larger one (from its temp file) alike."""
    prefixes: set[str] = set()
    files = {"small.bin": unique_prefix(prefixes, 5), "large.bin": unique_prefix(prefixes, 200)}
    for name, data in files.items():
        upstream.register(f"/files/{name}", Serve(data))
    config = write_config(tmp_path, upstream, policy="on_demand")
    await catalog_lazy(config, files, lambda name: upstream.url(f"/files/{name}"))
    var = tmp_path / "var"
    for data in files.values():
        artifact_path(var, data).mkdir(parents=True)
        (artifact_path(var, data) / "keep.txt").write_bytes(b"someone's file\n")

    def refusals(output: str, data: bytes) -> int:
        return output.count(f"{artifact_path(var, data)} is a folder: not replaced")

    served = start_twistd(tmp_path, ["--config", str(config)])
    try:
        await served.healthy()
        for attempt in (1, 2):
            for name, data in files.items():
                assert await curl(served.base + f"/repo/{name}") == (0, "200", data)
                await until(
                    lambda data=data, n=attempt: refusals(served.proto.output.decode(), data) >= n
                )
        assert len(upstream.requests("/files/small.bin")) == 2
        await until(lambda: not temp_files(var))  # (each claim is let go after its line)
    finally:
        code = await served.stop()
    output = served.proto.output.decode()
    assert code == 0, output
    assert [refusals(output, data) for data in files.values()] == [2, 2], output
    assert "Traceback" not in output and "storing the artifact failed" not in output, output
    for data in files.values():  # left alone
        assert (artifact_path(var, data) / "keep.txt").read_bytes() == b"someone's file\n"

    code, out, err = await run_process(
        sys.executable, *STREAMER, "--config", str(config), "verify", timeout=30
    )
    assert code == 1, out + err
    for data in files.values():
        assert f"BAD {sha256(data)}: not a regular file: a folder; moved to" in out.decode()
        assert not os.path.lexists(artifact_path(var, data))
    served = start_twistd(tmp_path, ["--config", str(config)])
    try:
        await served.healthy()
        for name, data in files.items():
            assert await curl(served.base + f"/repo/{name}") == (0, "200", data)
            path = artifact_path(var, data)
            await until(lambda path=path, data=data: path.is_file() and path.read_bytes() == data)
    finally:
        assert await served.stop() == 0


@pytest_twisted.ensureDeferred
async def test_streamer_verify_reports_what_is_not_a_regular_file(tmp_path, upstream):
    config = write_config(tmp_path, upstream)
    var = tmp_path / "var"
    good, fifo, link = b"good bytes\n", b"fifo's name\n", b"link's name\n"
    for data in (good, fifo, link):
        artifact_path(var, data).parent.mkdir(parents=True, exist_ok=True)
    artifact_path(var, good).write_bytes(good)
    os.mkfifo(artifact_path(var, fifo))
    (tmp_path / "target").write_bytes(link)  # even right bytes: a link is not stored content
    artifact_path(var, link).symlink_to(tmp_path / "target")

    code, out, err = await run_process(
        sys.executable, *STREAMER, "--config", str(config), "verify", timeout=30
    )
    lines = out.decode().splitlines()
    assert code == 1, out + err
    assert f"BAD {sha256(fifo)}: not a regular file: a FIFO; moved to {var}/quarantine/" in (
        "\n".join(lines)
    )
    assert f"BAD {sha256(link)}: not a regular file: a symbolic link; moved to" in out.decode()
    assert lines[-1] == f"verified 3 artifact(s) in {var}: 1 good, 2 bad"
    assert not os.path.lexists(artifact_path(var, fifo))
    assert not os.path.lexists(artifact_path(var, link))
    assert artifact_path(var, good).read_bytes() == good


# -- big listings ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_big_listing_is_rendered_once_until_a_sync_changes_it(tmp_path, upstream):
    """A folder of 5,000 files: the second GET comes from the listing cache (the catalog is
    not walked again); a `streamer sync` in another process that adds a file changes the
    catalog's listing version, so the next GET shows the new file; a sync that changes
    nothing keeps the page."""
    env = await ServiceEnv(tmp_path, upstream).start()
    walks: list[str] = []
    list_dir = env.catalog.list_dir

    def counting_list_dir(prefix: str):
        walks.append(prefix)
        return list_dir(prefix)

    env.catalog.list_dir = counting_list_dir
    files = {f"pool/{i:05d}.rpm": b"%d" % i for i in range(5000)}

    async def sync() -> None:
        lines = "".join(f"{name},{sha256(data)},{len(data)}\n" for name, data in files.items())
        upstream.register("/PULP_MANIFEST", Serve(lines.encode()))
        config = str(tmp_path / "streamer.toml")
        code, out, err = await run_process(sys.executable, *STREAMER, "--config", config, "sync")
        assert code == 0, (out + err).decode()

    try:
        await sync()
        first = await curl(env.url("fixtures/pool/"))
        assert first[:2] == (0, "200") and first[2].count(b'.rpm">') == 5000
        assert await curl(env.url("fixtures/pool/")) == first
        assert walks == ["fixtures/pool"]

        files["pool/new.rpm"] = b"new"
        await sync()
        code, status, body = await curl(env.url("fixtures/pool/"))
        assert (code, status) == (0, "200") and b'href="new.rpm"' in body
        assert walks == ["fixtures/pool"] * 2

        await sync()  # nothing changed: the page stays
        assert (await curl(env.url("fixtures/pool/")))[2] == body
        assert walks == ["fixtures/pool"] * 2
    finally:
        await env.stop()
