"""PostgresCatalog: the ICatalog for several streamer processes or nodes sharing one database.

psycopg 3 is blocking, so every query runs in a thread pool of the catalog's own (never the
reactor's, which file commits and DNS use), and each of its threads owns one connection,
opened on first use: the pool of connections is the pool of threads, ``pool_size`` of each.
The reactor only waits for Deferreds.

Connections are in autocommit mode, so a lookup (the query of every content request) is one
round trip; writes run in explicit transactions. A connection the server dropped (a restart,
an idle timeout, a network cut) is replaced on the next call, and a call that failed because
its connection was lost is retried once on a new one, so a database restart costs no request
an error once the server is back. While the server cannot be reached, calls fail with
`CatalogUnavailable`; for a second after such a failure, calls fail at once without waiting
for another connection attempt (so a dead server does not fill the thread pool with connects).

The schema is versioned (`MIGRATIONS`, `store.schema`): created or upgraded at open under an
advisory lock (nodes starting together migrate once), a newer one refused. A database user
without DDL rights can run the streamer on a schema an owner migrated (``streamer migrate``).

A server that hangs (stopped, swapping, a network path that drops packets without a reset)
would hold a caller forever: queries have a deadline (`CALL_TIMEOUT`), after which the caller
gets CatalogUnavailable while the thread waits on, and `close` cuts the connections of threads
still waiting after `CLOSE_GRACE`, so a service can always stop.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterable
from itertools import islice
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from store.catalog import (
    LISTING_VERSION_KEY,
    CatalogEntry,
    ListingItem,
    ReplaceReport,
    new_listing_version,
    walk_listing,
)
from store.errors import CatalogError, CatalogUnavailable
from store.interfaces import ICatalog
from store.schema import SchemaReport, check_version, parse_version

__all__ = [
    "DEFAULT_POOL_SIZE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresCatalog",
    "connection_params",
    "redact",
]

#: The schema this code writes; older ones are upgraded at open, newer ones refused.
SCHEMA_VERSION = 1
DEFAULT_POOL_SIZE = 4
#: Paths one lookup query asks for at most.
LOOKUP_BATCH = 500
#: After a failed connection, calls fail at once for this many seconds.
RETRY_INTERVAL = 1.0
#: Seconds a query may take before its caller gets CatalogUnavailable (a server that hangs
#: answers nothing, and neither keepalives nor tcp_user_timeout notice: its kernel still
#: acknowledges). Not for replace_remote and migrations, which may rightly take long.
CALL_TIMEOUT = 5.0
#: Seconds `close` waits for running queries before it cuts their connections.
CLOSE_GRACE = 2.0
#: Connection parameters used unless the url sets them: fail fast on a dead address, notice
#: a peer that vanished (keepalives, unacknowledged writes) instead of waiting for minutes.
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
    "application_name": "twisted-streamer",
}
#: SQLSTATE classes of errors that pass by themselves: connection exception, insufficient
#: resources (too many connections, disk full), operator intervention (shutdown, cancel).
TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57")
#: pg_advisory_xact_lock key of migrations ("streamer" in ASCII, a constant of this schema).
MIGRATION_LOCK = 0x73747265616D6572

_COLUMNS = "path, remote, url, size, digests, stored, position"
_TEXT = 'text COLLATE "C" NOT NULL'  # byte order, as SQLite's: listings walk the path index

_META = "CREATE TABLE IF NOT EXISTS catalog_meta (key text PRIMARY KEY, value text NOT NULL)"

#: The statements of each schema version, applied in order to reach SCHEMA_VERSION.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""
        CREATE TABLE catalog_entries (
            path {_TEXT},
            remote {_TEXT},
            url {_TEXT},
            size bigint NOT NULL,
            sha256 text NOT NULL,
            digests jsonb NOT NULL,
            stored boolean NOT NULL DEFAULT false,
            position integer NOT NULL DEFAULT 0,
            PRIMARY KEY (path, remote, url)
        )
        """,
        "CREATE INDEX catalog_entries_sha256 ON catalog_entries (sha256)",
        "CREATE INDEX catalog_entries_remote ON catalog_entries (remote, path)",
    ),
}

_STAGING = f"""
    CREATE TEMP TABLE incoming (
        path {_TEXT},
        url {_TEXT},
        size bigint NOT NULL,
        sha256 text NOT NULL,
        digests jsonb NOT NULL,
        stored boolean NOT NULL,
        position integer NOT NULL,
        PRIMARY KEY (path, url)
    ) ON COMMIT DROP
"""


