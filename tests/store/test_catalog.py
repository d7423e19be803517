"""The catalog conformance suite: every test taking ``catalog`` runs against a SQLite file and
against a real PostgreSQL database (a private cluster, see tests/support/postgres.py); the
SQLite-only ones (WAL, in-thread reads, file urls) take ``sqlite_catalog``."""

import hashlib
import json
import os
import sqlite3
import time
from contextlib import closing

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from store import (
    CatalogEntry,
    CatalogError,
    ICatalog,
    ListingItem,
    SQLiteCatalog,
    open_catalog,
)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def entry(path, remote="r1", url=None, size=10, content=None, **kw) -> CatalogEntry:
    return CatalogEntry(
        path=path,
        remote=remote,
        url=url or f"http://upstream.invalid/{remote}/{path}",
        size=size,
        digests={"sha256": _sha(content or path)},
        **kw,
    )


@pytest.fixture
def catalog(catalog_url, tmp_path):
    """An open catalog of each kind (see ``catalog_url``), empty."""
    cat = open_catalog(catalog_url, str(tmp_path / "storage"))
    pytest_twisted.blockon(cat.open())
    yield cat
    pytest_twisted.blockon(cat.close())


@pytest.fixture
def sqlite_catalog(tmp_path):
    cat = SQLiteCatalog(str(tmp_path / "db" / "catalog.sqlite3"))
    pytest_twisted.blockon(cat.open())
    yield cat
    pytest_twisted.blockon(cat.close())


def test_catalog_entry_validation():
    e = entry("a/b", content="x")
    assert e.sha256 == _sha("x")
    upper = CatalogEntry("p", "r", "u", 1, {"SHA256": _sha("x").upper()})
    assert upper.digests == {"sha256": _sha("x")}
    with pytest.raises(ValueError, match="sha256"):
        CatalogEntry("p", "r", "u", 1, {"md5": "0" * 32})
    with pytest.raises(ValueError, match="relative"):
        CatalogEntry("/p", "r", "u", 1, {"sha256": _sha("x")})
    with pytest.raises(ValueError, match="non-negative"):
        CatalogEntry("p", "r", "u", -1, {"sha256": _sha("x")})
    with pytest.raises(ValueError, match="at most 9223372036854775807"):  # the column's
        CatalogEntry("p", "r", "u", 2**63, {"sha256": _sha("x")})


@pytest_twisted.inlineCallbacks
def test_open_creates_file_in_wal_mode(sqlite_catalog, tmp_path):
    assert verifyObject(ICatalog, sqlite_catalog)
    assert os.path.isfile(tmp_path / "db" / "catalog.sqlite3")
    with closing(sqlite3.connect(tmp_path / "db" / "catalog.sqlite3")) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert (yield sqlite_catalog.count()) == 0


@pytest_twisted.inlineCallbacks
def test_open_provides_the_interface_and_starts_empty(catalog):
    assert verifyObject(ICatalog, catalog)
    assert (yield catalog.count()) == 0
    assert (yield catalog.lookup("a")) == []
    assert (yield catalog.list_dir("")) == []


@pytest_twisted.inlineCallbacks
def test_two_catalogs_on_one_database_write_concurrently(catalog_url, tmp_path):
    """A sync process and a streamer share the database: concurrent writers wait, never fail."""
    first = open_catalog(catalog_url, str(tmp_path))
    second = open_catalog(catalog_url, str(tmp_path))
    yield first.open()
    yield second.open()
    try:
        big = (entry(f"one/{i}", remote="one") for i in range(20_000))
        small = [entry(f"two/{i}", remote="two") for i in range(10)]
        results = yield defer.gatherResults(
            [
                first.replace_remote("one", big),
                second.replace_remote("two", small),
                second.mark_stored(_sha("one/5")),
            ],
            consumeErrors=True,
        )
        assert (results[0].added, results[1].added) == (20_000, 10)
        assert (yield first.count("two")) == 10
        assert (yield second.count("one")) == 20_000
    finally:
        yield first.close()
        yield second.close()


