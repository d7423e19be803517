"""mark_stored_many (SQLite and PostgreSQL): one transaction marks every entry of a batch of
sha256s."""

import hashlib
import os
import threading

import pytest
import pytest_twisted
from twisted.internet import defer

from store import CatalogEntry, open_catalog


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def entry(path: str, content: str, remote: str = "r1") -> CatalogEntry:
    return CatalogEntry(
        path=path,
        remote=remote,
        url=f"http://upstream.invalid/{remote}/{path}",
        size=10,
        digests={"sha256": _sha(content)},
    )


@pytest.fixture
def catalog(catalog_url, tmp_path):
    cat = open_catalog(catalog_url, str(tmp_path))
    pytest_twisted.blockon(cat.open())
    yield cat
    pytest_twisted.blockon(cat.close())


@pytest_twisted.inlineCallbacks
def test_mark_stored_many_marks_every_entry_of_every_sha(catalog):
    yield catalog.replace_remote(
        "r1", [entry("a", "one"), entry("b", "two"), entry("c", "one"), entry("d", "three")]
    )
    yield catalog.replace_remote("r2", [entry("e", "two", remote="r2")])
    count = yield catalog.mark_stored_many([_sha("one"), _sha("two").upper(), _sha("absent")])
    assert count == 4  # a, c (one), b, e (two); nothing for a sha256 nobody lists
    stored = {e.path: e.stored for e in (yield catalog.entries_for_remote("r1"))}
    assert stored == {"a": True, "b": True, "c": True, "d": False}
    assert (yield catalog.lookup("e"))[0].stored
    assert (yield catalog.mark_stored_many([])) == 0


def _committer(tmp_path, catalog):
    from twisted.internet import task

    from store import ArtifactStorage
    from store.batches import BatchCommitter

    storage = ArtifactStorage(tmp_path / "var")
    return storage, BatchCommitter(storage, max_batch=3, clock=task.Clock(), catalog=catalog)


def _written(storage, body: bytes):
    """A `BatchCommitter` file not written yet: its sha256, size and *write*."""
    from downloaders.tempfiles import write_temp_file

    return _sha_of(body), len(body), lambda: write_temp_file(storage.temp_dir, body, 0o644)


def _sha_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@pytest_twisted.inlineCallbacks
def test_a_commit_batch_is_marked_stored_in_one_call_before_its_files_are_told(
    catalog, tmp_path, monkeypatch
):
    """The files of one commit batch are marked together by the committer: one call (one
    transaction) as soon as the batch is in storage, and each caller (a Deferred, or a
    function given to `add`) is told only then, in one plain loop. SQLite's is made by the
    committing thread itself (``mark_stored_many_here``: no trip to the catalog's thread and
    back through the reactor), PostgreSQL's through the reactor (``mark_stored_many``)."""
    storage, committer = _committer(tmp_path, catalog)
    bodies = [b"body %d" % n for n in range(3)]
    yield catalog.replace_remote(
        "r1", [attrs_evolve(entry(f"p{n}", "x"), _sha_of(b)) for n, b in enumerate(bodies)]
    )
    calls = []
    name = "mark_stored_many_here" if hasattr(catalog, "mark_stored_many_here") else None
    many = getattr(catalog, name or "mark_stored_many")

    def recording(sha256s):
        calls.append(list(sha256s))
        threads.append(threading.current_thread())
        return many(sha256s)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(catalog, name or "mark_stored_many", recording)
    told = []
    all_told = defer.Deferred()

    def settle(error):
        told.append((error, len(calls)))
        if len(told) == 2:
            all_told.callback(None)

    first, *rest = [_written(storage, body) for body in bodies]
    sha, size, write = first
    done = committer.commit(None, sha, size, write=write)
    for sha, size, write in rest:
        committer.add(None, sha, size, settle, write=write)  # the third starts the batch
    yield defer.gatherResults([done, all_told])
    assert calls == [[_sha_of(body) for body in bodies]]
    assert told == [(None, 1), (None, 1)], "told once the batch was marked"
    in_reactor = threads == [threading.main_thread()]
    assert in_reactor is (name is None), "SQLite's: in the committing thread"
    looked = yield defer.gatherResults([catalog.lookup(f"p{n}") for n in range(3)])
    assert all(found[0].stored for found in looked)
    assert all(storage.has(_sha_of(body)) for body in bodies)


