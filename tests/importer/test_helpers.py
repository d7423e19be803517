"""A sync's helper processes (`importer.helpers`): real helper processes, a real loopback upstream,
SQLite catalog and artifact storage. Requests are held at the upstream (`Gated`) until both
the syncing process and its helper have files in flight, so each test knows who did what."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from downloaders.settings import SettingsError
from importer import sync_remote
from importer.helpers.process import AUTO_MIN_FILES, SyncHelpers, helper_count
from importer.helpers.protocol import WINDOW_PER_SLOT
from tests.importer.conftest import artifacts, content, sha, temp_files
from tests.support.faults import Gated, Serve, WrongBytes
from tests.support.polling import holds_within, until

REPO = Path(__file__).resolve().parents[2]


#: A gated sync's helper: 3 download slots (``download_concurrency = 4``, 1 kept here).
HELPER_SLOTS = 3


def outlast_the_window(repo) -> None:
    """Files enough that some are still in the listing while the gated downloads are held
    (the helper holds `WINDOW_PER_SLOT` per slot; the listing exhausted, it would give its
    waiting files back at once)."""
    for i in range(len(repo.files), 1 + HELPER_SLOTS * WINDOW_PER_SLOT + 4):
        repo.put(f"files/{i:02d}.bin", content(i))
    repo.publish()


def gate_every_file(repo, upstream, then=Serve) -> list[Gated]:
    gates = []
    for relative, data in sorted(repo.files.items()):
        gate = Gated(then(data))
        upstream.register(f"/repo/{relative}", gate)
        gates.append(gate)
    return gates


async def started_helpers(count: int = 1) -> SyncHelpers:
    helpers = SyncHelpers(count).start()
    await helpers.wait_started()
    return helpers


def waiting(gates: list[Gated]) -> int:
    return sum(gate.waiting for gate in gates)


@contextlib.asynccontextmanager
async def gated_sync(repo, upstream, remote, catalog, storage, then=Serve):
    """A sync with one started helper, every file held at the upstream until both processes
    have files in flight (4 in all); yields ``(helpers, gates, syncing)``; closes the
    helper after."""
    outlast_the_window(repo)
    helpers = await started_helpers()
    try:
        gates = gate_every_file(repo, upstream, then)
        syncing = sync_remote(remote, catalog, storage, None, helpers)
        await until(lambda: waiting(gates) == 1 + HELPER_SLOTS, timeout=20)  # 1 here
        yield helpers, gates, syncing
    finally:
        await helpers.close()


def release(gates: list[Gated]) -> None:
    for gate in gates:
        gate.release()


@pytest_twisted.ensureDeferred
async def test_a_helper_process_shares_the_downloads(repo, storage, catalog, make_remote, upstream):
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    async with gated_sync(repo, upstream, remote, catalog, storage) as (helpers, gates, syncing):
        release(gates)
        report = await syncing

    total = len(repo.files)
    assert (report.downloaded, report.failed, report.already_present) == (total, [], 0)
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}
    assert all(e.stored for e in await catalog.entries_for_remote("fixtures"))
    [link] = helpers.links
    # The helper stored the 3 files it had in flight and maybe more; the syncing process at
    # least the one it had in flight.
    assert HELPER_SLOTS <= link.stored <= total - 1
    assert all(process.poll() is not None for process in helpers.processes)
    assert temp_files(storage) == []


@pytest_twisted.ensureDeferred
async def test_a_helper_keeps_its_slots_busy_while_the_syncing_process_does_not_answer(
    repo, storage, catalog, make_remote, upstream
):
    """A helper holds four files per download slot: while the syncing process is slow to
    hand out the next one (busy with its own downloads and commits), the helper's slots
    start files it already holds instead of waiting."""
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    async with gated_sync(repo, upstream, remote, catalog, storage) as (helpers, gates, syncing):
        [link] = helpers.links
        link.transport.pauseProducing()  # the syncing process hears nothing from the helper
        held = link.held
        files = sorted(repo.files.items())  # (as gate_every_file made the gates)
        by_sha = {sha(data): gate for (_, data), gate in zip(files, gates, strict=True)}
        for sha256 in held:  # (this process's own download stays held at the upstream)
            by_sha[sha256].release()
        await until(lambda: set(artifacts(storage)) == held, timeout=20)
        assert len(held) == 4 * HELPER_SLOTS
        link.transport.resumeProducing()
        release(gates)
        report = await syncing

    assert (report.downloaded, report.failed) == (len(repo.files), [])
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}


@pytest_twisted.ensureDeferred
async def test_connections_stay_within_download_concurrency_as_the_listing_runs_out(
    repo, storage, catalog, make_remote, upstream
):
    """Once every file is handed out, the helper gives back those it has not started, and
    the syncing process downloads them within its own share, beside its own downloads: at
    most ``download_concurrency`` downloads in all, to the end (before, the files given
    back were all asked for at once)."""
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    helpers = await started_helpers()
    try:
        gates = gate_every_file(repo, upstream)  # 10 files: 1 here, 9 held by the helper
        syncing = sync_remote(remote, catalog, storage, None, helpers)
        await until(lambda: waiting(gates) == 1 + HELPER_SLOTS, timeout=20)
        [link] = helpers.links
        await until(lambda: link.held and len(link.held) == HELPER_SLOTS)  # 6 given back
        assert not await holds_within(lambda: waiting(gates) > 1 + HELPER_SLOTS, timeout=1.0)
        release(gates)
        report = await syncing
    finally:
        await helpers.close()

    assert (report.downloaded, report.failed) == (len(repo.files), [])
    assert upstream.max_concurrent_connections <= 1 + HELPER_SLOTS


@pytest_twisted.ensureDeferred
async def test_failures_in_a_helper_are_reported_like_our_own(
    repo, storage, catalog, make_remote, upstream
):
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    async with gated_sync(repo, upstream, remote, catalog, storage, WrongBytes) as started:
        _helpers, gates, syncing = started
        release(gates)
        report = await syncing

    assert report.downloaded == 0 and len(report.failed) == len(repo.files)
    assert sorted(url for url, _ in report.failed) == [
        upstream.url(f"/repo/{relative}") for relative in sorted(repo.files)
    ]
    assert all("sha256 mismatch" in reason for _, reason in report.failed)
    assert artifacts(storage) == {} and temp_files(storage) == []
    assert not any(e.stored for e in await catalog.entries_for_remote("fixtures"))


@pytest_twisted.ensureDeferred
async def test_a_helper_s_last_file_failing_is_in_the_report(
    repo, storage, catalog, make_remote, upstream
):
    """The helper, ready first, takes the listing's only file, which is not there upstream:
    its failure is in the report the sync fires with (before, the helper's slot was let go
    first, so the sync ended, and was reported, before the failure was counted)."""
    for relative in list(repo.files):
        repo.drop(relative)
    repo.publish((f"files/gone.bin,{sha(b'gone')},4",))
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    helpers = await started_helpers()
    try:
        report = await sync_remote(remote, catalog, storage, None, helpers)
        failed_then = list(report.failed)
    finally:
        await helpers.close()

    assert helpers.links[0].stored == 0
    assert [url for url, _ in failed_then] == [upstream.url("/repo/files/gone.bin")]
    assert "404" in failed_then[0][1]
    assert artifacts(storage) == {} and temp_files(storage) == []


@pytest_twisted.ensureDeferred
async def test_a_twin_of_a_file_that_failed_in_a_helper_is_fetched_from_its_own_path(
    repo, storage, catalog, make_remote, upstream
):
    """Two paths, one sha256: the first is not there upstream, the second is. The twin waits
    for the first, then is fetched from its own path (handed out as the first is counted)."""
    data = repo.files["files/05.bin"]
    for relative in list(repo.files):
        if relative != "files/05.bin":
            repo.drop(relative)
    gone = f"files/00-gone.bin,{sha(data)},{len(data)}"
    (repo.folder / "PULP_MANIFEST").write_text(f"{gone}\nfiles/05.bin,{sha(data)},{len(data)}\n")
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    helpers = await started_helpers()
    try:
        report = await sync_remote(remote, catalog, storage, None, helpers)
        outcome = (report.downloaded, list(report.failed))
    finally:
        await helpers.close()

    assert outcome[0] == 1
    assert [url for url, _ in outcome[1]] == [upstream.url("/repo/files/00-gone.bin")]
    assert artifacts(storage) == {sha(data): data} and temp_files(storage) == []
    entries = await catalog.entries_for_remote("fixtures")
    assert {e.path: e.stored for e in entries} == {
        "fixtures/files/00-gone.bin": True,
        "fixtures/files/05.bin": True,
    }


@pytest_twisted.ensureDeferred
async def test_a_killed_helper_s_files_are_fetched_by_the_syncing_process(
    repo, storage, catalog, make_remote, upstream
):
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    async with gated_sync(repo, upstream, remote, catalog, storage) as (helpers, gates, syncing):
        [process] = helpers.processes
        os.kill(process.pid, signal.SIGKILL)
        await until(lambda: not helpers.links[0].alive)
        release(gates)
        report = await syncing

    assert (report.downloaded, report.failed) == (len(repo.files), [])
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}
    assert all(e.stored for e in await catalog.entries_for_remote("fixtures"))
    assert helpers.links[0].stored == 0
    # Nothing is left of the dead helper's downloads: its temp folder was removed.
    dead = f"proc-{process.pid}-"
    assert [name for name in os.listdir(storage.temp_root) if name.startswith(dead)] == []


@pytest_twisted.ensureDeferred
async def test_a_cancelled_sync_stops_its_helper_and_leaves_no_partial_file(
    repo, storage, catalog, make_remote, upstream
):
    remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
    async with gated_sync(repo, upstream, remote, catalog, storage) as (helpers, _gates, syncing):
        syncing.cancel()
        with pytest.raises(defer.CancelledError):
            await syncing
        await until(lambda: not helpers.links[0].alive)  # the helper was stopped

    assert all(process.poll() is not None for process in helpers.processes)
    assert artifacts(storage) == {} and temp_files(storage) == []


@pytest_twisted.ensureDeferred
async def test_helpers_serve_one_remote_after_another(
    repo, storage, catalog, make_remote, upstream
):
    helpers = await started_helpers()
    try:
        first = make_remote("immediate", download_concurrency=4, sync_processes=2)
        report = await sync_remote(first, catalog, storage, None, helpers)
        assert (report.downloaded, report.failed) == (10, [])
        repo.put("files/new.bin", b"added later\n" * 100)
        repo.publish()
        second = make_remote("immediate", name="again", download_concurrency=4, sync_processes=2)
        report = await sync_remote(second, catalog, storage, None, helpers)
    finally:
        await helpers.close()

    assert (report.downloaded, report.already_present, report.failed) == (1, 10, [])
    assert storage.has(sha(b"added later\n" * 100))


@pytest_twisted.ensureDeferred
async def test_a_helper_is_set_up_for_the_remote_while_its_listing_is_fetched(
    repo, storage, catalog, make_remote, upstream
):
    """A helper started beforehand gets the remote's settings as the sync begins: it builds its
    client and storage while the listing is fetched and checked, and is ready to download
    when the first file is handed out."""
    listing = Gated(Serve((repo.folder / "PULP_MANIFEST").read_bytes()))
    upstream.register("/repo/PULP_MANIFEST", listing)
    helpers = await started_helpers()
    try:
        remote = make_remote("immediate", download_concurrency=4, sync_processes=2)
        syncing = sync_remote(remote, catalog, storage, None, helpers)
        await until(lambda: listing.waiting == 1)
        [link] = helpers.links
        await until(lambda: link.ready is not None and link.ready.called)
        assert listing.waiting == 1  # the listing is still on its way
        listing.release()
        report = await syncing
    finally:
        await helpers.close()

    assert (report.downloaded, report.failed) == (10, [])
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}


def test_sync_processes_is_validated(make_remote):
    for bad in (-1, 65, "2", True, 1.5):
        with pytest.raises(SettingsError, match="sync_processes"):
            make_remote("immediate", sync_processes=bad)
    assert make_remote("immediate").sync_processes == 0  # auto


def test_who_gets_helpers(make_remote, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert helper_count(make_remote("immediate")) == 1  # auto: one per CPU
    assert helper_count(make_remote("immediate"), AUTO_MIN_FILES - 1) == 0  # not worth it
    assert helper_count(make_remote("immediate"), AUTO_MIN_FILES) == 1
    assert helper_count(make_remote("immediate", sync_processes=1)) == 0
    assert helper_count(make_remote("immediate", sync_processes=3)) == 2  # as configured
    assert helper_count(make_remote("immediate", sync_processes=8, download_concurrency=3)) == 2
    assert helper_count(make_remote("immediate", download_concurrency=1)) == 0
    assert helper_count(make_remote("on_demand")) == 0  # nothing to download
    assert helper_count(make_remote("immediate", rate_limit=5)) == 0  # each would apply it
    importer = "tests.importer.plugins:JsonListingImporter"
    assert helper_count(make_remote("immediate", importer=importer)) == 0


FORKED_SYNC = """
import json, sys
from twisted.internet import defer, task
from importer import Remote, sync_remote
from importer.helpers.process import SyncHelpers, _ForkedProcess, can_fork
from store import ArtifactStorage, open_catalog