@pytest_twisted.inlineCallbacks
def test_lookup_returns_entries_in_stable_order(catalog):
    mirrors = [
        entry("base/pkg.rpm", remote="zeta", url="http://m1.invalid/pkg.rpm", position=0),
        entry("base/pkg.rpm", remote="zeta", url="http://m2.invalid/pkg.rpm", position=1),
    ]
    other = [
        entry("base/pkg.rpm", remote="alpha", url="http://a1.invalid/pkg.rpm", position=1),
        entry("base/pkg.rpm", remote="alpha", url="http://a0.invalid/pkg.rpm", position=0),
        entry("base/other", remote="alpha"),
    ]
    yield catalog.replace_remote("zeta", mirrors)
    yield catalog.replace_remote("alpha", other)
    found = yield catalog.lookup("base/pkg.rpm")
    assert [(e.position, e.remote, e.url) for e in found] == [
        (0, "alpha", "http://a0.invalid/pkg.rpm"),
        (0, "zeta", "http://m1.invalid/pkg.rpm"),
        (1, "alpha", "http://a1.invalid/pkg.rpm"),
        (1, "zeta", "http://m2.invalid/pkg.rpm"),
    ]
    assert found[1] == mirrors[0]
    assert (yield catalog.lookup("/base/pkg.rpm")) == found
    assert (yield catalog.lookup("base/missing")) == []
    assert (yield catalog.lookup("base")) == []


@pytest_twisted.inlineCallbacks
def test_list_dir_direct_children(catalog):
    yield catalog.replace_remote(
        "r1",
        [
            entry("repo/a.txt", size=1),
            entry("repo/b/c.txt", size=2),
            entry("repo/b/d/e.txt", size=3),
            entry("repo/b0.txt", size=4, stored=True),
            entry("repo/z/y.txt", size=5),
            entry("repo.txt", size=6),
            entry("repox/f", size=7),
            entry("other/g", size=8),
        ],
    )
    assert (yield catalog.list_dir("repo")) == [
        ListingItem("a.txt", False, 1, False),
        ListingItem("b", True),
        ListingItem("b0.txt", False, 4, True),
        ListingItem("z", True),
    ]
    assert (yield catalog.list_dir("/repo/b/")) == [
        ListingItem("c.txt", False, 2, False),
        ListingItem("d", True),
    ]
    assert (yield catalog.list_dir("")) == [
        ListingItem("other", True),
        ListingItem("repo", True),
        ListingItem("repo.txt", False, 6, False),
        ListingItem("repox", True),
    ]
    assert (yield catalog.list_dir("nothing")) == []
    assert (yield catalog.list_dir("repo/a.txt")) == []


@pytest_twisted.inlineCallbacks
def test_list_dir_large_folder_spans_batches(catalog):
    names = [f"f{i:05d}" for i in range(2500)]
    entries = [entry(f"big/{n}") for n in names]
    # the same path twice (a mirror): listed once, stored if any entry is
    entries.append(entry("big/f00999", url="http://mirror.invalid/f00999", stored=True))
    entries += [entry(f"big/sub{i}/x") for i in range(3)]
    yield catalog.replace_remote("r1", entries)
    listing = yield catalog.list_dir("big")
    assert [i.name for i in listing] == names + ["sub0", "sub1", "sub2"]
    assert [i.name for i in listing if i.stored] == ["f00999"]


