"""mark_stored_many (SQLite and PostgreSQL): one transaction marks every entry of a batch of
sha256s."""

import hashlib

import pytest
import pytest_twisted

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