assert can_fork()
remote = Remote(name="fixtures", url=sys.argv[1], policy="immediate", download_concurrency=4)
helpers = SyncHelpers(1).start()  # before the reactor: forked
assert isinstance(helpers.processes[0], _ForkedProcess)

@defer.inlineCallbacks
def main(reactor):
    storage = ArtifactStorage(sys.argv[2])
    catalog = open_catalog("", storage.root)
    yield catalog.open()
    report = yield sync_remote(remote, catalog, storage, None, helpers)
    yield helpers.close()
    yield remote.close()
    yield catalog.close()
    print(json.dumps({"downloaded": report.downloaded, "failed": report.failed,
                      "exited": [p.poll() for p in helpers.processes]}))

task.react(main)
"""


@pytest_twisted.ensureDeferred
async def test_helpers_started_before_the_reactor_are_forked(repo, upstream, tmp_path):
    from twisted.internet import utils

    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable,
        ["-c", FORKED_SYNC, upstream.url("/repo/PULP_MANIFEST"), str(tmp_path / "var")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        path=str(REPO),
    )
    assert code == 0, err.decode()
    result = json.loads(out.decode().splitlines()[-1])
    assert result == {"downloaded": 10, "failed": [], "exited": [0]}


IMPORTS_AFTER_THE_FORK = """
import os, sys
parent = os.getpid()

