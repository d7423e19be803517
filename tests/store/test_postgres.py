"""PostgresCatalog beyond the conformance suite: its pool of connections, a server that goes
away and comes back, one that is not there at all, and what a lookup costs."""

from __future__ import annotations

import hashlib
import socket
import time
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from store import CatalogEntry, CatalogError, CatalogUnavailable, open_catalog
from store.postgres import PostgresCatalog
from tests.support.polling import until


def entry(path: str, content: str = "x") -> CatalogEntry:
    return CatalogEntry(
        path=path,
        remote="r",
        url=f"http://upstream.invalid/{path}",
        size=1,
        digests={"sha256": hashlib.sha256(content.encode()).hexdigest()},
    )


def backends(url: str) -> int:
    """Connections the streamer holds on the database (seen from another session)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'twisted-streamer' "
            "AND datname = current_database()"
        ).fetchone()[0]


def terminate_backends(url: str) -> int:
    """What an administrator's pg_terminate_backend (or a failover) does to our sessions."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return len(
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'twisted-streamer' AND datname = current_database()"
            ).fetchall()
        )


@pytest.fixture
def pg_catalog(postgres_url, tmp_path):
    catalog = open_catalog(postgres_url, str(tmp_path), pool_size=2)
    assert isinstance(catalog, PostgresCatalog)
    pytest_twisted.blockon(catalog.open())
    yield catalog
    pytest_twisted.blockon(catalog.close())


@pytest_twisted.ensureDeferred
async def test_connections_are_pooled_and_closed(pg_catalog, postgres_url):
    await pg_catalog.replace_remote("r", [entry(f"p/{i}") for i in range(10)])
    found = await defer.gatherResults([pg_catalog.lookup(f"p/{i % 10}") for i in range(200)])
    assert all(len(entries) == 1 for entries in found)
    assert 1 <= backends(postgres_url) <= 2  # pool_size=2: never one connection per request
    await pg_catalog.close()
    await until(lambda: backends(postgres_url) == 0)
    with pytest.raises(Exception, match="not open"):
        pg_catalog.lookup("p/1")


@pytest_twisted.ensureDeferred
async def test_dropped_connections_are_replaced_without_a_failed_call(pg_catalog, postgres_url):
    await pg_catalog.replace_remote("r", [entry("a")])
    assert len(await pg_catalog.lookup("a")) == 1
    assert terminate_backends(postgres_url) >= 1
    # Each call on a dead connection is retried once on a fresh one: no caller sees it.
    results = await defer.gatherResults([pg_catalog.lookup("a") for _ in range(4)])
    assert [len(r) for r in results] == [1, 1, 1, 1]
    assert terminate_backends(postgres_url) >= 1
    assert await pg_catalog.mark_stored(entry("a").sha256) == 1


@pytest_twisted.ensureDeferred
async def test_a_restarted_server_is_used_again_without_reopening(
    pg_catalog, postgres_cluster, postgres_url
):
    await pg_catalog.replace_remote("r", [entry("a")])
    await postgres_cluster.stop()
    with pytest.raises(CatalogUnavailable) as down:
        await pg_catalog.lookup("a")
    message = str(down.value)
    assert message.startswith(f"catalog {pg_catalog.location}: ") and "\n" not in message
    # While it is down, calls fail at once instead of each waiting on a connection attempt.
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(CatalogUnavailable):
            await pg_catalog.lookup("a")
    assert time.monotonic() - started < 0.5
    await postgres_cluster.start()

    async def answers() -> bool:
        try:
            return len(await pg_catalog.lookup("a")) == 1
        except CatalogUnavailable:
            return False

    deadline = time.monotonic() + 10
    while not await answers():
        assert time.monotonic() < deadline, "the catalog never came back"
        await task.deferLater(reactor, 0.05, lambda: None)
    assert await pg_catalog.count() == 1