@pytest_twisted.inlineCallbacks
def test_replace_remote_is_idempotent_and_tracks_changes(catalog):
    first = [entry("r/a"), entry("r/b"), entry("r/c", size=3)]
    yield catalog.replace_remote("other", [entry("r/a", remote="other")])
    report = yield catalog.replace_remote("r1", first)
    assert (report.total, report.added, report.changed, report.unchanged, report.removed) == (
        3,
        3,
        0,
        0,
        0,
    )
    again = yield catalog.replace_remote("r1", first)
    assert (again.added, again.changed, again.unchanged, again.removed) == (0, 0, 3, 0)
    assert (yield catalog.entries_for_remote("r1")) == first

    # upstream changed: b removed, c's content changed, d added
    second = [entry("r/a"), entry("r/c", size=4, content="new c"), entry("r/d")]
    report = yield catalog.replace_remote("r1", iter(second))
    assert (report.total, report.added, report.changed, report.unchanged, report.removed) == (
        3,
        1,
        1,
        1,
        1,
    )
    assert (yield catalog.entries_for_remote("r1")) == second
    assert (yield catalog.lookup("r/b")) == []
    (c,) = yield catalog.lookup("r/c")
    assert (c.size, c.sha256) == (4, _sha("new c"))
    # the other remote's entry for the same path is untouched
    assert [e.remote for e in (yield catalog.lookup("r/a"))] == ["other", "r1"]
    assert (yield catalog.count()) == 4
    assert (yield catalog.count("r1")) == 3

    emptied = yield catalog.replace_remote("r1", [])
    assert (emptied.total, emptied.removed) == (0, 3)
    assert (yield catalog.count("r1")) == 0


@pytest_twisted.inlineCallbacks
def test_listing_version_changes_only_when_a_listing_would(catalog):
    """Listings may be cached under listing_version: a replace that adds, removes or changes
    an entry gives a new one; a replace that changes nothing, or marking content stored
    (listings do not show it), keeps it."""
    assert (yield catalog.listing_version()) == ""
    yield catalog.replace_remote("r1", [entry("r/a"), entry("r/b")])
    first = yield catalog.listing_version()
    assert first
    yield catalog.replace_remote("r1", [entry("r/a"), entry("r/b")])
    yield catalog.mark_stored(_sha("r/a"))
    assert (yield catalog.listing_version()) == first
    yield catalog.replace_remote("r1", [entry("r/a"), entry("r/b", size=3)])
    second = yield catalog.listing_version()
    assert second not in ("", first)
    yield catalog.replace_remote("r1", [entry("r/a")])
    assert (yield catalog.listing_version()) not in ("", first, second)


@pytest_twisted.inlineCallbacks
def test_replace_remote_keeps_stored_flag_for_unchanged_content(catalog):
    yield catalog.replace_remote("r1", [entry("r/a"), entry("r/b")])
    assert (yield catalog.mark_stored(_sha("r/a"))) == 1
    yield catalog.replace_remote("r1", [entry("r/a"), entry("r/b", content="changed")])
    a, b = yield catalog.entries_for_remote("r1")
    assert a.stored and not b.stored
    # a new remote listing stored content sees it as stored
    yield catalog.replace_remote("r2", [entry("elsewhere/a", remote="r2", content="r/a")])
    (other,) = yield catalog.lookup("elsewhere/a")
    assert other.stored


@pytest_twisted.inlineCallbacks
def test_mark_stored_updates_all_entries_with_sha(catalog):
    yield catalog.replace_remote(
        "r1", [entry("x/1", content="same"), entry("x/2", content="same"), entry("x/3")]
    )
    yield catalog.replace_remote("r2", [entry("y/1", remote="r2", content="same")])
    assert (yield catalog.mark_stored(_sha("same"))) == 3
    stored = [e.path for e in (yield catalog.entries_for_remote("r1")) if e.stored]
    assert stored == ["x/1", "x/2"]
    assert (yield catalog.lookup("y/1"))[0].stored
    assert (yield catalog.mark_stored(_sha("same"), stored=False)) == 3
    assert not (yield catalog.lookup("y/1"))[0].stored