def note(event, args):  # every module a helper imports, once forked
    if event == "import" and os.getpid() != parent:
        with open(sys.argv[1], "a") as f:
            f.write(args[0] + "\\n")

sys.addaudithook(note)
from importer.helpers.process import SyncHelpers

helpers = SyncHelpers(1).start()
for _process, sock in helpers._spawned:
    sock.close()  # the helper ends when its connection does
print(helpers.processes[0].wait())
"""


def test_a_forked_helper_starts_with_what_it_runs_imported(tmp_path):
    """Its module and the reactor's are imported before the fork, not again by each helper
    after it: the helper only installs the reactor."""
    log = tmp_path / "imports"
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER_THE_FORK, str(log)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert done.returncode == 0 and done.stdout.split() == ["0"], done.stderr
    assert set(log.read_text().split()) == {"twisted.internet.reactor"}


def test_the_helper_module_refuses_a_bad_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "importer.helpers", "nonsense"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert done.returncode == 2 and "usage" in done.stderr


@pytest_twisted.ensureDeferred
async def test_a_helper_that_cannot_start_leaves_the_sync_to_this_process(
    repo, storage, catalog, make_remote, monkeypatch
):
    def refuse(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(SyncHelpers, "_spawn", refuse)
    helpers = SyncHelpers(2).start()
    assert helpers.processes == [] and helpers.count == 0
    remote = make_remote("immediate", download_concurrency=4, sync_processes=3)
    try:
        report = await sync_remote(remote, catalog, storage, None, helpers)
    finally:
        await helpers.close()
    assert (report.downloaded, report.failed) == (10, [])


def _connected_pair(protocol):
    """*protocol* on one end of a real socket pair adopted by the reactor; the other end,
    blocking, for the test to read and write."""
    import socket

    from twisted.internet import reactor

    from importer.helpers.protocol import SingleProtocolFactory

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, SingleProtocolFactory(protocol))
    ours.close()  # the reactor has its own copy
    theirs.setblocking(False)
    return theirs


async def _lines(sock, count: int) -> list[bytes]:
    """The next *count* lines the reactor's end sent (read while the reactor runs)."""
    received = bytearray()

    def enough() -> bool:
        try:
            received.extend(sock.recv(65536))
        except BlockingIOError:
            pass
        return received.count(b"\n") >= count

    await until(enough, timeout=10)
    return bytes(received).splitlines()[:count]


