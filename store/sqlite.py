"""SQLiteCatalog: the embedded default ICatalog, one SQLite file in WAL mode.

Database work runs in one worker thread (adbapi ConnectionPool with cp_max=1: SQLite has one
writer anyway), so the reactor only waits for Deferreds. The one exception is `lookup`, the
query every content request makes: a point read on the primary key of a WAL database takes
microseconds and never waits for a writer, so it runs on a read-only connection in the
calling thread, which saves two thread hops per request (it falls back to the worker thread
if the database is ever busy).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from itertools import islice
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from store.catalog import (
    LISTING_VERSION_KEY,
    CatalogEntry,
    ListingItem,
    ReplaceReport,
    new_listing_version,
    walk_listing,
)
from store.digests import is_sha256_hex
from store.errors import CatalogError
from store.interfaces import ICatalog
from store.schema import SchemaReport, check_version, parse_version

#: The schema this code writes; older ones are upgraded at open, newer ones refused.
SCHEMA_VERSION = 1
BATCH_SIZE = 1000
BUSY_TIMEOUT_MS = 10_000
#: The in-thread read connection gives up this quickly and lets the worker thread wait instead.
READ_BUSY_TIMEOUT_MS = 20

_COLUMNS = "path, remote, url, size, digests, stored, position"

_META = """
    CREATE TABLE IF NOT EXISTS catalog_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
"""

#: The statements of each schema version, applied in order to reach SCHEMA_VERSION.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
    CREATE TABLE IF NOT EXISTS catalog_entries (
        path TEXT NOT NULL,
        remote TEXT NOT NULL,
        url TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        digests TEXT NOT NULL,
        stored INTEGER NOT NULL DEFAULT 0,
        position INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (path, remote, url)
    ) WITHOUT ROWID
    """,
        "CREATE INDEX IF NOT EXISTS catalog_entries_sha256 ON catalog_entries (sha256)",
        "CREATE INDEX IF NOT EXISTS catalog_entries_remote ON catalog_entries (remote, path)",
    ),
}

# Per-connection staging table for replace_remote (TEMP tables live with the connection).
_STAGING = """
    CREATE TEMP TABLE IF NOT EXISTS incoming (
        path TEXT NOT NULL,
        url TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        digests TEXT NOT NULL,
        stored INTEGER NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (path, url)
    ) WITHOUT ROWID
"""