def redact(url: str) -> str:
    """*url* without its password and query (which may hold one), for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def connection_params(url: str) -> dict[str, str]:
    """libpq connection parameters for *url* (with `CONNECTION_DEFAULTS` for those it does
    not set); CatalogError naming the problem (never the password) if it is malformed."""
    import psycopg.conninfo

    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise CatalogError(f"catalog url {redact(url)}: {_one_line(exc)}") from None
    for port in str(params.get("port", "")).split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise CatalogError(f"catalog url {redact(url)}: bad port {port!r}")
    return {**CONNECTION_DEFAULTS, **{k: str(v) for k, v in params.items()}}


def _one_line(exc: BaseException | str) -> str:
    """psycopg's messages span lines (libpq adds hints): one line, for logs and stderr."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _encode_digests(digests: dict[str, str]) -> str:
    return json.dumps(digests, sort_keys=True)


def _entry(row: tuple[Any, ...]) -> CatalogEntry:
    path, remote, url, size, digests, stored, position = row
    return CatalogEntry(
        path=path,
        remote=remote,
        url=url,
        size=size,
        digests=digests,
        stored=stored,
        position=position,
    )


@implementer(ICatalog)
class PostgresCatalog:
    """The catalog in a PostgreSQL database named by a ``postgresql://`` url."""

    def __init__(self, url: str, reactor: Any = None, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.location = redact(url)
        self._params: dict[str, Any] = connection_params(url)
        if pool_size < 1:
            raise CatalogError(f"catalog pool_size must be at least 1, not {pool_size}")
        self.pool_size = pool_size
        self._reactor = reactor
        self._threads: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: set[Any] = set()
        self._down_until = 0.0
        self._down_error: CatalogUnavailable | None = None
        #: Seconds a query may take (`CALL_TIMEOUT`); 0 for none.
        self.call_timeout = CALL_TIMEOUT
        #: Set by `close`: threads make no new connection (nor retry) from then on.
        self._closing = False
        #: Paths waiting for a lookup query, with the Deferreds of their callers (in order).
        self._pending_lookups: dict[str, list[Deferred[list[CatalogEntry]]]] = {}
        self._lookup_batches = 0

    def __repr__(self) -> str:
        return f"PostgresCatalog({self.location!r})"

    # -- life cycle ---------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Start the thread pool, connect, and create or upgrade the schema."""
        if self._threads is not None:
            return succeed(None)
        return self.migrate().addCallback(lambda _: None)

    def migrate(self) -> Deferred[SchemaReport]:
        """Open if needed; create or upgrade the schema. Fires with a SchemaReport."""
        if self._threads is not None:
            return self._run(self._migrate, timeout=0)
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        self._closing = False
        self._threads = ThreadPool(0, self.pool_size, name=f"catalog {self.location}")
        self._threads.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_at_shutdown
        )

        def failed(f: Failure) -> Deferred[Any]:
            return self.close().addCallback(lambda _: f)

        return self._run(self._migrate, timeout=0).addErrback(failed)

    def close(self) -> Deferred[None]:
        """Stop the threads once their current query ended (cutting the connections of those
        still waiting after `CLOSE_GRACE` seconds) and close every connection."""
        threads, self._threads = self._threads, None
        if threads is None:
            return succeed(None)
        self._closing = True
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        # Joining the threads waits for their queries: do it off the reactor thread.
        d = deferToThread(self._stop_threads, threads)
        cut = self._reactor.callLater(CLOSE_GRACE, self._cut_connections)

        def stopped(result: Any) -> Any:
            if cut.active():
                cut.cancel()
            return result

        return d.addBoth(stopped)

    def _stop_at_shutdown(self) -> None:
        """The reactor stops without `close` having been called: cut, then join."""
        threads, self._threads = self._threads, None
        self._closing = True
        self._cut_connections()
        self._stop_threads(threads)

    def _stop_threads(self, threads: ThreadPool | None) -> None:
        if threads is not None:
            threads.stop()
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.close()
            except Exception:
                pass

    def _cut_connections(self) -> None:
        """Shut the sockets of every connection down: a thread waiting on one wakes with an
        error at once (closing the descriptor under it would not wake it)."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                fd = conn.pgconn.socket
                with socket.socket(fileno=os.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                pass  # closed meanwhile, or never connected

    # -- running work in the pool -------------------------------------------------------

    def _run(
        self, work: Any, *args: Any, retry: bool = True, timeout: float | None = None
    ) -> Deferred[Any]:
        """``work(connection, *args)`` in a pool thread; see the module docstring. The caller
        waits at most *timeout* seconds (default `call_timeout`; 0: no limit)."""
        if self._threads is None:
            raise CatalogError(f"{self!r} is not open; call open() first")
        if self._down_error is not None and self._reactor.seconds() < self._down_until:
            return fail(self._down_error)
        d = deferToThreadPool(self._reactor, self._threads, self._call, work, args, retry)
        limit = self.call_timeout if timeout is None else timeout
        if limit:
            d.addTimeout(limit, self._reactor, self._no_answer(limit))
        return d.addCallbacks(self._up, self._down)

    def _no_answer(self, limit: float) -> Any:
        def timed_out(result: Any, timeout: float) -> Any:
            raise CatalogUnavailable(f"catalog {self.location}: no answer within {limit:g} s")

        return timed_out

    def _up(self, result: Any) -> Any:
        self._down_error = None
        return result

    def _down(self, failure: Failure) -> Failure:
        if isinstance(failure.value, CatalogUnavailable):
            self._down_error = failure.value
            self._down_until = self._reactor.seconds() + RETRY_INTERVAL
        return failure

    def _call(self, work: Any, args: tuple[Any, ...], retry: bool) -> Any:
        """In a pool thread: run *work* on this thread's connection, once more on a new
        connection if the first one turned out to be dead (and *retry*)."""
        import psycopg

        conn = self._connection()
        try:
            return work(conn, *args)
        except psycopg.Error as exc:
            lost = conn.closed or conn.broken
            if not lost:
                raise self._translate(exc, lost) from None
            self._forget(conn)
            if not retry:
                raise self._translate(exc, lost) from None
        conn = self._connection()
        try:
            return work(conn, *args)
        except psycopg.Error as exc:
            lost = conn.closed or conn.broken
            if lost:
                self._forget(conn)
            raise self._translate(exc, lost) from None

    def _connection(self) -> Any:
        """This thread's connection, opened if it has none or its last one was lost."""
        import psycopg

        conn = getattr(self._local, "conn", None)
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        if conn is not None:
            self._forget(conn)
        if self._closing:
            raise CatalogUnavailable(f"catalog {self.location}: closed")
        try:
            conn = psycopg.connect(**self._params, autocommit=True)
        except psycopg.Error as exc:
            raise CatalogUnavailable(f"catalog {self.location}: {_one_line(exc)}") from None
        self._local.conn = conn
        with self._lock:
            self._connections.add(conn)
        return conn

    def _forget(self, conn: Any) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._connections.discard(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _translate(self, exc: Exception, lost: bool) -> CatalogError:
        """CatalogUnavailable when waiting may help (the connection is gone, or the server
        says it is shutting down, out of resources or cancelled the query), else CatalogError
        (a bad entry, a limit, a permission: retrying will not help)."""
        message = f"catalog {self.location}: {_one_line(exc)}"
        state = getattr(exc, "sqlstate", None) or ""
        if lost or state.startswith(TRANSIENT_SQLSTATE_CLASSES):
            return CatalogUnavailable(message)
        return CatalogError(message)

    # -- schema -------------------------------------------------------------------------

    def _migrate(self, conn: Any) -> SchemaReport:
        found = _schema_version(conn, self.location)
        check_version(found, SCHEMA_VERSION, self.location)
        if found == SCHEMA_VERSION:
            return SchemaReport(self.location, found, found)  # no DDL, no lock: read-only users
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(_META)
            found = _schema_version(conn, self.location)  # another node may have migrated
            check_version(found, SCHEMA_VERSION, self.location)
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO catalog_meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
        return SchemaReport(self.location, found, SCHEMA_VERSION)

    def claim_storage(self, storage_id: str) -> Deferred[str]:
        """Record *storage_id* unless another is recorded; fires with the recorded one."""
        return self._run(_claim_storage, storage_id)

    # -- queries ------------------------------------------------------------------------

    def lookup(self, path: str) -> Deferred[list[CatalogEntry]]:
        """Entries for *path*, in the order to try them (position, then remote).

        Lookups are batched: while every thread is busy, the paths asked for meanwhile wait
        in the reactor and go together in the next query (one round trip for up to
        `LOOKUP_BATCH` paths, each asked once however many requests want it). Under light
        load a lookup leaves at once, alone.
        """
        path = path.lstrip("/")
        waiter: Deferred[list[CatalogEntry]] = Deferred()
        waiters = self._pending_lookups.get(path)
        if waiters is None:
            if self._threads is None:
                raise CatalogError(f"{self!r} is not open; call open() first")
            self._pending_lookups[path] = waiters = []
        waiters.append(waiter)
        self._send_lookups()
        return waiter

    def _send_lookups(self) -> None:
        """Send the waiting paths as one query if a thread is free for it."""
        if not self._pending_lookups or self._lookup_batches >= self.pool_size:
            return
        batch: dict[str, list[Deferred[list[CatalogEntry]]]] = {}
        for path in list(islice(self._pending_lookups, LOOKUP_BATCH)):
            batch[path] = self._pending_lookups.pop(path)
        self._lookup_batches += 1
        d = maybeDeferred(self._run, _lookup_many, list(batch))

        def answered(found: dict[str, list[CatalogEntry]]) -> None:
            for path, waiters in batch.items():
                entries = found.get(path, [])
                for waiter in waiters:
                    waiter.callback(list(entries))

        def failed(failure: Failure) -> None:
            for waiters in batch.values():
                for waiter in waiters:
                    waiter.errback(failure)

        def next_batch(_: object) -> None:
            self._lookup_batches -= 1
            self._send_lookups()

        d.addCallbacks(answered, failed).addBoth(next_batch)

    def list_dir(self, prefix: str) -> Deferred[list[ListingItem]]:
        """Direct children (files and sub-folders) of folder *prefix* ("" is the top)."""
        return self._run(_list_dir, prefix.strip("/"))

    def listing_version(self) -> Deferred[str]:
        """A value that changes whenever a `replace_remote` (on any node) changed what
        listings show; "" before the first."""
        return self._run(_listing_version)

    def entries_for_remote(self, remote: str) -> Deferred[list[CatalogEntry]]:
        """All entries of *remote*, ordered by path."""
        return self._run(_entries_for_remote, remote)

    def count(self, remote: str | None = None) -> Deferred[int]:
        """Number of entries (of *remote*, or all)."""
        return self._run(_count, remote)

    # -- updates ------------------------------------------------------------------------

    def mark_stored(self, sha256: str, stored: bool = True) -> Deferred[int]:
        """Set the stored flag of every entry with *sha256*; fires with how many rows."""
        return self._run(_mark_stored, [sha256.lower()], bool(stored))

    def mark_stored_many(self, sha256s: Iterable[str]) -> Deferred[int]:
        """Set the stored flag of every entry with any of *sha256s*, in one statement."""
        return self._run(_mark_stored, [sha256.lower() for sha256 in sha256s], True)

    def replace_remote(
        self, remote: str, entries: Iterable[CatalogEntry]
    ) -> Deferred[ReplaceReport]:
        """Make *entries* the complete set of *remote*'s entries, in one transaction.

        *entries* is streamed to the server (COPY) from a pool thread, so it may be a lazy
        generator; it must not touch reactor state. If it raises, nothing changes and the
        Deferred fails with that error. Not retried on a lost connection (the iterable is
        spent): the sync reports the failure.
        """
        return self._run(_replace_remote, remote, entries, retry=False, timeout=0)


# -- work (runs in a pool thread, on that thread's connection) --------------------------------


def _schema_version(conn: Any, location: str) -> int:
    (table,) = conn.execute("SELECT to_regclass('catalog_meta')").fetchone()
    if table is None:
        return 0
    row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'").fetchone()
    return parse_version(row[0], location) if row else 0


def _claim_storage(conn: Any, storage_id: str) -> str:
    with conn.transaction():
        conn.execute(
            "INSERT INTO catalog_meta (key, value) VALUES ('storage_id', %s) "
            "ON CONFLICT (key) DO NOTHING",
            (storage_id,),
        )
        return conn.execute("SELECT value FROM catalog_meta WHERE key = 'storage_id'").fetchone()[0]


def _lookup_many(conn: Any, paths: list[str]) -> dict[str, list[CatalogEntry]]:
    params: tuple[Any, ...]
    if len(paths) == 1:  # the usual case under light load: the plainest plan
        where, params = "path = %s", (paths[0],)
    else:
        where, params = "path = ANY(%s)", (paths,)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM catalog_entries WHERE {where} "
        "ORDER BY path, position, remote, url",
        params,
    ).fetchall()
    found: dict[str, list[CatalogEntry]] = {}
    for row in rows:
        found.setdefault(row[0], []).append(_entry(row))
    return found