@pytest_twisted.ensureDeferred
async def test_a_helper_reports_the_files_of_one_commit_batch_in_one_message():
    """The files a commit batch stored (their outcomes come in one reactor turn) reach the
    syncing process as one ``stored`` message: one line for it to read per batch, not one per
    file. A file stored in a later turn is another message."""
    from importer.helpers.child import HelperSide

    side = HelperSide()
    other = _connected_pair(side)
    try:
        [hello] = await _lines(other, 1)
        stored = [(f"{n:064x}", f"http://127.0.0.1:1/{n}.bin") for n in range(3)]
        for sha256, url in stored:  # one batch's outcomes, in one turn
            side._stored(sha256, url)
        [first] = await _lines(other, 1)
        side._stored("f" * 64, "http://127.0.0.1:1/later.bin")
        [second] = await _lines(other, 1)
    finally:
        other.close()
        await side.finished
    assert json.loads(hello)["op"] == "hello"
    assert json.loads(first) == {"op": "stored", "files": [list(file) for file in stored]}
    assert json.loads(second) == {
        "op": "stored",
        "files": [["f" * 64, "http://127.0.0.1:1/later.bin"]],
    }


@pytest_twisted.ensureDeferred
async def test_a_stored_message_ends_each_of_its_files_in_the_syncing_process():
    """Each file of a ``stored`` message is counted, reported and its slot let go; the link
    is idle once the last one is."""
    from importer.helpers.handout import HelperLink
    from importer.helpers.protocol import encode_message
    from store.catalog import CatalogEntry

    class Process:
        pid = 0

    link = HelperLink(Process())
    other = _connected_pair(link)
    reported = []
    try:
        link.configure({}, "/nowhere", 3, lambda *a: reported.append(a), None, None)
        entries = [
            CatalogEntry(
                path=f"r/{n}.bin",
                remote="r",
                url=f"http://127.0.0.1:1/{n}.bin",
                size=1,
                digests={"sha256": f"{n:064x}"},
            )
            for n in range(3)
        ]
        slots = [link.fetch([entry]) for entry in entries]
        idle = link.finish()
        files = [[entry.sha256, entry.url] for entry in entries]
        other.send(encode_message({"op": "stored", "files": files}) + b"\n")
        await until(lambda: idle.called, timeout=10)
    finally:
        other.close()
        await link.lost
    assert reported == [(entry.sha256, entry.url) for entry in entries]
    assert link.stored == 3 and all(slot.called for slot in slots) and link.held == frozenset()