@pytest_twisted.inlineCallbacks
def test_the_catalogs_failure_to_mark_a_batch_reaches_each_of_its_files(
    catalog, tmp_path, monkeypatch
):
    """The files are in storage (whole), but nobody is told they are stored: each caller
    gets the catalog's error."""
    from store.errors import CatalogUnavailable

    monkeypatch.setattr(
        catalog, "mark_stored_many", lambda _s: defer.fail(CatalogUnavailable("down"))
    )
    if hasattr(catalog, "mark_stored_many_here"):

        def down(_sha256s):
            raise CatalogUnavailable("down")

        monkeypatch.setattr(catalog, "mark_stored_many_here", down)
    storage, committer = _committer(tmp_path, catalog)
    told = []
    files = [_written(storage, b"one"), _written(storage, b"two"), _written(storage, b"three")]
    sha, size, write = files[0]
    committer.add(None, sha, size, told.append, write=write)
    done = [committer.commit(None, sha, size, write=write) for sha, size, write in files[1:]]
    results = yield defer.DeferredList(done, consumeErrors=True)
    assert [ok for ok, _f in results] == [False, False]
    assert all(f.check(CatalogUnavailable) for _ok, f in results)
    assert len(told) == 1 and told[0].check(CatalogUnavailable)
    assert all(storage.has(sha) for sha, _size, _write in files)


@pytest_twisted.inlineCallbacks
def test_a_catalog_the_committing_thread_cannot_write_is_marked_through_the_reactor(tmp_path):
    """An in-memory SQLite catalog lives in its worker's connection alone: its
    ``mark_stored_many_here`` says so (None), and the batch is marked through the worker."""
    from store.sqlite import SQLiteCatalog

    catalog = SQLiteCatalog(":memory:")
    yield catalog.open()
    try:
        storage, committer = _committer(tmp_path, catalog)
        bodies = [b"memory %d" % n for n in range(3)]
        yield catalog.replace_remote(
            "r1", [attrs_evolve(entry(f"m{n}", "x"), _sha_of(b)) for n, b in enumerate(bodies)]
        )
        assert catalog.mark_stored_many_here([_sha_of(bodies[0])]) is None
        files = [_written(storage, body) for body in bodies]
        yield defer.gatherResults(
            [committer.commit(None, sha, size, write=write) for sha, size, write in files]
        )
        looked = yield defer.gatherResults([catalog.lookup(f"m{n}") for n in range(3)])
        assert all(found[0].stored for found in looked)
    finally:
        yield catalog.close()


def attrs_evolve(value: CatalogEntry, sha256: str) -> CatalogEntry:
    """*value* naming the content *sha256*."""
    import attrs

    return attrs.evolve(value, digests={"sha256": sha256})


@pytest_twisted.inlineCallbacks
def test_a_catalog_without_the_batched_call_is_marked_one_sha_at_a_time(catalog):
    """`mark_all_stored` (the sync's and the streamer's one way to mark a batch): an ICatalog
    that only has ``mark_stored`` is asked once per sha256, and its error reaches the caller."""
    from store.catalog import mark_all_stored
    from store.errors import CatalogUnavailable

    yield catalog.replace_remote("r1", [entry("a.txt", "one"), entry("b.txt", "two")])
    asked: list[str] = []

    class Plain:
        def mark_stored(self, sha256: str) -> defer.Deferred:
            asked.append(sha256)
            return catalog.mark_stored(sha256)

    yield mark_all_stored(Plain(), [_sha("one"), _sha("two")])
    assert asked == [_sha("one"), _sha("two")]
    assert [e.stored for e in (yield catalog.lookup("a.txt"))] == [True]
    assert [e.stored for e in (yield catalog.lookup("b.txt"))] == [True]

    class Down:
        def mark_stored(self, sha256: str) -> defer.Deferred:
            return defer.fail(CatalogUnavailable("down"))

    with pytest.raises(defer.FirstError) as raised:
        yield mark_all_stored(Down(), [_sha("one")])
    assert raised.value.subFailure.check(CatalogUnavailable)


