"""mark_stored_many (SQLite and PostgreSQL): one transaction marks every entry of a batch of
sha256s."""

import hashlib

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


@pytest_twisted.inlineCallbacks
def test_stored_marks_of_one_turn_go_to_the_catalog_in_one_call(catalog, monkeypatch):
    """The files of one commit batch are marked together: one mark_stored_many (one trip to
    the catalog's thread, one transaction) for every sha256 asked for in one reactor turn."""
    from twisted.internet import reactor

    from store.catalog import StoredMarks

    entries = [entry(f"p{n}", f"c{n}") for n in range(3)]
    yield catalog.replace_remote("r1", entries)
    calls = []
    many = catalog.mark_stored_many

    def recording(sha256s):
        calls.append(list(sha256s))
        return many(sha256s)

    monkeypatch.setattr(catalog, "mark_stored_many", recording)
    marks = StoredMarks(catalog, reactor)
    shas = [e.sha256 for e in entries]
    yield defer.gatherResults([marks.mark_stored(sha) for sha in [*shas, shas[0]]])
    assert calls == [shas]
    looked = yield defer.gatherResults([catalog.lookup(e.path) for e in entries])
    assert all(found[0].stored for found in looked)


@pytest_twisted.inlineCallbacks
def test_stored_marks_report_the_catalogs_failure_to_every_waiter(catalog, monkeypatch):
    from twisted.internet import reactor

    from store.catalog import StoredMarks
    from store.errors import CatalogUnavailable

    monkeypatch.setattr(
        catalog, "mark_stored_many", lambda _s: defer.fail(CatalogUnavailable("down"))
    )
    marks = StoredMarks(catalog, reactor)
    results = yield defer.DeferredList(
        [marks.mark_stored(_sha("a")), marks.mark_stored(_sha("b"))], consumeErrors=True
    )
    assert [ok for ok, _f in results] == [False, False]
    assert all(f.check(CatalogUnavailable) for _ok, f in results)


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
