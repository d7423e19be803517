"""The store's black-box boundaries: artifact storage and the catalog.

Both are interfaces so that other implementations (another storage layout, a PostgreSQL
catalog shared by several streamer nodes) can be plugged in without touching callers.
Nothing in these interfaces names a database engine.
"""

from zope.interface import Attribute, Interface


class IArtifactStorage(Interface):
    """Content-addressed artifact storage (files named by their sha256)."""

    root = Attribute("The storage root folder (str).")
    temp_dir = Attribute(
        "This process's folder for partial and temporary files, on the same filesystem; no "
        "other process removes a file in it while this one lives."
    )

    def path_for(sha256):
        """Return the path where the artifact with this sha256 lives (or would live)."""

    def has(sha256):
        """Return True when the artifact with this sha256 is stored."""

    def open(sha256):
        """Open the stored artifact for binary reading; raise ArtifactNotFound if absent."""

    def clean_temp(min_age=0.0):
        """Remove this process's temporary files (older than min_age seconds) and those of
        processes that are gone; return how many were removed."""

    def writable_problem():
        """Why new files cannot be stored now (read-only, full, ...), or None when they can."""

    def check_room(size):
        """Raise OSError(ENOSPC) when fewer than *size* bytes are free for new files."""

    def close():
        """Remove this process's temporary folder (at the end); return the files removed."""

    def new_temp_file():
        """Return a new named, writable binary file in temp_dir, to be committed or removed."""

    def discard(temp_path):
        """Remove a temp file that will not be committed (a missing file is fine)."""

    def commit(temp_path, sha256, size):
        """Move a validated temp file into storage by atomic rename; return the artifact's path.

        The temp file is always gone afterwards: entered, dropped as a duplicate, or removed
        on failure (StorageError).
        """

    def import_file(path):
        """Copy a local file into storage; return (sha256, size)."""

    def iter_artifacts():
        """Yield (sha256, path) for every stored artifact."""

    def verify(on_bad=None):
        """Re-hash every artifact, quarantine mismatching ones; return a VerifyReport."""


class ICatalog(Interface):
    """Maps served paths (``<base_path>/<relative_path>``) to the entries that can provide them.

    Every method returns a Deferred; database work never blocks the reactor for long.
    """

    def open():
        """Connect and create or upgrade the schema if needed (see `migrate`). Deferred firing
        with None; fails with CatalogUnavailable when the database cannot be reached and with
        CatalogRefused when its schema is newer than this code."""

    def migrate():
        """Open if needed, create or upgrade the schema; Deferred firing with a SchemaReport
        (the version found, 0 for none, and the version now)."""

    def claim_storage(storage_id):
        """Record *storage_id* as the storage folder this catalog describes, unless one is
        recorded already. Deferred firing with the recorded id (compare it with yours)."""

    def close():
        """Release connections and threads. Deferred firing with None."""

    def lookup(path):
        """Deferred firing with the list of CatalogEntry for *path*, in the order to try them."""

    def list_dir(prefix):
        """Deferred firing with the list of ListingItem directly under folder *prefix*."""

    def listing_version():
        """Deferred firing with a str that changes whenever a replace_remote (in any process)
        changed what list_dir shows; "" before the first. Listings may be cached under it."""

    def replace_remote(remote, entries):
        """Make *entries* (an iterable of CatalogEntry) the complete set for *remote*.

        One transaction: new entries are added, changed ones updated, entries of that remote
        no longer listed are deleted. The iterable is consumed lazily, in chunks, possibly in
        a worker thread (it must not touch reactor state). Deferred firing with ReplaceReport.
        """

    def mark_stored(sha256, stored=True):
        """Set the stored flag on all entries with this sha256. Deferred firing with the count."""

    def mark_stored_many(sha256s):
        """Set the stored flag on all entries with any of these sha256s, in one transaction.
        Deferred firing with the count. (Optional for other implementations: callers fall
        back to one `mark_stored` per sha256 when it is missing.)"""

    def entries_for_remote(remote):
        """Deferred firing with the list of CatalogEntry of *remote*, ordered by path."""

    def count(remote=None):
        """Deferred firing with the number of entries (of one remote, or all)."""
