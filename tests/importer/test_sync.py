"""sync_remote against a real loopback upstream, a real SQLite catalog and artifact storage."""

from __future__ import annotations

import os
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from importer import SyncError, SyncReport, sync_remote
from tests.importer.conftest import Repo, artifacts, content, sha, temp_files
from tests.support.faults import RequireBasicAuth, Serve, StallMidBody, Status, WrongBytes
from tests.support.upstream import UpstreamServer


def stored_flags(entries) -> dict[str, bool]:
    return {e.path: e.stored for e in entries}


@pytest_twisted.ensureDeferred
async def test_immediate_sync_stores_every_file(repo, storage, catalog, make_remote, upstream):
    remote = make_remote("immediate")
    report = await sync_remote(remote, catalog, storage)

    assert isinstance(report, SyncReport)
    assert (report.total, report.downloaded, report.already_present) == (10, 10, 0)
    assert report.failed == [] and report.ok and report.recorded_lazily == 0
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}
    entries = await catalog.entries_for_remote("fixtures")
    assert [e.path for e in entries] == [f"fixtures/{rel}" for rel in sorted(repo.files)]
    assert all(e.stored for e in entries)
    assert entries[0].url == upstream.url("/repo/files/00.bin")
    assert entries[0].digests == {"sha256": sha(repo.files["files/00.bin"])}
    assert temp_files(storage) == []  # the manifest's temp file is gone too


@pytest_twisted.ensureDeferred
async def test_credentials_in_the_remote_url_are_sent_and_never_recorded(
    tmp_path, storage, catalog, make_remote, upstream
):
    """A remote configured as ``http://user:password@host/.../PULP_MANIFEST`` syncs: the
    listing and every file are fetched with those credentials (before, the listing's request
    failed with "not a url this client sends"), and no url the catalog records holds them."""
    private = Repo(tmp_path / "private")
    for i in range(3):
        private.put(f"files/{i:02d}.bin", content(i))
    private.publish()
    for relative in ["PULP_MANIFEST", *private.files]:
        data = (private.folder / relative).read_bytes()
        upstream.register(f"/private/{relative}", RequireBasicAuth("alice", "p@ss", Serve(data)))
    url = upstream.url("/private/PULP_MANIFEST").replace("://", "://alice:p%40ss@", 1)
    remote = make_remote("immediate", url=url)
    report = await sync_remote(remote, catalog, storage)

    assert (report.downloaded, report.failed) == (3, [])
    assert artifacts(storage) == {sha(data): data for data in private.files.values()}
    entries = await catalog.entries_for_remote("fixtures")
    assert [e.url for e in entries] == [
        upstream.url(f"/private/{relative}") for relative in sorted(private.files)
    ]