def _entries_for_remote(conn: Any, remote: str) -> list[CatalogEntry]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM catalog_entries WHERE remote = %s ORDER BY path, position, url",
        (remote,),
    ).fetchall()
    return [_entry(row) for row in rows]


def _count(conn: Any, remote: str | None) -> int:
    if remote is None:
        return conn.execute("SELECT count(*) FROM catalog_entries").fetchone()[0]
    return conn.execute(
        "SELECT count(*) FROM catalog_entries WHERE remote = %s", (remote,)
    ).fetchone()[0]


def _mark_stored(conn: Any, sha256s: list[str], stored: bool) -> int:
    if not sha256s:
        return 0
    cursor = conn.execute(
        "UPDATE catalog_entries SET stored = %s WHERE sha256 = ANY(%s)", (stored, sha256s)
    )
    return cursor.rowcount


def _list_dir(conn: Any, prefix: str) -> list[ListingItem]:
    def fetch(start: str, inclusive: bool, upper: str | None, limit: int) -> list[Any]:
        sql = (
            "SELECT path, min(size), bool_or(stored) FROM catalog_entries WHERE path "
            + (">= %s" if inclusive else "> %s")
            + (" AND path < %s" if upper is not None else "")
            + " GROUP BY path ORDER BY path LIMIT %s"
        )
        params = (start, upper, limit) if upper is not None else (start, limit)
        return conn.execute(sql, params).fetchall()

    return walk_listing(prefix, fetch)


