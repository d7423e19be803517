"""Importers: the built-in PULP_MANIFEST one, custom ones named `module:Class`, and
`Remote.get_downloader` (the black-box factory the streamer uses) delegating to them."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from downloaders import DigestValidationError, SettingsError
from importer import IImporter, PulpManifestImporter, Remote, sync_remote
from store import CatalogEntry
from tests.importer.conftest import artifacts, sha
from tests.importer.plugins import JsonListingImporter
from tests.support.faults import Serve


def test_default_importer_is_the_pulp_manifest_one():
    remote = Remote(name="r", url="http://127.0.0.1:1/repo/PULP_MANIFEST")
    importer = remote.get_importer()
    assert isinstance(importer, PulpManifestImporter)
    assert verifyObject(IImporter, importer)
    assert remote.get_importer() is importer


def test_pulp_manifest_entries_one_per_source_in_order(tmp_path):
    manifest = tmp_path / "PULP_MANIFEST"
    digest = "ab" * 32
    manifest.write_text(f"a b/c d.rpm,{digest},42\nx.txt,{'cd' * 32},0\n")
    remote = Remote(
        name="r",
        base_path="pub/r",
        url="https://h.example/repo/PULP_MANIFEST",
        mirrors=["http://m1.example/mirror", "http://m2.example/other/"],
    )
    seen: list[str] = []
    entries = list(remote.get_importer().catalog_entries(str(manifest), seen.append))

    assert [(e.path, e.position, e.url) for e in entries[:3]] == [
        ("pub/r/a b/c d.rpm", 0, "https://h.example/repo/a%20b/c%20d.rpm"),
        ("pub/r/a b/c d.rpm", 1, "http://m1.example/mirror/a%20b/c%20d.rpm"),
        ("pub/r/a b/c d.rpm", 2, "http://m2.example/other/a%20b/c%20d.rpm"),
    ]
    assert all(
        e.remote == "r" and e.size == 42 and e.digests == {"sha256": digest} for e in entries[:3]
    )
    assert [e.path for e in entries[3:]] == ["pub/r/x.txt"] * 3
    assert seen == [digest, "cd" * 32]  # asked once per file, not per source


def test_a_validated_listing_gives_the_same_entries_and_a_changed_one_is_checked_again(
    tmp_path,
):
    """After `validate_listing` accepted a listing, its later passes (the catalog's, the
    downloads') skip the checks: the entries are the same as checked ones. A listing that
    changed since is checked again: its bad line is refused, not turned into entries."""
    manifest = tmp_path / "PULP_MANIFEST"
    manifest.write_bytes(
        "\ufeff# a comment\n\nfiles/A b.bin,{},7\r\nx/y.txt, {} ,0  \n".format(
            "AB" * 32, "cd" * 32
        ).encode()
    )
    remote = Remote(name="r", url="http://h.example/repo/PULP_MANIFEST", mirrors=["http://m/"])
    stored = {"ab" * 32}.__contains__
    unchecked = list(remote.get_importer().catalog_entries(str(manifest), stored))
    importer = PulpManifestImporter(remote)
    assert importer.validate_listing(str(manifest)) == 2
    fast = list(importer.catalog_entries(str(manifest), stored))

    assert fast == unchecked and len(fast) == 4
    assert [(e.sha256, e.stored, e.size) for e in fast[::2]] == [
        ("ab" * 32, True, 7),
        ("cd" * 32, False, 0),
    ]
    assert {type(e.stored) for e in fast} == {bool} and fast[0].path == "r/files/A b.bin"

    manifest.write_text(f"../escape,{'ab' * 32},1\n")  # replaced after the validation
    with pytest.raises(ValueError, match="'..' component"):
        list(importer.catalog_entries(str(manifest), stored))


def test_checked_catalog_entries_equal_validated_ones():
    values = dict(path="p/a", remote="r", url="http://h/a", size=3, digests={"sha256": "ef" * 32})
    made = CatalogEntry.checked(**values, stored=True, position=1)
    assert made == CatalogEntry(**values, stored=True, position=1)
    assert hash(made) == hash(CatalogEntry(**values, stored=True, position=1))
    assert made.sha256 == "ef" * 32 and repr(made).startswith("CatalogEntry(path='p/a'")


def test_get_downloader_with_an_entry_expects_its_size_and_digests(tmp_path):
    remote = Remote(name="r", url="http://127.0.0.1:1/repo/PULP_MANIFEST")
    entry = CatalogEntry("r/a", "r", "http://127.0.0.1:1/repo/a", 7, {"sha256": "0" * 64})
    downloader = remote.get_downloader(entry=entry, temp_dir=str(tmp_path))
    assert downloader.url == entry.url
    assert (downloader.expected_size, downloader.expected_digests) == (7, {"sha256": "0" * 64})
    with pytest.raises(ValueError, match="url or a catalog entry"):
        remote.get_downloader()


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("no-colon", "must look like 'module:Class'"),
        ("no_such_module_xyz:Thing", "cannot import"),
        ("tests.importer.plugins:Missing", "has no 'Missing'"),
        ("tests.importer.plugins:NotAnImporter", "not a class implementing IImporter"),
    ],
)
def test_bad_importer_names_fail_at_configuration_time(spec, problem):
    with pytest.raises(SettingsError, match=problem) as caught:
        Remote(name="r", url="http://127.0.0.1:1/x", importer=spec)
    assert caught.value.setting == "importer"


@pytest_twisted.ensureDeferred
async def test_custom_importer_plugs_into_sync_and_get_downloader(
    tmp_path, upstream, storage, catalog, make_remote
):
    files = {"one.txt": b"first file\n", "deep/two.txt": b"second file\n" * 50}
    items = []
    for name, data in files.items():
        url = upstream.register(f"/anywhere/{sha(data)}", Serve(data))
        items.append({"path": name, "url": url, "sha256": sha(data), "size": len(data)})
    listing_url = upstream.register("/listing.json", Serve(json.dumps(items).encode()))
    remote = make_remote(
        "immediate", url=listing_url, importer="tests.importer.plugins:JsonListingImporter"
    )

    report = await sync_remote(remote, catalog, storage)

    importer = remote.get_importer()
    assert isinstance(importer, JsonListingImporter)
    assert (report.downloaded, report.failed) == (2, [])
    assert artifacts(storage) == {sha(d): d for d in files.values()}
    [entry] = await catalog.lookup("fixtures/deep/two.txt")
    assert entry.url == items[1]["url"] and entry.stored
    built = importer.downloaders_built
    remote.get_downloader(entry=entry)
    assert importer.downloaders_built == built + 1


@pytest_twisted.ensureDeferred
async def test_custom_importer_validation_error_fails_the_sync(
    upstream, storage, catalog, make_remote
):
    from importer import SyncError

    url = upstream.register("/listing.json", Serve(b'[{"path": "x"}]'))
    remote = make_remote(
        "on_demand", url=url, importer="tests.importer.plugins:JsonListingImporter"
    )
    with pytest.raises(SyncError, match="item 1: expected path"):
        await sync_remote(remote, catalog, storage)
    assert await catalog.count() == 0


@pytest_twisted.ensureDeferred
async def test_fetched_bytes_are_validated_by_the_downloader(upstream, make_remote, tmp_path):
    url = upstream.register("/f", Serve(b"real bytes"))
    remote = make_remote()
    entry = CatalogEntry("fixtures/f", "fixtures", url, 10, {"sha256": sha(b"other byte")})
    with pytest.raises(DigestValidationError):
        await remote.get_downloader(entry=entry, temp_dir=str(tmp_path)).run()
    assert list(tmp_path.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_unvalidated_bytes_are_never_stored_under_the_entry_digest(
    upstream, storage, catalog, make_remote
):
    """A custom importer whose downloaders skip validation cannot poison the store."""
    url = upstream.register("/f", Serve(b"actual bytes"))
    claimed = sha(b"claimed bytes")
    item = {"path": "f", "url": url, "sha256": claimed, "size": 12}
    listing = upstream.register("/listing.json", Serve(json.dumps([item]).encode()))
    remote = make_remote(
        "immediate", url=listing, importer="tests.importer.plugins:CarelessImporter"
    )
    report = await sync_remote(remote, catalog, storage)

    assert report.failed == [(url, "the downloader did not validate size and sha256")]
    assert artifacts(storage) == {} and not storage.has(claimed)


@pytest_twisted.ensureDeferred
async def test_the_listing_comes_through_the_remotes_treq_client(
    upstream, storage, catalog, make_remote
):
    """A manifest served with Content-Encoding: gzip (a server compressing text on the fly) is
    decoded by the treq client the built-in importer fetches listings with; the artifacts
    themselves stay wire bytes."""
    from tests.support.faults import Gzip

    data = b"payload\n" * 10
    gz = Gzip.of(b"a .gz artifact\n")
    upstream.register("/repo/a.txt", Serve(data))
    upstream.register("/repo/b.gz", gz)
    manifest = f"a.txt,{sha(data)},{len(data)}\nb.gz,{sha(gz.body)},{len(gz.body)}\n"
    upstream.register("/repo/PULP_MANIFEST", Gzip(Gzip.of(manifest.encode()).body, "text/plain"))
    remote = make_remote("immediate")

    report = await sync_remote(remote, catalog, storage)

    assert (report.downloaded, report.failed) == (2, [])
    assert artifacts(storage) == {sha(data): data, sha(gz.body): gz.body}
    [request] = upstream.requests("/repo/PULP_MANIFEST")
    assert request.headers["user-agent"] == remote.downloader_factory().user_agent()