@pytest_twisted.ensureDeferred
async def test_credentials_in_a_mirror_url_are_sent_to_it_and_never_recorded(
    repo, storage, catalog, make_remote, upstream, upstream_factory
):
    """A mirror configured as ``http://user:password@mirror/...``: a file that fails at the
    remote's own url is fetched from the mirror with those credentials, and the catalog's
    mirror urls do not hold them (before: recorded as configured, password and all)."""
    mirror = upstream_factory()
    for relative in repo.files:
        data = (repo.folder / relative).read_bytes()
        mirror.register(f"/m/{relative}", RequireBasicAuth("bob", "s:cr@t", Serve(data)))
    upstream.register("/repo/files/03.bin", Status(500))
    login = mirror.url("/m/").replace("://", "://bob:s%3Acr%40t@", 1)
    report = await sync_remote(make_remote("immediate", mirrors=[login]), catalog, storage)

    assert (report.downloaded, report.failed) == (10, [])
    assert storage.has(sha(repo.files["files/03.bin"]))
    [(path, sent)] = mirror.all_requests()
    assert path == "/m/files/03.bin" and sent.headers["authorization"].startswith("Basic ")
    entries = await catalog.lookup("fixtures/files/03.bin")
    assert [e.url for e in entries] == [
        upstream.url("/repo/files/03.bin"),
        mirror.url("/m/files/03.bin"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_remote_named_by_an_ipv6_literal_syncs(tmp_path, storage, catalog, make_remote):
    """``http://[::1]:PORT/...``: the manifest is fetched and every file downloaded (before:
    the sync failed at once with ``Codepoint U+003A ... of '::1' not allowed``: treq makes
    every URL a URI with hyperlink, which IDNA-encodes the host, even an IPv6 literal)."""
    repo = Repo(tmp_path / "v6")
    for i in range(3):
        repo.put(f"files/{i:02d}.bin", content(i))
    repo.publish()
    server = UpstreamServer().listen(interface="::1")
    try:
        server.serve_tree("/repo", repo.folder)
        for policy in ("on_demand", "immediate"):
            remote = make_remote(policy, url=server.url("/repo/PULP_MANIFEST"))
            report = await sync_remote(remote, catalog, storage)
            assert report.ok and report.total == 3, report
        assert artifacts(storage) == {sha(data): data for data in repo.files.values()}
        entries = await catalog.entries_for_remote("fixtures")
        assert entries[0].url == f"http://[::1]:{server.port}/repo/files/00.bin"
        assert all(e.stored for e in entries)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_resync_does_not_download_stored_files_again(
    repo, storage, catalog, make_remote, upstream
):
    remote = make_remote("immediate")
    await sync_remote(remote, catalog, storage)
    upstream.clear_log()
    report = await sync_remote(remote, catalog, storage)

    assert (report.downloaded, report.already_present, report.removed) == (0, 10, 0)
    assert [path for path, _ in upstream.all_requests()] == ["/repo/PULP_MANIFEST"]


@pytest.mark.parametrize("policy", ["on_demand", "streamed"])
@pytest_twisted.ensureDeferred
async def test_lazy_policies_only_record(policy, repo, storage, catalog, make_remote, upstream):
    remote = make_remote(policy)
    report = await sync_remote(remote, catalog, storage)

    assert (report.recorded_lazily, report.downloaded, report.already_present) == (10, 0, 0)
    assert artifacts(storage) == {}
    assert [path for path, _ in upstream.all_requests()] == ["/repo/PULP_MANIFEST"]
    entries = await catalog.lookup("fixtures/files/03.bin")
    assert [(e.url, e.size, e.stored) for e in entries] == [
        (upstream.url("/repo/files/03.bin"), 2048, False)
    ]


@pytest_twisted.ensureDeferred
async def test_lazy_sync_records_already_stored_content_as_stored(
    repo, storage, catalog, make_remote
):
    await sync_remote(make_remote("immediate"), catalog, storage)
    report = await sync_remote(make_remote("on_demand", name="lazy"), catalog, storage)

    assert report.recorded_lazily == 10
    assert all(e.stored for e in await catalog.entries_for_remote("lazy"))


@pytest_twisted.ensureDeferred
async def test_resync_after_upstream_changes(repo, storage, catalog, make_remote, upstream):
    remote = make_remote("immediate")
    await sync_remote(remote, catalog, storage)
    old_sha = sha(repo.files["files/05.bin"])

    repo.put("files/new.bin", b"a new file\n")  # added
    repo.drop("files/02.bin")  # removed
    repo.put("files/05.bin", b"changed content\n")  # content changed
    repo.publish()
    upstream.clear_log()
    report = await sync_remote(remote, catalog, storage)

    assert (report.downloaded, report.already_present, report.removed) == (2, 8, 1)
    fetched = sorted(path for path, _ in upstream.all_requests())
    assert fetched == ["/repo/PULP_MANIFEST", "/repo/files/05.bin", "/repo/files/new.bin"]
    assert await catalog.lookup("fixtures/files/02.bin") == []
    [changed] = await catalog.lookup("fixtures/files/05.bin")
    assert changed.sha256 == sha(b"changed content\n") != old_sha and changed.stored
    [added] = await catalog.lookup("fixtures/files/new.bin")
    assert added.stored and storage.has(sha(b"a new file\n"))
    assert len(await catalog.entries_for_remote("fixtures")) == 10


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("files/x.bin,abc,12", "sha256 must be 64 hex"),
        ("files/x.bin," + "0" * 64 + ",-1", "must not be negative"),
        ("/etc/passwd," + "0" * 64 + ",1", "absolute"),
        ("../x," + "0" * 64 + ",1", "'..'"),
        ("only,two", "expected 3"),
        ("files/x.bin," + "0" * 64 + ",9223372036854775808", "size must be at most"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_corrupt_manifest_fails_before_touching_the_catalog(
    bad_line, reason, repo, storage, catalog, make_remote, upstream
):
    remote = make_remote("immediate")
    await sync_remote(remote, catalog, storage)
    before = await catalog.entries_for_remote("fixtures")

    repo.drop("files/00.bin")
    repo.put("files/added.bin", b"should not be fetched")
    repo.publish(extra_lines=("files/ok.bin," + "1" * 64 + ",5", bad_line))
    upstream.clear_log()
    with pytest.raises(SyncError) as caught:
        await sync_remote(remote, catalog, storage)

    # The line is named in the listing as published (it was the temporary file's name,
    # `.download-<random> line 12`, which is nowhere to be found).
    assert "PULP_MANIFEST line 12: " in str(caught.value) and reason in str(caught.value)
    assert "catalog unchanged" in str(caught.value)
    assert await catalog.entries_for_remote("fixtures") == before
    assert [path for path, _ in upstream.all_requests()] == ["/repo/PULP_MANIFEST"]
    assert temp_files(storage) == []


@pytest_twisted.ensureDeferred
async def test_unreachable_manifest_is_a_sync_error(storage, catalog, make_remote, upstream):
    upstream.register("/repo/PULP_MANIFEST", Status(404))
    with pytest.raises(SyncError, match="cannot fetch the listing: HTTP 404"):
        await sync_remote(make_remote("immediate"), catalog, storage)
    assert await catalog.count() == 0


@pytest_twisted.ensureDeferred
async def test_a_listing_over_the_size_limit_fails_once_and_leaves_the_catalog(
    repo, storage, catalog, make_remote, upstream
):
    """A manifest bigger than the importer's ``max_listing_size`` (an upstream that never ends
    its body, a gzip bomb) fails the sync once the limit is passed, without asking again: it
    was written to the storage's temporary folder until the disk was full."""
    remote = make_remote("on_demand", max_retries=2)
    await sync_remote(remote, catalog, storage)
    before = await catalog.entries_for_remote("fixtures")
    endless = b"".join(b"files/%06d.bin,%s,1\n" % (i, b"a" * 64) for i in range(20_000))
    upstream.register("/repo/PULP_MANIFEST", Serve(endless, chunked=True))
    remote.get_importer().max_listing_size = 64 * 1024
    upstream.clear_log()

    with pytest.raises(SyncError, match="cannot fetch the listing: listing bigger than 65536"):
        await sync_remote(remote, catalog, storage)
    assert len(upstream.requests("/repo/PULP_MANIFEST")) == 1, "not tried again"
    assert await catalog.entries_for_remote("fixtures") == before
    assert temp_files(storage) == []


@pytest_twisted.ensureDeferred
async def test_wrong_bytes_are_reported_and_not_stored(
    repo, storage, catalog, make_remote, upstream
):
    upstream.register("/repo/files/04.bin", WrongBytes(repo.files["files/04.bin"]))
    report = await sync_remote(make_remote("immediate"), catalog, storage)

    assert (report.downloaded, len(report.failed)) == (9, 1) and not report.ok
    [(url, reason)] = report.failed
    assert url == upstream.url("/repo/files/04.bin")
    assert "sha256 mismatch" in reason
    assert not storage.has(sha(repo.files["files/04.bin"]))
    assert len(artifacts(storage)) == 9
    flags = stored_flags(await catalog.entries_for_remote("fixtures"))
    assert flags.pop("fixtures/files/04.bin") is False
    assert all(flags.values())
    assert temp_files(storage) == []


@pytest_twisted.ensureDeferred
async def test_mirrors_are_recorded_in_order_and_used_for_failover(
    repo, storage, catalog, make_remote, upstream, upstream_factory
):
    first, second = upstream_factory(), upstream_factory()
    first.serve_tree("/m1", repo.folder)
    second.serve_tree("/m2/", repo.folder)
    upstream.register("/repo/files/07.bin", Status(500))
    first.register("/m1/files/07.bin", Status(404))
    remote = make_remote("immediate", mirrors=[first.url("/m1"), second.url("/m2/")])
    report = await sync_remote(remote, catalog, storage)

    entries = await catalog.lookup("fixtures/files/07.bin")
    assert [(e.position, e.url) for e in entries] == [
        (0, upstream.url("/repo/files/07.bin")),
        (1, first.url("/m1/files/07.bin")),
        (2, second.url("/m2/files/07.bin")),
    ]
    assert (report.downloaded, report.failed) == (10, [])
    assert storage.has(sha(repo.files["files/07.bin"]))
    assert len(second.requests("/m2/files/07.bin")) == 1
    assert second.all_requests() == [("/m2/files/07.bin", second.requests("/m2/files/07.bin")[0])]


@pytest_twisted.ensureDeferred
async def test_every_source_failing_names_each_in_the_reason(
    repo, storage, catalog, make_remote, upstream, upstream_factory
):
    mirror = upstream_factory()
    upstream.register("/repo/files/01.bin", Status(404))
    remote = make_remote("immediate", mirrors=[mirror.url("/nothing-here/")])
    report = await sync_remote(remote, catalog, storage)

    assert report.downloaded == 9
    [(url, reason)] = report.failed
    assert url == upstream.url("/repo/files/01.bin")
    assert reason.startswith(upstream.url("/repo/files/01.bin") + ": HTTP 404")
    assert mirror.url("/nothing-here/files/01.bin") + ": HTTP 404" in reason


@pytest_twisted.ensureDeferred
async def test_same_content_under_two_paths_is_downloaded_once(
    repo, storage, catalog, make_remote, upstream
):
    repo.put("copies/00.bin", repo.files["files/00.bin"])
    repo.publish()
    report = await sync_remote(make_remote("immediate"), catalog, storage)

    assert (report.downloaded, report.already_present, report.failed) == (10, 1, [])
    fetched = [p for p, _ in upstream.all_requests() if p.endswith("00.bin")]
    assert len(fetched) == 1
    assert all(e.stored for e in await catalog.lookup("fixtures/copies/00.bin"))


@pytest_twisted.ensureDeferred
async def test_concurrency_is_bounded(repo, storage, catalog, make_remote, upstream):
    for i in range(30):
        repo.put(f"more/{i}.bin", content(100 + i))
    repo.publish()
    report = await sync_remote(make_remote("immediate", download_concurrency=3), catalog, storage)

    assert report.downloaded == 40
    assert upstream.max_concurrent_connections <= 3


@pytest_twisted.ensureDeferred
async def test_cancelled_sync_leaves_no_partial_artifact_and_next_sync_completes(
    repo, storage, catalog, make_remote, upstream
):
    """Kill-safety in process: a sync stopped mid-download keeps artifacts/ whole."""
    stalled = repo.files["files/06.bin"]
    upstream.register("/repo/files/06.bin", StallMidBody(len(stalled) // 2, stalled))
    remote = make_remote("immediate", download_concurrency=2)
    sync = sync_remote(remote, catalog, storage)
    while len(artifacts(storage)) < 9:  # every other file is done; 06 is half-way
        await task.deferLater(reactor, 0.02, lambda: None)
    assert not sync.called
    sync.cancel()
    with pytest.raises(defer.CancelledError):
        await sync

    assert all(sha(data) == digest for digest, data in artifacts(storage).items())
    assert not storage.has(sha(stalled))
    assert temp_files(storage) == []
    upstream.abort_connections()

    upstream.register("/repo/files/06.bin", Serve(stalled))
    report = await sync_remote(remote, catalog, storage)
    assert (report.downloaded, report.already_present, report.failed) == (1, 9, [])
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}
    assert all(e.stored for e in await catalog.entries_for_remote("fixtures"))


@pytest_twisted.ensureDeferred
async def test_stored_files_keep_the_upstreams_last_modified(
    repo, storage, catalog, make_remote, upstream
):
    """The artifact's modification time is the upstream's Last-Modified, so the streamer
    answers with the date the upstream published (a `wget -m` mirror fetches nothing twice)."""
    published = 1445412480  # Wed, 21 Oct 2015 07:28:00 GMT
    for relative in repo.files:
        os.utime(repo.folder / relative, (published, published))
    await sync_remote(make_remote("immediate"), catalog, storage)
    for data in repo.files.values():
        assert os.stat(storage.path_for(sha(data))).st_mtime == published


@pytest_twisted.ensureDeferred
async def test_a_last_modified_in_the_future_is_stored_as_now(
    repo, storage, catalog, make_remote, upstream
):
    """An upstream clock ahead of ours must not date the stored copy in the future (RFC 9110
    section 8.8.2.1): the modification time is the moment of the download instead."""
    future = time.time() + 7 * 86400
    for relative in repo.files:
        os.utime(repo.folder / relative, (future, future))
    before = time.time()
    await sync_remote(make_remote("immediate"), catalog, storage)
    for data in repo.files.values():
        assert before - 1 <= os.stat(storage.path_for(sha(data))).st_mtime <= time.time()


class SlowRecordingCatalog:
    """The real catalog, but ``replace_remote`` ends only when the test says so (or fails)."""

    def __init__(self, catalog, fail: Exception | None = None) -> None:
        self.catalog = catalog
        self.fail = fail
        self.release: defer.Deferred[None] = defer.Deferred()

    def __getattr__(self, name):
        return getattr(self.catalog, name)

    def replace_remote(self, remote, entries):
        recorded = self.catalog.replace_remote(remote, entries)

        def later(result):
            if self.fail is not None:
                raise self.fail
            return self.release.addCallback(lambda _: result)

        return recorded.addCallback(later)


@pytest_twisted.ensureDeferred
async def test_files_stored_while_the_listing_is_recorded_are_marked_after(
    repo, storage, catalog, make_remote
):
    slow = SlowRecordingCatalog(catalog)
    syncing = sync_remote(make_remote("immediate"), slow, storage)
    for _ in range(500):  # every file is stored before the catalog has the listing
        if len(artifacts(storage)) == 10:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert len(artifacts(storage)) == 10 and not syncing.called
    slow.release.callback(None)
    report = await syncing

    assert (report.downloaded, report.failed) == (10, [])
    assert all(e.stored for e in await catalog.entries_for_remote("fixtures"))


@pytest_twisted.ensureDeferred
async def test_a_catalog_that_cannot_record_the_listing_stops_the_downloads(
    repo, storage, catalog, make_remote, upstream
):
    stalled = repo.files["files/05.bin"]
    upstream.register("/repo/files/05.bin", StallMidBody(len(stalled) // 2, stalled))
    slow = SlowRecordingCatalog(catalog, fail=RuntimeError("database is locked"))
    with pytest.raises(RuntimeError, match="database is locked"):
        await sync_remote(make_remote("immediate"), slow, storage)
    assert temp_files(storage) == []
    assert not storage.has(sha(stalled))


@pytest_twisted.ensureDeferred
async def test_a_full_commit_backlog_stalls_no_download_slot_for_the_batch_delay(
    repo, storage, catalog, make_remote, monkeypatch
):
    """When more files wait for their commit batch than ``max_backlog``, a download slot
    waits for its file's batch: the committer then commits as soon as it can instead of
    gathering files for ``commit_delay`` (a slot would otherwise idle that long per
    batch). Here every file fills the backlog and the delay is far longer than the sync."""
    from importer.fetcher import FileFetcher

    monkeypatch.setattr(FileFetcher, "max_backlog", 0)
    monkeypatch.setattr(FileFetcher, "commit_delay", 30.0)
    started = time.monotonic()
    report = await sync_remote(make_remote("immediate"), catalog, storage)

    assert (report.downloaded, report.failed) == (10, [])
    assert time.monotonic() - started < 10
    assert artifacts(storage) == {sha(data): data for data in repo.files.values()}
    assert all(e.stored for e in await catalog.entries_for_remote("fixtures"))


@pytest_twisted.ensureDeferred
async def test_the_listing_is_fetched_and_checked_while_the_catalog_opens(
    repo, storage, catalog, make_remote, upstream
):
    """A caller still opening the catalog passes its Deferred: the listing is fetched and
    checked meanwhile, nothing is written or downloaded before it fires."""
    from tests.support.polling import until

    opened: defer.Deferred[None] = defer.Deferred()
    syncing = sync_remote(make_remote("immediate"), catalog, storage, catalog_ready=opened)
    await until(lambda: upstream.all_requests())
    await task.deferLater(reactor, 0.2, lambda: None)  # the check runs in a thread
    assert [path for path, _ in upstream.all_requests()] == ["/repo/PULP_MANIFEST"]
    assert not syncing.called and await catalog.count() == 0
    opened.callback(None)
    report = await syncing

    assert (report.downloaded, report.failed) == (10, [])
    assert all(e.stored for e in await catalog.entries_for_remote("fixtures"))


@pytest_twisted.ensureDeferred
async def test_a_catalog_that_cannot_open_is_the_error_even_when_the_listing_failed(
    repo, storage, catalog, make_remote, upstream
):
    """The catalog's failure ends the sync before anything is downloaded; it is the error
    reported whether the listing was fine or not (the listing's failure concerns one
    remote, the catalog's every one)."""
    from store.errors import CatalogError

    for url in (upstream.url("/repo/PULP_MANIFEST"), upstream.url("/nowhere/PULP_MANIFEST")):
        refused: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0.05, refused.errback, CatalogError("refused: another storage"))
        remote = make_remote("immediate", url=url)
        with pytest.raises(CatalogError, match="another storage"):
            await sync_remote(remote, catalog, storage, catalog_ready=refused)
    assert artifacts(storage) == {} and await catalog.count() == 0
    assert [p for p, _ in upstream.all_requests() if p.startswith("/repo/files")] == []


@pytest_twisted.ensureDeferred
async def test_one_sha256_listed_with_two_sizes_is_not_already_present_for_both(
    repo, storage, catalog, make_remote
):
    """A listing giving one sha256 two sizes (``a`` its real one, ``b`` another): ``b`` is not
    the stored file, as the streamer sees it (`store.errors.WrongSize`), so it is fetched and
    fails, in this sync and the next. Before: `1 already present, 0 failed` both times, while
    every request for ``b`` was a 502."""
    data = content(3)
    for relative in list(repo.files):
        repo.drop(relative)
    repo.put("files/a.bin", data)
    repo.put("files/b.bin", data + b"and more")
    (repo.folder / "PULP_MANIFEST").write_text(
        f"files/a.bin,{sha(data)},{len(data)}\nfiles/b.bin,{sha(data)},{len(data) + 8}\n"
    )
    remote = make_remote("immediate", sync_processes=1)
    first = await sync_remote(remote, catalog, storage)
    again = await sync_remote(remote, catalog, storage)

    assert (first.downloaded, first.already_present) == (1, 0)
    assert (again.downloaded, again.already_present) == (0, 1)
    for report in (first, again):
        [(url, reason)] = report.failed
        assert url.endswith("/repo/files/b.bin") and "sha256 mismatch" in reason
    assert artifacts(storage) == {sha(data): data} and temp_files(storage) == []