def _setup_connection(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(_STAGING)


def _encode_digests(digests: dict[str, str]) -> str:
    if len(digests) == 1:  # the usual case: sha256 only; skip json.dumps for speed
        return '{"sha256": "' + digests["sha256"] + '"}'
    return json.dumps(digests, sort_keys=True)


#: How `_encode_digests` writes the usual digests, a sha256 alone: ``{"sha256": "<64 hex>"}``.
_SHA256_ONLY = '{"sha256": "'
_SHA256_ONLY_LENGTH = len(_SHA256_ONLY) + 64 + 2


def _entry(row: tuple[Any, ...]) -> CatalogEntry:
    path, remote, url, size, digests, stored, position = row
    if (
        len(digests) == _SHA256_ONLY_LENGTH
        and digests.startswith(_SHA256_ONLY)
        and digests.endswith('"}')
        and is_sha256_hex(sha256 := digests[len(_SHA256_ONLY) : -2])
        and path
        and path[0] != "/"
        and type(size) is int
        and size >= 0
    ):
        # A row as this catalog writes it (a lookup reads one per request): its values pass
        # `CatalogEntry`'s checks, so none are run again, and no JSON is parsed.
        return CatalogEntry.checked(
            path, remote, url, size, {"sha256": sha256}, bool(stored), position
        )
    return CatalogEntry(
        path=path,
        remote=remote,
        url=url,
        size=size,
        digests=json.loads(digests),
        stored=bool(stored),
        position=position,
    )


@implementer(ICatalog)
class SQLiteCatalog:
    """The catalog in one SQLite file (or ``:memory:``), reached through a one-thread pool."""

    def __init__(self, database: str | os.PathLike[str], reactor: Any = None) -> None:
        self.database = os.fspath(database)
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None
        self._reader: sqlite3.Connection | None = None
        #: The write connection of threads that mark batches themselves
        #: (`mark_stored_many_here`): one, made on first use, used by one thread at a time.
        self._writer: sqlite3.Connection | None = None
        self._writer_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteCatalog({self.database!r})"

    # -- life cycle ---------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Start the worker thread, connect (WAL mode) and create or upgrade the schema."""
        if self._pool is not None:
            return succeed(None)
        return self.migrate().addCallback(lambda _: None)

    def migrate(self) -> Deferred[SchemaReport]:
        """Open if needed; create or upgrade the schema. Fires with a SchemaReport."""
        if self._pool is not None:
            return self._run(_migrate, self.database)
        if self.database != ":memory:":
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.database)), exist_ok=True)
            except OSError as exc:
                raise CatalogError(f"cannot create the catalog folder: {exc}") from exc
        kwargs: dict[str, Any] = {
            "database": self.database,
            "check_same_thread": False,
            # Writes start with BEGIN IMMEDIATE so concurrent writers queue on busy_timeout
            # instead of failing when a read transaction upgrades.
            "isolation_level": "IMMEDIATE",
            "cp_min": 1,
            "cp_max": 1,
            "cp_openfun": _setup_connection,
            "cp_noisy": False,
        }
        if self._reactor is not None:
            kwargs["cp_reactor"] = self._reactor
        self._pool = adbapi.ConnectionPool("sqlite3", **kwargs)
        d = self._run(_migrate, self.database)

        def opened(report: SchemaReport) -> SchemaReport:
            self._open_reader()
            return report

        def failed(f: Failure) -> Failure:
            self._close_pool()
            return f

        return d.addCallbacks(opened, failed)

    def _open_reader(self) -> None:
        """The read-only connection `lookup` uses in the calling thread (not for ``:memory:``,
        which is private to the worker's connection)."""
        if self.database == ":memory:" or self._pool is None:
            return
        try:
            reader = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
            reader.execute(f"PRAGMA busy_timeout = {READ_BUSY_TIMEOUT_MS}")
            reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error:
            return  # lookups keep using the worker thread
        self._reader = reader

    def close(self) -> Deferred[None]:
        """Close the connection and stop the worker thread."""
        self._close_pool()
        return succeed(None)

    def _close_pool(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        with self._writer_lock:  # a committing thread marking now finishes first
            writer, self._writer = self._writer, None
            pool, self._pool = self._pool, None  # (then none makes another writer)
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.close()

    def _run(self, interaction: Any, *args: Any) -> Deferred[Any]:
        if self._pool is None:
            raise CatalogError(f"{self!r} is not open; call open() first")
        d = self._pool.runInteraction(interaction, *args)
        return d.addErrback(self._translate_error)

    def _translate_error(self, failure: Failure) -> Failure:
        if failure.check(sqlite3.Error):
            raise CatalogError(
                f"catalog database {self.database!r}: {failure.value}"
            ) from failure.value
        return failure

    # -- queries ------------------------------------------------------------------------

    def lookup(self, path: str) -> Deferred[list[CatalogEntry]]:
        """Entries for *path*, in the order to try them (position, then remote)."""
        found = self._read_now(path)
        if found is not None:
            return succeed(found)
        return self._run(_lookup, path.lstrip("/"))

    def lookup_now(self, path: str) -> list[CatalogEntry] | None:
        """`lookup`'s answer at once, read in this thread; None when it cannot be had without
        waiting (no reader, or the database busy: a checkpoint or recovery), for `lookup`'s
        worker thread to wait for it. A caller in the reactor gets its answer without a
        Deferred to wait on."""
        return self._read_now(path)

    def _read_now(self, path: str) -> list[CatalogEntry] | None:
        if self._reader is None:
            return None
        try:
            return _lookup(self._reader.cursor(), path.lstrip("/"))
        except sqlite3.OperationalError:
            return None

    def list_dir(self, prefix: str) -> Deferred[list[ListingItem]]:
        """Direct children (files and sub-folders) of folder *prefix* ("" is the top)."""
        return self._run(_list_dir, prefix.strip("/"))

    def listing_version(self) -> Deferred[str]:
        """A value that changes whenever a `replace_remote` (in any process) changed what
        listings show; "" before the first. One primary-key read, like `lookup`."""
        if self._reader is not None:
            try:
                return succeed(_listing_version(self._reader.cursor()))
            except sqlite3.OperationalError:
                pass
        return self._run(_listing_version)

    def entries_for_remote(self, remote: str) -> Deferred[list[CatalogEntry]]:
        """All entries of *remote*, ordered by path."""
        return self._run(_entries_for_remote, remote)

    def count(self, remote: str | None = None) -> Deferred[int]:
        """Number of entries (of *remote*, or all)."""
        return self._run(_count, remote)

    # -- updates ------------------------------------------------------------------------

    def claim_storage(self, storage_id: str) -> Deferred[str]:
        """Record *storage_id* unless another is recorded; fires with the recorded one."""
        return self._run(_claim_storage, storage_id)

    def mark_stored(self, sha256: str, stored: bool = True) -> Deferred[int]:
        """Set the stored flag of every entry with *sha256*; fires with how many rows."""
        return self._run(_mark_stored, sha256.lower(), bool(stored))

    def mark_stored_many(self, sha256s: Iterable[str]) -> Deferred[int]:
        """Set the stored flag of every entry with any of *sha256s*, in one transaction;
        fires with how many rows. (A sync marks each commit batch at once.)"""
        return self._run(_mark_stored_many, [sha256.lower() for sha256 in sha256s])

    def mark_stored_many_here(self, sha256s: Iterable[str]) -> int | None:
        """`mark_stored_many` in the calling thread, which waits for it; how many rows, or
        None when it cannot be done here (``:memory:``, private to the worker's connection;
        not open), for `mark_stored_many` to do it.

        For a thread of its own, never the reactor's: the committing thread marks its batch
        so, and the reactor hands no work to the worker thread and hears nothing back from
        it. Such threads write through one connection of their own, one at a time (it and the
        worker's queue on ``busy_timeout``, as processes sharing the file do). Raises
        CatalogError."""
        if self.database == ":memory:":
            return None
        try:
            with self._writer_lock:
                if self._pool is None:  # closed (or never opened): not here
                    return None
                writer = self._writer if self._writer is not None else self._new_writer()
                with writer:  # one transaction: committed, or rolled back on an error
                    return _mark_stored_many(writer.cursor(), [sha.lower() for sha in sha256s])
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog database {self.database!r}: {exc}") from exc

    def _new_writer(self) -> sqlite3.Connection:
        """`mark_stored_many_here`'s write connection, made now (under its lock)."""
        writer = sqlite3.connect(
            self.database, isolation_level="IMMEDIATE", check_same_thread=False
        )
        try:
            writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            writer.execute("PRAGMA synchronous = NORMAL")  # (WAL: as the worker's)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        return writer

    def replace_remote(
        self, remote: str, entries: Iterable[CatalogEntry]
    ) -> Deferred[ReplaceReport]:
        """Make *entries* the complete set of *remote*'s entries, in one transaction.

        *entries* is consumed in the database thread in chunks of BATCH_SIZE, so it may be
        a lazy generator over a 100,000-line manifest; it must not touch reactor state. If
        it raises, nothing changes and the Deferred fails with that error.
        """
        return self._run(_replace_remote, remote, entries)


# -- interactions (run in the database thread) --------------------------------------------


def _migrate(txn: Any, location: str) -> SchemaReport:
    """Bring the schema to SCHEMA_VERSION in one write transaction (others wait for it)."""
    try:
        # Python's sqlite3 opens no transaction before DDL: take the write lock ourselves,
        # so two processes starting together migrate one after the other.
        txn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        pass  # already in a transaction
    txn.execute(_META)
    txn.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'")
    row = txn.fetchone()
    found = parse_version(row[0], location) if row else 0
    check_version(found, SCHEMA_VERSION, location)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version]:
            txn.execute(statement)
    if found != SCHEMA_VERSION:
        txn.execute(
            "INSERT OR REPLACE INTO catalog_meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
    return SchemaReport(location, found, SCHEMA_VERSION)


def _claim_storage(txn: Any, storage_id: str) -> str:
    txn.execute(
        "INSERT OR IGNORE INTO catalog_meta (key, value) VALUES ('storage_id', ?)", (storage_id,)
    )
    txn.execute("SELECT value FROM catalog_meta WHERE key = 'storage_id'")
    return txn.fetchone()[0]


def _lookup(txn: Any, path: str) -> list[CatalogEntry]:
    txn.execute(
        f"SELECT {_COLUMNS} FROM catalog_entries WHERE path = ? ORDER BY position, remote, url",
        (path,),
    )
    return [_entry(row) for row in txn.fetchall()]


def _entries_for_remote(txn: Any, remote: str) -> list[CatalogEntry]:
    txn.execute(
        f"SELECT {_COLUMNS} FROM catalog_entries WHERE remote = ? ORDER BY path, position, url",
        (remote,),
    )
    return [_entry(row) for row in txn.fetchall()]


def _count(txn: Any, remote: str | None) -> int:
    if remote is None:
        txn.execute("SELECT COUNT(*) FROM catalog_entries")
    else:
        txn.execute("SELECT COUNT(*) FROM catalog_entries WHERE remote = ?", (remote,))
    return txn.fetchone()[0]


def _mark_stored(txn: Any, sha256: str, stored: bool) -> int:
    txn.execute("UPDATE catalog_entries SET stored = ? WHERE sha256 = ?", (int(stored), sha256))
    return txn.rowcount


def _mark_stored_many(txn: Any, sha256s: list[str]) -> int:
    txn.executemany(
        "UPDATE catalog_entries SET stored = 1 WHERE sha256 = ?", [(x,) for x in sha256s]
    )
    return txn.rowcount


def _list_dir(txn: Any, prefix: str) -> list[ListingItem]:
    def fetch(start: str, inclusive: bool, upper: str | None, limit: int) -> list[Any]:
        sql = (
            "SELECT path, MIN(size), MAX(stored) FROM catalog_entries WHERE path "
            + (">= ?" if inclusive else "> ?")
            + (" AND path < ?" if upper is not None else "")
            + " GROUP BY path ORDER BY path LIMIT ?"
        )
        txn.execute(sql, (start, upper, limit) if upper is not None else (start, limit))
        return txn.fetchall()

    return walk_listing(prefix, fetch)


def _listing_version(txn: Any) -> str:
    txn.execute("SELECT value FROM catalog_meta WHERE key = ?", (LISTING_VERSION_KEY,))
    row = txn.fetchone()
    return row[0] if row else ""


def _replace_remote(txn: Any, remote: str, entries: Iterable[CatalogEntry]) -> ReplaceReport:
    txn.execute("DELETE FROM incoming")  # the first write: BEGIN IMMEDIATE happens here
    total = 0
    iterator = iter(entries)
    while chunk := list(islice(iterator, BATCH_SIZE)):
        rows = []
        for entry in chunk:
            if entry.remote != remote:
                raise CatalogError(
                    f"replace_remote({remote!r}) got an entry of remote {entry.remote!r} "
                    f"for {entry.path!r}"
                )
            rows.append(
                (
                    entry.path,
                    entry.url,
                    entry.size,
                    entry.sha256,
                    _encode_digests(entry.digests),
                    int(entry.stored),
                    entry.position,
                )
            )
        try:
            txn.executemany("INSERT INTO incoming VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            raise CatalogError(
                f"replace_remote({remote!r}): the same path and url are listed twice "
                f"(near entry {total + 1}..{total + len(rows)})"
            ) from None
        total += len(rows)

    txn.execute(
        "SELECT COUNT(*) FROM catalog_entries e WHERE e.remote = ? AND NOT EXISTS "
        "(SELECT 1 FROM incoming i WHERE i.path = e.path AND i.url = e.url)",
        (remote,),
    )
    (removed,) = txn.fetchone()
    txn.execute(
        "SELECT COUNT(*), "
        "COALESCE(SUM(e.size != i.size OR e.digests != i.digests OR e.position != i.position),"
        " 0) FROM incoming i JOIN catalog_entries e "
        "ON e.path = i.path AND e.remote = ? AND e.url = i.url",
        (remote,),
    )
    existing, changed = txn.fetchone()

    txn.execute(
        "DELETE FROM catalog_entries WHERE remote = ? AND NOT EXISTS "
        "(SELECT 1 FROM incoming i WHERE i.path = catalog_entries.path "
        "AND i.url = catalog_entries.url)",
        (remote,),
    )
    # An entry is stored when the caller says so or when any entry with the same sha256
    # already is (the artifact store is shared by all remotes).
    txn.execute(
        "INSERT INTO catalog_entries "
        "(path, remote, url, size, sha256, digests, stored, position) "
        "SELECT i.path, ?, i.url, i.size, i.sha256, i.digests, "
        "i.stored OR EXISTS (SELECT 1 FROM catalog_entries s "
        "WHERE s.sha256 = i.sha256 AND s.stored = 1), i.position "
        "FROM incoming i WHERE true "
        "ON CONFLICT (path, remote, url) DO UPDATE SET "
        "size = excluded.size, sha256 = excluded.sha256, digests = excluded.digests, "
        "stored = excluded.stored, position = excluded.position "
        "WHERE catalog_entries.size != excluded.size "
        "OR catalog_entries.digests != excluded.digests "
        "OR catalog_entries.stored != excluded.stored "
        "OR catalog_entries.position != excluded.position",
        (remote,),
    )
    txn.execute("DELETE FROM incoming")
    if removed or changed or total != existing:  # what listings show changed
        txn.execute(
            "INSERT OR REPLACE INTO catalog_meta (key, value) VALUES (?, ?)",
            (LISTING_VERSION_KEY, new_listing_version()),
        )
    return ReplaceReport(
        remote=remote,
        total=total,
        added=total - existing,
        changed=changed,
        unchanged=existing - changed,
        removed=removed,
    )