@pytest_twisted.ensureDeferred
async def test_no_server_at_open_is_one_line_and_quick(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    catalog = open_catalog(f"postgresql://u:s3cret@127.0.0.1:{port}/db", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(CatalogUnavailable) as down:
        await catalog.open()
    assert time.monotonic() - started < 5
    message = str(down.value)
    assert f"catalog postgresql://u@127.0.0.1:{port}/db: " in message
    assert "\n" not in message and "s3cret" not in message
    with pytest.raises(Exception, match="not open"):
        catalog.lookup("a")


@pytest_twisted.ensureDeferred
async def test_a_refused_write_is_an_error_not_an_outage(pg_catalog):
    """A listing PostgreSQL cannot take (a path longer than its index allows, ~2.7 kB) fails
    that sync with one line and changes nothing; the catalog is not taken for down."""
    await pg_catalog.replace_remote("r", [entry("kept")])
    huge = "big/" + "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(200))
    with pytest.raises(CatalogError) as refused:
        await pg_catalog.replace_remote("r", [entry("new"), entry(huge)])
    assert not isinstance(refused.value, CatalogUnavailable)
    assert "\n" not in str(refused.value)
    assert [e.path for e in await pg_catalog.entries_for_remote("r")] == ["kept"]
    assert await pg_catalog.lookup(huge) == []  # answered at once: no outage was declared


@pytest_twisted.ensureDeferred
async def test_a_user_without_ddl_rights_runs_on_a_migrated_schema(
    postgres_url, tmp_path, monkeypatch
):
    """The owner runs `streamer migrate`; the service may then use a role that can only read
    and write rows (and make its temp table), never change the schema."""
    import psycopg

    owner = open_catalog(postgres_url, str(tmp_path))
    assert (await owner.migrate()).before == 0
    await owner.close()
    role = f"rows_only_{tmp_path.name[-8:].replace('-', '_')}".lower()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
    user = urlsplit(postgres_url).username
    limited_url = postgres_url.replace(f"//{user}@", f"//{role}@", 1)
    limited = open_catalog(limited_url, str(tmp_path))
    await limited.open()
    try:
        assert await limited.claim_storage("abc") == "abc"
        report = await limited.replace_remote("r", [entry("a"), entry("b/c")])
        assert report.added == 2
        assert [e.path for e in await limited.lookup("b/c")] == ["b/c"]
        assert await limited.mark_stored(entry("a").sha256) == 2
    finally:
        await limited.close()
    # An upgrade needs the owner: the limited role gets one line saying so, not an outage.
    import store.postgres as module

    upgrade = ("ALTER TABLE catalog_entries ADD COLUMN note text",)
    monkeypatch.setattr(module, "MIGRATIONS", {**module.MIGRATIONS, 2: upgrade})
    monkeypatch.setattr(module, "SCHEMA_VERSION", 2)
    with pytest.raises(CatalogError, match="permission denied") as refused:
        await open_catalog(limited_url, str(tmp_path)).open()
    assert not isinstance(refused.value, CatalogUnavailable)


@pytest_twisted.ensureDeferred
async def test_nodes_starting_together_on_a_new_database_migrate_once(postgres_url, tmp_path):
    catalogs = [open_catalog(postgres_url, str(tmp_path)) for _ in range(4)]
    reports = await defer.gatherResults([c.migrate() for c in catalogs], consumeErrors=True)
    assert sorted(r.before for r in reports) == [0, 1, 1, 1]  # one created it, three found it
    await defer.gatherResults([c.close() for c in catalogs])


@pytest_twisted.ensureDeferred
async def test_a_hung_server_costs_a_deadline_not_a_hang(pg_catalog, postgres_cluster):
    """A server that accepts nothing and answers nothing (SIGSTOP: its kernel still
    acknowledges, so no TCP timeout fires): callers get CatalogUnavailable after the
    deadline, and the catalog still closes (its waiting threads are cut loose)."""
    await pg_catalog.replace_remote("r", [entry("a")])
    pg_catalog.call_timeout = 0.5
    postgres_cluster.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(CatalogUnavailable, match="no answer within 0.5 s"):
            await pg_catalog.lookup("a")
        assert time.monotonic() - started < 2
        started = time.monotonic()
        await pg_catalog.close()
        assert time.monotonic() - started < 5
    finally:
        postgres_cluster.thaw()