@pytest_twisted.inlineCallbacks
def test_replace_remote_failure_changes_nothing(catalog):
    yield catalog.replace_remote("r1", [entry("r/a")])

    def broken():
        yield entry("r/new")
        raise ValueError("manifest went bad half-way")

    with pytest.raises(ValueError, match="half-way"):
        yield catalog.replace_remote("r1", broken())
    with pytest.raises(CatalogError, match="remote 'r2'"):
        yield catalog.replace_remote("r1", [entry("r/b", remote="r2")])
    with pytest.raises(CatalogError, match="listed twice"):
        yield catalog.replace_remote("r1", [entry("r/b"), entry("r/b")])
    assert [e.path for e in (yield catalog.entries_for_remote("r1"))] == ["r/a"]


@pytest_twisted.inlineCallbacks
def test_replace_100000_entries_fast_without_blocking_reactor(catalog):
    n = 100_000

    def generate(tag):
        for i in range(n):
            yield CatalogEntry(
                path=f"big/d{i % 100}/file-{i:06d}.bin",
                remote="big",
                url=f"http://upstream.invalid/big/d{i % 100}/file-{i:06d}.bin",
                size=i,
                digests={"sha256": hashlib.sha256(f"{tag}{i}".encode()).hexdigest()},
            )

    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    loop.clock = reactor
    loop.start(0.01)
    started = time.monotonic()
    report = yield catalog.replace_remote("big", generate("v1"))
    first_run = time.monotonic() - started
    started = time.monotonic()
    again = yield catalog.replace_remote("big", generate("v1"))
    second_run = time.monotonic() - started
    loop.stop()
    print(f"replace_remote 100000 entries: first {first_run:.2f}s, re-sync {second_run:.2f}s")
    assert (report.added, report.total) == (n, n)
    assert (again.unchanged, again.added, again.removed) == (n, 0, 0)
    assert (yield catalog.count("big")) == n
    assert first_run < 20 and second_run < 20
    # the reactor kept turning while the database thread worked
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    print(f"longest reactor pause during the replaces: {max(gaps) * 1000:.0f} ms")
    assert len(ticks) > 10 and max(gaps) < 1.0
    (found,) = yield catalog.lookup("big/d7/file-000007.bin")
    assert found.size == 7


@pytest_twisted.inlineCallbacks
def test_memory_catalog_and_reopen(tmp_path):
    mem = open_catalog("sqlite:///:memory:", str(tmp_path))
    yield mem.open()
    yield mem.replace_remote("r1", [entry("a/b")])
    assert (yield mem.count()) == 1
    yield mem.close()

    path = tmp_path / "persist.sqlite3"
    cat = open_catalog(f"sqlite:///{path}", str(tmp_path))
    yield cat.open()
    yield cat.replace_remote("r1", [entry("a/b")])
    yield cat.close()
    with pytest.raises(CatalogError, match="not open"):
        cat.lookup("a/b")
    cat = open_catalog(f"sqlite:///{path}", str(tmp_path))
    yield cat.open()
    assert [e.path for e in (yield cat.lookup("a/b"))] == ["a/b"]
    yield cat.close()