def _listing_version(conn: Any) -> str:
    row = conn.execute(
        "SELECT value FROM catalog_meta WHERE key = %s", (LISTING_VERSION_KEY,)
    ).fetchone()
    return row[0] if row else ""


def _replace_remote(conn: Any, remote: str, entries: Iterable[CatalogEntry]) -> ReplaceReport:
    import psycopg

    total = 0
    with conn.transaction():
        conn.execute(_STAGING)
        cursor = conn.cursor()
        try:
            with cursor.copy(
                "COPY incoming (path, url, size, sha256, digests, stored, position) FROM STDIN"
            ) as copy:
                iterator = iter(entries)
                while chunk := list(islice(iterator, 1000)):
                    for entry in chunk:
                        if entry.remote != remote:
                            raise CatalogError(
                                f"replace_remote({remote!r}) got an entry of remote "
                                f"{entry.remote!r} for {entry.path!r}"
                            )
                        copy.write_row(
                            (
                                entry.path,
                                entry.url,
                                entry.size,
                                entry.sha256,
                                _encode_digests(entry.digests),
                                entry.stored,
                                entry.position,
                            )
                        )
                    total += len(chunk)
        except psycopg.errors.UniqueViolation as exc:
            detail = _one_line(exc.diag.message_detail or exc)
            raise CatalogError(
                f"replace_remote({remote!r}): the same path and url are listed twice ({detail})"
            ) from None
        conn.execute("ANALYZE incoming")
        # Syncs of one remote from several nodes take turns; other remotes go on in parallel.
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            ("streamer.replace_remote:" + remote,),
        )
        (removed,) = conn.execute(
            "SELECT count(*) FROM catalog_entries e WHERE e.remote = %s AND NOT EXISTS "
            "(SELECT 1 FROM incoming i WHERE i.path = e.path AND i.url = e.url)",
            (remote,),
        ).fetchone()
        existing, changed = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE e.size <> i.size "
            "OR e.digests <> i.digests OR e.position <> i.position) "
            "FROM incoming i JOIN catalog_entries e "
            "ON e.path = i.path AND e.remote = %s AND e.url = i.url",
            (remote,),
        ).fetchone()
        conn.execute(
            "DELETE FROM catalog_entries e WHERE e.remote = %s AND NOT EXISTS "
            "(SELECT 1 FROM incoming i WHERE i.path = e.path AND i.url = e.url)",
            (remote,),
        )
        # An entry is stored when the caller says so or when any entry with the same sha256
        # already is (the artifact store is shared by all remotes).
        conn.execute(
            "INSERT INTO catalog_entries AS e "
            "(path, remote, url, size, sha256, digests, stored, position) "
            "SELECT i.path, %s, i.url, i.size, i.sha256, i.digests, "
            "i.stored OR EXISTS (SELECT 1 FROM catalog_entries s "
            "WHERE s.sha256 = i.sha256 AND s.stored), i.position "
            "FROM incoming i "
            "ON CONFLICT (path, remote, url) DO UPDATE SET "
            "size = excluded.size, sha256 = excluded.sha256, digests = excluded.digests, "
            "stored = excluded.stored, position = excluded.position "
            "WHERE e.size <> excluded.size OR e.digests <> excluded.digests "
            "OR e.stored <> excluded.stored OR e.position <> excluded.position",
            (remote,),
        )
        if removed or changed or total != existing:  # what listings show changed
            conn.execute(
                "INSERT INTO catalog_meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
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
