"""Schema versions and the storage binding, on SQLite and PostgreSQL alike (``catalog_url``):
a catalog is created or upgraded at open, a newer schema is refused, and a catalog refuses a
storage folder other than the one it describes."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
import pytest_twisted

from store import (
    ArtifactStorage,
    CatalogRefused,
    SchemaReport,
    open_catalog,
    open_for_storage,
)
from store.catalog import sqlite_path


def raw_execute(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Run one statement on the catalog's database behind its back (as an operator would)."""
    path = sqlite_path(url)
    if path is not None:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def schema_module(url: str):
    if sqlite_path(url) is not None:
        import store.sqlite as module
    else:
        import store.postgres as module
    return module


@pytest_twisted.ensureDeferred
async def test_migrate_creates_then_finds_the_schema_up_to_date(catalog_url, tmp_path):
    version = schema_module(catalog_url).SCHEMA_VERSION
    catalog = open_catalog(catalog_url, str(tmp_path))
    report = await catalog.migrate()
    assert (report.before, report.after) == (0, version)
    assert report.describe().endswith(f"schema version {version} (created)")
    again = await catalog.migrate()
    assert again.describe().endswith(f"schema version {version} (up to date)")
    await catalog.close()
    reopened = open_catalog(catalog_url, str(tmp_path))
    assert (await reopened.migrate()).before == version
    await reopened.close()


@pytest_twisted.ensureDeferred
async def test_an_older_schema_is_upgraded_at_open(catalog_url, tmp_path, monkeypatch):
    module = schema_module(catalog_url)
    old = module.SCHEMA_VERSION
    catalog = open_catalog(catalog_url, str(tmp_path))
    await catalog.open()
    await catalog.close()
    # The next release adds a column; the same catalog opened by it is upgraded in place.
    statement = "ALTER TABLE catalog_entries ADD COLUMN note TEXT"
    monkeypatch.setattr(module, "MIGRATIONS", {**module.MIGRATIONS, old + 1: (statement,)})
    monkeypatch.setattr(module, "SCHEMA_VERSION", old + 1)
    newer = open_catalog(catalog_url, str(tmp_path))
    report = await newer.migrate()
    assert report == SchemaReport(report.location, old, old + 1)
    assert report.describe().endswith(f"(upgraded from version {old})")
    await newer.close()
    assert raw_execute(catalog_url, "SELECT note FROM catalog_entries") == []
    assert raw_execute(
        catalog_url, "SELECT value FROM catalog_meta WHERE key = %s", ("schema_version",)
    ) == [(str(old + 1),)]


@pytest_twisted.ensureDeferred
async def test_a_schema_newer_than_the_code_is_refused_in_one_line(catalog_url, tmp_path):
    catalog = open_catalog(catalog_url, str(tmp_path))
    await catalog.open()
    await catalog.close()
    raw_execute(
        catalog_url, "UPDATE catalog_meta SET value = %s WHERE key = %s", ("99", "schema_version")
    )
    again = open_catalog(catalog_url, str(tmp_path))
    with pytest.raises(CatalogRefused) as refused:
        await again.open()
    message = str(refused.value)
    assert "schema version 99, newer than this streamer supports" in message
    assert "\n" not in message
    with pytest.raises(Exception, match="not open"):
        again.lookup("x")  # a refused catalog is closed again, not half-open
    # and nothing was written to it
    assert raw_execute(
        catalog_url, "SELECT value FROM catalog_meta WHERE key = %s", ("schema_version",)
    ) == [("99",)]


@pytest_twisted.ensureDeferred
async def test_a_catalog_belongs_to_one_storage_folder(catalog_url, tmp_path):
    shared = ArtifactStorage(tmp_path / "shared")
    first = open_catalog(catalog_url, shared.root)
    await open_for_storage(first, shared)
    # A second process on the same folder (a second node on the shared mount) is welcome.
    second = open_catalog(catalog_url, shared.root)
    await open_for_storage(second, ArtifactStorage(tmp_path / "shared"))
    assert await second.count() == 0
    await second.close()
    await first.close()
    identity = (tmp_path / "shared" / "storage-id").read_text().strip()
    assert len(identity) == 32 and identity == shared.identity()

    # A node configured with another folder for the same catalog is refused, in one line.
    elsewhere = ArtifactStorage(tmp_path / "elsewhere")
    third = open_catalog(catalog_url, elsewhere.root)
    with pytest.raises(CatalogRefused) as refused:
        await open_for_storage(third, elsewhere)
    message = str(refused.value)
    assert identity in message and elsewhere.root in message and "\n" not in message
    with pytest.raises(Exception, match="not open"):
        third.lookup("x")