def test_open_catalog_urls(tmp_path, monkeypatch):
    default = open_catalog("", str(tmp_path / "var"))
    assert isinstance(default, SQLiteCatalog)
    assert default.database == os.path.join(str(tmp_path / "var"), "catalog.sqlite3")
    monkeypatch.chdir(tmp_path)
    relative = open_catalog("sqlite:///var/cat.db", "ignored")
    assert relative.database == os.path.join(str(tmp_path), "var", "cat.db")
    based = open_catalog("sqlite:///cat.db", "ignored", base_dir=str(tmp_path / "conf"))
    assert based.database == os.path.join(str(tmp_path), "conf", "cat.db")
    absolute = open_catalog("sqlite:////srv/cat.db", "ignored")
    assert absolute.database == "/srv/cat.db"
    assert open_catalog("sqlite:///:memory:", "x").database == ":memory:"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://user:secret@db.invalid:notaport/catalog", "postgresql://user@db.invalid"),
        ("postgres://db.invalid/catalog?nosuchparam=1&password=secret", "nosuchparam"),
        ("mysql://user:secret@db.invalid/catalog", "unsupported catalog url scheme 'mysql'"),
        ("var/catalog.sqlite3", "unsupported catalog url scheme '(none)'"),
        ("sqlite://host/catalog", "three slashes"),
        ("sqlite:///", "path is empty"),
    ],
)
def test_open_catalog_errors(url, message, tmp_path):
    with pytest.raises(CatalogError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        open_catalog(url, str(tmp_path))
    assert "secret" not in str(e.value)


@pytest_twisted.inlineCallbacks
def test_open_fails_cleanly_on_unusable_file(tmp_path):
    bad = tmp_path / "not-a-db.sqlite3"
    bad.write_bytes(b"this is not an sqlite database" * 100)
    cat = SQLiteCatalog(str(bad))
    with pytest.raises(CatalogError, match="not-a-db.sqlite3"):
        yield cat.open()
    with pytest.raises(CatalogError, match="not open"):
        cat.lookup("a")


@pytest_twisted.inlineCallbacks
def test_lookup_reads_in_the_calling_thread_and_sees_other_writers(sqlite_catalog, tmp_path):
    """A lookup on a file catalog answers at once (no worker-thread hop) and sees what
    another catalog object on the same file (another process, say `streamer sync`) wrote."""
    catalog = sqlite_catalog
    writer = SQLiteCatalog(catalog.database)
    yield writer.open()
    try:
        yield writer.replace_remote("r", [entry("base/x", remote="r", content="1")])
        looked_up = catalog.lookup("base/x")
        assert looked_up.called, "lookup waited for the worker thread"
        assert [e.sha256 for e in (yield looked_up)] == [_sha("1")]
        yield writer.replace_remote("r", [entry("base/x", remote="r", content="2")])
        assert [e.sha256 for e in (yield catalog.lookup("base/x"))] == [_sha("2")]
        # A writer holding the database does not make lookups fail: they answer or wait.
        with closing(sqlite3.connect(catalog.database, isolation_level=None)) as raw:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("DELETE FROM catalog_entries")
            assert [e.sha256 for e in (yield catalog.lookup("base/x"))] == [_sha("2")]
            raw.execute("COMMIT")
        assert (yield catalog.lookup("base/x")) == []
    finally:
        yield writer.close()


@pytest_twisted.inlineCallbacks
def test_lookup_now_answers_as_lookup_does_without_a_deferred(sqlite_catalog):
    """`SQLiteCatalog.lookup_now`: the same entries as `lookup` (none for an unknown path), as
    a list, read in the calling thread; None once the catalog has no reader."""
    catalog = sqlite_catalog
    yield catalog.replace_remote("r", [entry("base/x", remote="r", content="1")])
    assert catalog.lookup_now("base/x") == (yield catalog.lookup("base/x"))
    assert [e.sha256 for e in catalog.lookup_now("/base/x")] == [_sha("1")]
    assert catalog.lookup_now("base/nothing") == []
    reader, catalog._reader = catalog._reader, None  # (as a ":memory:" catalog has none)
    try:
        assert catalog.lookup_now("base/x") is None
        assert [e.sha256 for e in (yield catalog.lookup("base/x"))] == [_sha("1")]  # (thread)
    finally:
        catalog._reader = reader


@pytest_twisted.inlineCallbacks
def test_lookup_takes_rows_as_written_and_checks_others(sqlite_catalog):
    """A row as the catalog writes it (a sha256 alone) is read without parsing JSON or checking
    again; any other row (several digests, or one changed by hand) still goes through
    `CatalogEntry`'s converter and checks."""
    catalog = sqlite_catalog
    plain = entry("a/plain", size=0)
    several = CatalogEntry(
        path="a/several",
        remote="r1",
        url="http://upstream.invalid/r1/a/several",
        size=10,
        digests={"sha256": _sha("s"), "sha512": "ab" * 64},
    )
    yield catalog.replace_remote("r1", [plain, several])
    yield catalog.mark_stored(plain.sha256)
    found = yield catalog.lookup("a/plain")
    assert found == [CatalogEntry(**{**attrs.asdict(plain), "stored": True})]
    assert type(found[0].stored) is bool and found[0].digests == {"sha256": plain.sha256}
    assert (yield catalog.lookup("a/several")) == [several]

    def edit(digests: str) -> None:
        with closing(sqlite3.connect(catalog.database)) as raw:
            raw.execute("UPDATE catalog_entries SET digests = ? WHERE path = 'a/plain'", (digests,))
            raw.commit()

    edit(json.dumps({"sha256": plain.sha256.upper()}))  # upper case: normalised by the converter
    assert [e.digests for e in (yield catalog.lookup("a/plain"))] == [{"sha256": plain.sha256}]
    edit(json.dumps({"sha256": "0" * 63 + "g"}))  # the right length, not hex: refused
    with pytest.raises(ValueError, match="must hold a sha256"):
        yield defer.maybeDeferred(catalog.lookup, "a/plain")


@pytest_twisted.ensureDeferred
async def test_lookup_cost_and_the_reactor_keeps_turning(catalog):
    """What every content request pays for its lookup (printed with ``-s``: docs/DESIGN.md
    quotes it; measured, not asserted, as this machine's speed varies), and that with a
    catalog answering from threads the reactor is never the one waiting for the database:
    it turns while 2000 lookups are in flight."""
    await catalog.replace_remote("r1", [entry(f"d/{i}", content=str(i)) for i in range(1000)])
    for i in range(50):  # warm up: connections open, statements prepared
        await catalog.lookup(f"d/{i}")
    n = 2000
    started = time.monotonic()
    for i in range(n):
        await catalog.lookup(f"d/{i % 1000}")
    serial = (time.monotonic() - started) / n
    started = time.monotonic()
    in_flight = defer.gatherResults([catalog.lookup(f"d/{i % 1000}") for i in range(n)])
    turned: list[bool] = []
    reactor.callLater(0, lambda: turned.append(in_flight.called))
    found = await in_flight
    concurrent = time.monotonic() - started
    assert all(len(entries) == 1 for entries in found)
    print(
        f"\n{type(catalog).__name__} lookup: {serial * 1e6:.0f} us each one after the other, "
        f"{n / concurrent:.0f}/s with {n} in flight"
    )
    if not isinstance(catalog, SQLiteCatalog):  # SQLite reads in the calling thread, by design
        await deferLater(reactor, 0)
        assert turned == [False]


@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_each_get_their_own_answer(catalog):
    """Many lookups at once (PostgreSQL sends them in batches): every caller gets the entries
    of its path, in order, unknown paths nothing, and a list of its own."""
    entries = [entry(f"c/{i}", content=str(i)) for i in range(200)]
    entries += [
        entry("c/7", url="http://mirror.invalid/c/7", content="7", position=1),
        entry("c/7", url="http://first.invalid/c/7", content="7", position=0),
    ]
    await catalog.replace_remote("r1", entries)
    expected = {f"c/{i}": await catalog.lookup(f"c/{i}") for i in (7, 8)}
    assert [e.url for e in expected["c/7"]] == [
        "http://first.invalid/c/7",
        "http://upstream.invalid/r1/c/7",
        "http://mirror.invalid/c/7",
    ]
    paths = [f"c/{i % 250}" for i in range(1000)] + ["c/7"] * 50
    found = await defer.gatherResults([catalog.lookup(p) for p in paths])
    for path, result in zip(paths, found, strict=True):
        number = int(path[2:])
        if number >= 200:
            assert result == []
        elif path in expected:
            assert result == expected[path]
        else:
            assert [(e.path, e.sha256) for e in result] == [(path, _sha(str(number)))]
    sevens = [r for p, r in zip(paths, found, strict=True) if p == "c/7"]
    sevens[0].clear()
    assert sevens[1] == expected["c/7"]  # not one list shared by every caller
