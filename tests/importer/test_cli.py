"""``streamer --config F sync`` and ``fetch`` end to end, in a child process; kill-safety with
SIGKILL half-way through a sync."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task, threads

from store import ArtifactStorage
from tests.importer.conftest import artifacts, sha
from tests.support.clients import exit_code
from tests.support.faults import Gated, Serve, StallMidBody

REPO = Path(__file__).resolve().parents[2]


class Child(protocol.ProcessProtocol):
    """A child process whose output is collected; ``ended`` fires with (code, out, err)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: defer.Deferred[tuple[int, str, str]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        out, err = b"".join(self.out).decode(), b"".join(self.err).decode()
        self.ended.callback((exit_code(reason), out, err))


def streamer(config: Path, *args: str, closed: tuple[int, ...] = ()) -> Child:
    """``streamer --config CONFIG ARGS...`` in a child, started with the descriptors in
    *closed* closed (as ``>&-`` does)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO)
    child = Child()
    argv = [sys.executable, "-m", "streamer.cli", "--config", str(config), *args]
    fds = {fd: how for fd, how in {0: "w", 1: "r", 2: "r"}.items() if fd not in closed}
    reactor.spawnProcess(
        child, sys.executable, argv, env=env, path=str(config.parent), childFDs=fds
    )
    return child


def write_config(tmp_path: Path, upstream, **remote: object) -> Path:
    settings = {
        "name": "fixtures",
        "url": upstream.url("/repo/PULP_MANIFEST"),
        "max_retries": 0,
        "policy": "immediate",
        **remote,
    }
    lines = ["[storage]", 'path = "var"', "", "[[remotes]]"]
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"')
    config = tmp_path / "streamer.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest_twisted.ensureDeferred
async def test_cli_sync_end_to_end(tmp_path, upstream, repo):
    config = write_config(tmp_path, upstream)
    code, out, err = await streamer(config, "sync").ended

    assert code == 0, err
    assert out.startswith("fixtures: 10 downloaded, 0 already present, 0 recorded lazily, 0 failed")
    assert "sync fixtures: 10/10 files (100%)" in err  # plain progress: stderr is not a tty
    storage = ArtifactStorage(tmp_path / "var")
    assert artifacts(storage) == {sha(d): d for d in repo.files.values()}

    code, out, err = await streamer(config, "sync", "fixtures").ended
    assert code == 0 and "0 downloaded, 10 already present" in out

    code, out, err = await streamer(config, "sync", "nope").ended
    assert code == 2 and err == "error: unknown remote 'nope' (known: fixtures)\n" and out == ""


@pytest_twisted.ensureDeferred
async def test_cli_sync_refused_by_a_catalog_of_another_storage_stores_nothing(
    tmp_path, upstream, repo
):
    """The catalog opens while the listing is fetched: a catalog that belongs to another
    storage folder still ends the command with its one line and status 1, and nothing is
    downloaded or recorded."""
    first = write_config(tmp_path, upstream)
    code, _out, err = await streamer(first, "sync").ended
    assert code == 0, err
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(other, upstream)
    database = tmp_path / "var" / "catalog.sqlite3"
    config.write_text(config.read_text() + f'\n[catalog]\nurl = "sqlite:///{database}"\n')
    upstream.clear_log()
    code, out, err = await streamer(config, "sync").ended

    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(other / "var") in err
    assert [p for p, _ in upstream.all_requests() if not p.endswith("PULP_MANIFEST")] == []
    assert artifacts(ArtifactStorage(other / "var")) == {}


@pytest_twisted.ensureDeferred
async def test_cli_sync_with_a_bad_file_exits_non_zero(tmp_path, upstream, repo):
    repo.files["files/01.bin"] = b"not what is served"
    repo.publish()
    code, out, err = await streamer(write_config(tmp_path, upstream), "sync").ended

    assert code == 1
    assert "9 downloaded" in out and "1 failed" in out
    assert f"failed: {upstream.url('/repo/files/01.bin')}: size mismatch" in out
    assert "Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_cli_fetch(tmp_path, upstream):
    body = b"fetch me\n" * 1000
    url = upstream.register("/f.bin", Serve(body))
    config = write_config(tmp_path, upstream)
    target = tmp_path / "f.bin"

    code, out, err = await streamer(
        config, "fetch", url, "--sha256", sha(body), "--size", str(len(body)), "-o", str(target)
    ).ended
    assert code == 0, err
    assert out.splitlines() == [f"size: {len(body)}", f"sha256: {sha(body)}", f"written: {target}"]
    assert target.read_bytes() == body

    code, out, err = await streamer(
        config, "fetch", url, "--sha256", "0" * 64, "-o", str(tmp_path / "bad.bin")
    ).ended
    assert code == 1 and out == ""
    assert err.startswith("error: fetch failed: sha256 mismatch") and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.bin").exists()

    code, out, err = await streamer(config, "fetch", upstream.url("/missing")).ended
    assert (code, err) == (
        1,
        f"error: fetch failed: HTTP 404 Not Found ({upstream.url('/missing')})\n",
    )


@pytest_twisted.ensureDeferred
async def test_cli_fetch_gives_the_file_the_mode_curl_would(tmp_path, upstream):
    """A new file is 0o666 less the umask, a replaced one keeps its mode, as with curl -O /
    -o and wget (before: both 0o600, the mode of the temporary file it was renamed from)."""
    body = b"readable by others\n" * 100
    url = upstream.register("/f.bin", Serve(body))
    config = write_config(tmp_path, upstream)
    umask = os.umask(0o022)
    os.umask(umask)
    new, kept = tmp_path / "new.bin", tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o640)

    for target in (new, kept):
        code, out, err = await streamer(config, "fetch", url, "-o", str(target)).ended
        assert code == 0, err
        assert target.read_bytes() == body

    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


@pytest_twisted.ensureDeferred
async def test_cli_fetch_to_a_closed_standard_output_or_error(tmp_path, upstream, repo):
    """``fetch -o -`` started with standard output closed (``>&-``) says so in one line and
    ends with 120 (as any command that cannot write its output), downloading nothing; with
    standard error closed the bytes alone reach standard output (the size/sha256 lines are
    not printed into them). ``sync`` and ``verify`` with standard output closed just work."""
    body = b"to standard output\n" * 500
    url = upstream.register("/f.bin", Serve(body))
    config = write_config(tmp_path, upstream)

    code, out, err = await streamer(config, "fetch", url, "-o", "-", closed=(1,)).ended
    assert (code, err) == (120, "streamer: cannot write the standard output: Bad file descriptor\n")
    assert upstream.requests("/f.bin") == [] and not (tmp_path / "var").exists()

    code, out, err = await streamer(
        config, "fetch", url, "--sha256", sha(body), "-o", "-", closed=(2,)
    ).ended
    assert (code, out.encode()) == (0, body)

    code, out, err = await streamer(config, "sync", closed=(1,)).ended
    assert code == 0 and "Traceback" not in err and "10 downloaded" in err  # (its progress)
    assert artifacts(ArtifactStorage(tmp_path / "var")) == {sha(d): d for d in repo.files.values()}
    code, out, err = await streamer(config, "verify", closed=(1,)).ended
    assert (code, err) == (0, "")


@pytest_twisted.ensureDeferred
async def test_cli_fetch_to_standard_output_needs_no_writable_working_folder(tmp_path, upstream):
    """``fetch -o -`` keeps its temporary file in the system's temporary folder, not in the
    working folder (a downloader's default, as Pulp's): run from a folder that is gone (so
    that not even root could write there), the bytes still arrive."""
    body = b"from nowhere\n" * 500
    url = upstream.register("/f.bin", Serve(body))
    config = write_config(tmp_path, upstream)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    command = 'mkdir gone && cd gone && rmdir ../gone && exec "$@"'
    argv = ["sh", "-c", command, "sh", sys.executable, "-m", "streamer.cli"]
    argv += ["--config", str(config), "fetch", url, "--sha256", sha(body), "-o", "-"]
    child = Child()
    reactor.spawnProcess(child, "/bin/sh", argv, env=env, path=str(tmp_path))
    code, out, err = await child.ended
    assert (code, out.encode()) == (0, body), err
    assert sorted(os.listdir(tmp_path)) == ["streamer.toml"]


@pytest_twisted.ensureDeferred
async def test_cli_fetch_into_a_fifo_writes_into_it_and_leaves_it(tmp_path, upstream):
    """``fetch -o TARGET`` where TARGET is not a regular file (a FIFO here; ``/dev/null`` and
    ``/dev/stdout`` alike) writes the validated bytes into it, as curl does (before: the
    temporary file was renamed over it, so a FIFO, or ``/dev/null`` for root, became a
    regular file and the reader waited for ever)."""
    body = b"into the fifo\n" * 5000
    url = upstream.register("/f.bin", Serve(body))
    config = write_config(tmp_path, upstream)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def read() -> bytes:
        with open(fifo, "rb") as reader:
            return reader.read()

    # Held open for reading and writing, so neither the reader's open nor the child's waits,
    # and the reader's end of file comes only once it is closed (after the child ended).
    keeper = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        reading = threads.deferToThread(read)
        code, out, err = await streamer(
            config, "fetch", url, "--sha256", sha(body), "-o", str(fifo)
        ).ended
    finally:
        os.close(keeper)
    got = await reading
    assert (code, err) == (0, ""), out
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got == body
    assert out.splitlines()[-1] == f"written: {fifo}"
    assert sorted(os.listdir(tmp_path)) == ["fifo", "streamer.toml"]


@pytest_twisted.ensureDeferred
async def test_sigkill_half_way_leaves_no_partial_artifact_and_next_sync_completes(
    tmp_path, upstream, repo
):
    stalled = repo.files["files/08.bin"]
    upstream.register("/repo/files/08.bin", StallMidBody(len(stalled) // 2, stalled))
    config = write_config(tmp_path, upstream, download_concurrency=2)
    storage = ArtifactStorage(tmp_path / "var")
    child = streamer(config, "sync")
    for _ in range(500):  # up to 10 s for the other nine files
        if len(list(storage.iter_artifacts())) == 9:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert len(list(storage.iter_artifacts())) == 9
    child.transport.signalProcess("KILL")
    code, _out, _err = await child.ended
    assert code == -9

    assert all(sha(data) == digest for digest, data in artifacts(storage).items())
    assert not storage.has(sha(stalled))
    left_by_kill = set(os.listdir(storage.temp_dir))
    upstream.abort_connections()

    upstream.register("/repo/files/08.bin", Serve(stalled))
    code, out, err = await streamer(config, "sync").ended
    assert code == 0, err
    assert "1 downloaded, 9 already present" in out
    assert artifacts(storage) == {sha(d): d for d in repo.files.values()}
    assert set(os.listdir(storage.temp_dir)) <= left_by_kill


@pytest_twisted.ensureDeferred
async def test_a_helper_killed_mid_sync_is_said_on_stderr(tmp_path, upstream, repo):
    """A sync helper that dies only makes the sync slower (the syncing process fetches its
    files): the command says so in one line on stderr, and still succeeds."""
    gates = []
    for relative, data in sorted(repo.files.items()):
        gates.append(Gated(Serve(data)))
        upstream.register(f"/repo/{relative}", gates[-1])
    config = write_config(tmp_path, upstream, sync_processes=2, download_concurrency=4)
    child = streamer(config, "sync")
    for _ in range(500):  # both processes have files in flight (4 in all)
        if sum(gate.waiting for gate in gates) == 4:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    pid = child.transport.pid
    [helper] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    os.kill(int(helper), signal.SIGKILL)
    await task.deferLater(reactor, 0.2, lambda: None)
    for gate in gates:
        gate.release()
    code, out, err = await child.ended

    assert code == 0, err
    assert "10 downloaded" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert f"sync helper {helper} ended unexpectedly" in warnings[0]
    assert "Traceback" not in err


def children_of(parent: int) -> list[int]:
    """The pids of *parent*'s child processes (from /proc)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            stat_line = Path(f"/proc/{name}/stat").read_text() if name.isdigit() else ""
        except OSError:
            continue
        if stat_line and int(stat_line.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(name))
    return found


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP"])
async def test_sigint_or_a_hang_up_cancels_the_sync_cleanly(tmp_path, upstream, repo, name):
    """Ctrl-C, or the terminal hanging up, signals the sync and its helper process alike:
    downloads in flight are aborted and their temp files removed, the helper ends; exit 130.
    (Before, a SIGHUP ended both at once, their partial downloads left in ``tmp/``.)"""
    stalled = repo.files["files/02.bin"]
    upstream.register("/repo/files/02.bin", StallMidBody(len(stalled) // 2, stalled))
    storage = ArtifactStorage(tmp_path / "var")
    config = write_config(tmp_path, upstream, download_concurrency=2, sync_processes=2)
    child = streamer(config, "sync")
    for _ in range(500):
        if len(list(storage.iter_artifacts())) == 9:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    group = [child.transport.pid, *children_of(child.transport.pid)]
    assert len(group) == 2  # the sync and its helper
    for pid in group:  # as the terminal does: the whole foreground process group
        os.kill(pid, getattr(signal, name))
    code, out, err = await child.ended

    assert (code, out) == (130, ""), err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    ours = f"proc-{os.getpid()}-"  # this test's own ArtifactStorage
    left = [p for p in (tmp_path / "var" / "tmp").rglob("*") if ours not in str(p)]
    assert left == [], left
    assert not any(Path(f"/proc/{pid}").exists() for pid in group)
    assert len(artifacts(storage)) == 9 and not storage.has(sha(stalled))


@pytest_twisted.ensureDeferred
async def test_verify_with_a_broken_catalog_says_so_in_one_line(tmp_path, upstream, repo):
    """A bad artifact is set aside even when the catalog cannot be updated; that failure is
    one line with its reason (it was react's 20-line traceback), and the status still 1."""
    config = write_config(tmp_path, upstream)
    code, _out, err = await streamer(config, "sync").ended
    assert code == 0, err
    storage = ArtifactStorage(tmp_path / "var")
    damaged = storage.path_for(sha(repo.files["files/00.bin"]))
    Path(damaged).write_bytes(b"damaged")
    (tmp_path / "var" / "catalog.sqlite3").write_bytes(b"not a database" * 100)
    for leftover in ("catalog.sqlite3-wal", "catalog.sqlite3-shm"):
        (tmp_path / "var" / leftover).unlink(missing_ok=True)

    code, out, err = await streamer(config, "verify").ended
    assert code == 1
    assert out.startswith("BAD ") and out.endswith(": 9 good, 1 bad\n")
    assert not os.path.exists(damaged)
    assert err.startswith("streamer: could not update the catalog's stored flags: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_importing_the_command_line_runs_no_collection_and_leaves_the_collector_as_it_was():
    """The command's imports (Twisted, its TLS stack, the project) run with the cyclic
    collector off and what they made is frozen out of its sight: no collection walks them
    during a command's start (there were about a hundred). Whoever had it off keeps it off."""
    import subprocess

    # The standard library modules the command's first lines import, and the package, are
    # imported first: how many collections they run depends on what `site` imported already
    # (a virtualenv's `site` imports less), not on the command.
    program = (
        "import argparse, gc, re, sys, typing, urllib.parse\n"
        "import streamer\n"
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: runs.append(1) if phase == 'start' else None)\n"
        "if sys.argv[1] == 'off': gc.disable()\n"
        "import streamer.cli\n"
        "print(len(runs), gc.isenabled(), gc.get_freeze_count() > 10000)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for state, enabled in (("on", "True"), ("off", "False")):
        out = subprocess.run(
            [sys.executable, "-c", program, state], env=env, capture_output=True, text=True
        )
        runs, now, frozen = out.stdout.split()
        assert (int(runs) <= 3, now) == (True, enabled), out.stderr
        assert frozen == ("True" if state == "on" else "False")


def test_once_settled_a_command_runs_few_collections():
    """After `settle_imports`, thousands of live objects made by the command (a sync's
    Deferreds, connections, entries) set off no collection: at Python's threshold of 700
    they set it off every 700 (the older generations' thresholds are left as they were)."""
    import subprocess

    program = (
        "import gc\n"
        "from streamer.collector import settle_imports\n"
        "older = gc.get_threshold()[1:]\n"
        "settle_imports()\n"
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: runs.append(1) if phase == 'start' else None)\n"
        "made = [[] for _ in range(5000)]\n"
        "print(len(runs), gc.get_threshold()[1:] == older)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["0", "True"], out.stderr


def test_the_sync_command_imports_nothing_a_sync_never_uses():
    """What ``streamer sync`` imports (the command line, the importer, its helpers, the
    store) leaves out the content service, metrics, the PostgreSQL driver and the grouped
    downloads; those stay importable, on first use."""
    import subprocess

    unused = (
        "downloaders.group",
        "prometheus_client",
        "psycopg",
        "store.postgres",
        "streamer.content",
        "streamer.service",
    )
    program = (
        "import sys\n"
        "import streamer.cli, importer.sync, importer.helpers.process, importer.helpers.child\n"
        "import importer.progress, store\n"
        f"print(','.join(m for m in {unused!r} if m in sys.modules) or '-')\n"
        "import downloaders\n"
        "print(downloaders.GroupDownloader.__module__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["-", "downloaders.group"], out.stderr


def test_the_command_ends_without_tearing_the_interpreter_down(tmp_path):
    """``python -m streamer.cli`` (and the console script, `streamer.cli.run`) end with the
    command's status once atexit callbacks ran and standard output is flushed, without
    freeing every object first: an object that would be freed in the teardown never is.
    With a non-daemon thread still running, the ordinary exit waits for it."""
    import subprocess

    program = (
        "import atexit, os, runpy, sys, threading\n"
        "class Witness:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(2, b'torn down\\n')\n"
        "witness = Witness()\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "if sys.argv[1] == 'thread':  # it ends once the main thread has ended\n"
        "    main = threading.main_thread()\n"
        "    threading.Thread(target=lambda: (main.join(), print('thread done'))).start()\n"
        "sys.argv = ['streamer', *sys.argv[2:]]\n"
        "runpy.run_module('streamer.cli', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "STREAMER_CONFIG"}
    env["PYTHONPATH"] = str(REPO)

    def command(*args: str, **how: Any) -> subprocess.CompletedProcess[str]:
        how.setdefault("capture_output", True)
        return subprocess.run(
            [sys.executable, "-c", program, *args], env=env, cwd=tmp_path, text=True, **how
        )

    done = command("-", "verify")
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        f"verified 0 artifact(s) in {tmp_path / 'var'}: no store there yet",
        "atexit ran",
    ]
    assert "torn down" not in done.stderr
    refused = command("-", "sync", "nowhere")
    assert refused.returncode == 2
    assert refused.stdout == "atexit ran\n" and "unknown remote 'nowhere'" in refused.stderr
    # Started with standard output closed (sys.stdout is None): nothing to flush there.
    closed = command(
        "-", "verify", capture_output=False, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1)
    )
    assert (closed.returncode, closed.stderr) == (0, "")
    waited = command("thread", "verify")
    assert waited.returncode == 0
    assert waited.stdout.splitlines()[1:] == ["thread done", "atexit ran"]
    assert "torn down" in waited.stderr  # the ordinary exit


def test_output_that_cannot_be_written_is_one_line_and_a_status(tmp_path):
    """A command whose standard output cannot be written (a full device: its print fails at
    once; a reader that went away: the flush at exit fails) ends with status 120 and one
    line on stderr saying so, never a traceback."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "STREAMER_CONFIG"}
    env["PYTHONPATH"] = str(REPO)

    def command(*args: str, stdout: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamer.cli", *args],
            env=env,
            cwd=tmp_path,
            text=True,
            stdout=stdout,
            stderr=subprocess.PIPE,
        )

    with open("/dev/full", "w") as full:
        for args in (["verify"], ["migrate"], ["--help"]):  # (--help: argparse's print)
            ended = command(*args, stdout=full)
            assert (ended.returncode, ended.stderr) == (
                120,
                "streamer: cannot write the standard output: No space left on device\n",
            ), args
    # A pipe whose reader is gone: the line is buffered, its flush at exit fails.
    read, write = os.pipe()
    os.close(read)
    try:
        ended = command("verify", stdout=write)
    finally:
        os.close(write)
    assert (ended.returncode, ended.stderr) == (
        120,
        "streamer: cannot write the standard output: Broken pipe\n",
    )