def _fds_to(database: str) -> int:
    """This process's descriptors open on the SQLite file *database* (or its -wal, -shm)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the listing's own descriptor, closed since)
            continue
        count += target.startswith(database)
    return count


@pytest_twisted.inlineCallbacks
def test_committing_threads_mark_through_one_connection_that_closes_with_the_catalog(tmp_path):
    """Threads marking batches themselves share one write connection, made on first use; the
    catalog's close closes it (no descriptor left on the database), and a mark asked after
    that opens nothing: None, for the reactor's path (which reports the closed catalog)."""
    from store.sqlite import SQLiteCatalog

    database = str(tmp_path / "catalog.sqlite3")
    catalog = SQLiteCatalog(database)
    yield catalog.open()
    yield catalog.replace_remote("r1", [entry("a", "one"), entry("b", "two")])
    opened = _fds_to(database)
    counts: list[int | None] = []
    for content in ("one", "two"):  # two threads, one after the other
        marking = threading.Thread(
            target=lambda c=content: counts.append(catalog.mark_stored_many_here([_sha(c)]))
        )
        marking.start()
        marking.join()
    assert counts == [1, 1]
    with_writer = _fds_to(database)
    assert with_writer > opened, "the writer's descriptors"
    assert [e.stored for e in (yield catalog.entries_for_remote("r1"))] == [True, True]
    yield catalog.close()
    assert _fds_to(database) == 0
    assert catalog.mark_stored_many_here([_sha("one")]) is None
    assert _fds_to(database) == 0


@pytest_twisted.inlineCallbacks
def test_a_catalog_closed_while_a_thread_was_about_to_mark_gets_no_new_connection(tmp_path):
    """A committing thread that found the catalog open, then waited for the writer's lock
    while the catalog closed, must not open a connection nobody will close: it is told
    None (the reactor's path) and the database has no descriptor left."""
    from store.sqlite import SQLiteCatalog

    database = str(tmp_path / "catalog.sqlite3")
    catalog = SQLiteCatalog(database)
    yield catalog.open()
    real_lock = catalog._writer_lock

    class ClosedMeanwhile:
        """The writer's lock, which lets the catalog close just before it is first taken."""

        def __enter__(self) -> None:
            catalog._writer_lock = real_lock
            catalog.close()  # (SQLite's is done when it returns)
            real_lock.acquire()

        def __exit__(self, *exc: object) -> None:
            real_lock.release()

    catalog._writer_lock = ClosedMeanwhile()  # type: ignore[assignment]
    assert catalog.mark_stored_many_here([_sha("one")]) is None
    assert _fds_to(database) == 0


@pytest_twisted.inlineCallbacks
def test_the_committing_threads_mark_waits_for_another_writer_of_the_file(tmp_path):
    """Another process's write (or the catalog's own thread's) holds SQLite's one write lock:
    the committing thread's mark waits for it (``busy_timeout``), then is made, instead of
    failing with "database is locked"."""
    import sqlite3
    import time

    from store.sqlite import SQLiteCatalog

    database = str(tmp_path / "catalog.sqlite3")
    catalog = SQLiteCatalog(database)
    yield catalog.open()
    try:
        yield catalog.replace_remote("r1", [entry("a", "one")])
        other = sqlite3.connect(database, isolation_level=None)  # another process's, as it were
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE catalog_entries SET position = 1")
        outcome: list[object] = []

        def mark() -> None:
            try:
                outcome.append(catalog.mark_stored_many_here([_sha("one")]))
            except Exception as error:
                outcome.append(error)

        marking = threading.Thread(target=mark)
        marking.start()
        time.sleep(0.3)
        assert outcome == [], "waits while the other writer holds the lock"
        other.execute("COMMIT")
        other.close()
        marking.join(10)
        assert outcome == [1]
        [found] = yield catalog.lookup("a")
        assert found.stored and found.position == 1
    finally:
        yield catalog.close()
