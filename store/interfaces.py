"""The store's black-box boundaries: artifact storage and the catalog.

Both are interfaces so that other implementations (another storage layout, a PostgreSQL
catalog shared by several streamer nodes) can be plugged in without touching callers.
Nothing in these interfaces names a database engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, BinaryIO

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    import os

    from store.catalog import CatalogEntry, ListingItem, ReplaceReport
    from store.schema import SchemaReport
    from store.storage import BadArtifact, VerifyReport


class IArtifactStorage(Interface):
    """Content-addressed artifact storage (files named by their sha256)."""

    root = Attribute("The storage root folder (str).")
    temp_dir = Attribute(
        "This process's folder for partial and temporary files, on the same filesystem; no "
        "other process removes a file in it while this one lives."
    )

    def path_for(sha256: str) -> str:
        """Return the path where the artifact with this sha256 lives (or would live)."""

    def has(sha256: str, size: int | None = None) -> bool:
        """Return True when the artifact with this sha256 is stored (with *size* bytes, if
        given: a file of another size is treated as not stored, as `open` does)."""

    def open(sha256: str, size: int | None = None) -> BinaryIO:
        """Open the stored artifact for binary reading; raise ArtifactNotFound if absent (or,
        given its *size*, of another size)."""

    def clean_temp(min_age: float = 0.0) -> int:
        """Remove this process's temporary files (older than min_age seconds) and those of
        processes that are gone; return how many were removed."""

    def writable_problem() -> str | None:
        """Why new files cannot be stored now (read-only, full, ...), or None when they can."""

    def check_room(size: int) -> None:
        """Raise OSError(ENOSPC) when fewer than *size* bytes are free for new files."""

    def close() -> int:
        """Remove this process's temporary folder (at the end); return the files removed."""

    def identity() -> str:
        """The storage folder's id, made on first use; a catalog records the id of the folder
        it describes so that a mismatched pair is refused."""

    def new_temp_file() -> IO[bytes]:
        """Return a new named, writable binary file in temp_dir, to be committed or removed."""

    def discard(temp_path: str) -> None:
        """Remove a temp file that will not be committed (a missing file is fine)."""

    def commit(temp_path: str, sha256: str, size: int, *, durable: bool = True) -> str:
        """Move a validated temp file into storage by atomic rename; return the artifact's path.

        The temp file is always gone afterwards: entered, dropped as a duplicate, or removed
        on failure (StorageError).
        """

    def import_file(path: str | os.PathLike[str]) -> tuple[str, int]:
        """Copy a local file into storage; return (sha256, size)."""

    def iter_artifacts() -> Iterator[tuple[str, str]]:
        """Yield (sha256, path) for every stored artifact."""

    def verify(on_bad: Callable[[BadArtifact], object] | None = None) -> VerifyReport:
        """Re-hash every artifact, quarantine mismatching ones; return a VerifyReport."""


class ICatalog(Interface):
    """Maps served paths (``<base_path>/<relative_path>``) to the entries that can provide them.

    Every method returns a Deferred; database work never blocks the reactor for long.
    """

    def open() -> Deferred[None]:
        """Connect and create or upgrade the schema if needed (see `migrate`). Deferred firing
        with None; fails with CatalogUnavailable when the database cannot be reached and with
        CatalogRefused when its schema is newer than this code."""

    def migrate() -> Deferred[SchemaReport]:
        """Open if needed, create or upgrade the schema; Deferred firing with a SchemaReport
        (the version found, 0 for none, and the version now)."""

    def claim_storage(storage_id: str) -> Deferred[str]:
        """Record *storage_id* as the storage folder this catalog describes, unless one is
        recorded already. Deferred firing with the recorded id (compare it with yours)."""

    def close() -> Deferred[None]:
        """Release connections and threads. Deferred firing with None."""

    def lookup(path: str) -> Deferred[list[CatalogEntry]]:
        """Deferred firing with the list of CatalogEntry for *path*, in the order to try them."""

    def list_dir(prefix: str) -> Deferred[list[ListingItem]]:
        """Deferred firing with the list of ListingItem directly under folder *prefix*."""

    def listing_version() -> Deferred[str]:
        """Deferred firing with a str that changes whenever a replace_remote (in any process)
        changed what list_dir shows; "" before the first. Listings may be cached under it."""

    def replace_remote(remote: str, entries: Iterable[CatalogEntry]) -> Deferred[ReplaceReport]:
        """Make *entries* (an iterable of CatalogEntry) the complete set for *remote*.

        One transaction: new entries are added, changed ones updated, entries of that remote
        no longer listed are deleted. The iterable is consumed lazily, in chunks, possibly in
        a worker thread (it must not touch reactor state). Deferred firing with ReplaceReport.
        """

    def mark_stored(sha256: str, stored: bool = True) -> Deferred[int]:
        """Set the stored flag on all entries with this sha256. Deferred firing with the count."""

    def mark_stored_many(sha256s: Iterable[str]) -> Deferred[int]:
        """Set the stored flag on all entries with any of these sha256s, in one transaction.
        Deferred firing with the count. (Optional for other implementations: callers fall
        back to one `mark_stored` per sha256 when it is missing.)"""

    def entries_for_remote(remote: str) -> Deferred[list[CatalogEntry]]:
        """Deferred firing with the list of CatalogEntry of *remote*, ordered by path."""

    def count(remote: str | None = None) -> Deferred[int]:
        """Deferred firing with the number of entries (of one remote, or all)."""
