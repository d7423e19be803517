"""Catalog values and ``open_catalog``, which picks an ICatalog implementation from a URL.

The values here are what every catalog implementation speaks; nothing in them depends on
the database behind it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer

from store.digests import is_sha256_hex
from store.errors import CatalogError
from store.interfaces import IArtifactStorage, ICatalog
from store.schema import check_storage_id

DEFAULT_CATALOG_FILE = "catalog.sqlite3"

_SQLITE = "sqlite:///"


def catalog_scheme(url: str) -> str:
    """The lower-case scheme of a catalog url (``sqlite``, ``postgresql``...), "" for none."""
    return urlsplit(url).scheme.lower() if "://" in url else ""


def sqlite_path(url: str, base_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The file a ``sqlite:///path`` catalog url names, None for a url of another scheme.

    A relative path is joined to *base_dir* when one is given (``:memory:`` stays as it is).
    CatalogError (the reason alone) for a sqlite url with a host or without a path.
    """
    if catalog_scheme(url) != "sqlite":
        return None
    if not url.lower().startswith(_SQLITE):
        raise CatalogError("expected sqlite:///path (three slashes, no host)")
    path = url[len(_SQLITE) :]
    if not path:
        raise CatalogError("the SQLite file path is empty")
    if base_dir is not None and path != ":memory:" and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(os.fspath(base_dir), path))
    return path


def _normalise_digests(value: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"digests must be a mapping of algorithm to hex digest, not {value!r}")
    return {str(k).lower(): str(v).lower() for k, v in value.items()}


def _check_digests(_instance: object, _attribute: object, value: dict[str, str]) -> None:
    if not is_sha256_hex(value.get("sha256")):
        raise ValueError(f"digests must hold a sha256 of 64 hex characters, got {value!r}")


def _check_path(_instance: object, _attribute: object, value: str) -> None:
    if not value or value.startswith("/"):
        raise ValueError(f"catalog path must be non-empty and relative, got {value!r}")


#: The largest size a catalog holds: its size column is a signed 64-bit integer (SQLite's
#: INTEGER, PostgreSQL's bigint).
MAX_SIZE = (1 << 63) - 1


def _check_size(_instance: object, _attribute: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"size must be a non-negative integer, got {value!r}")
    if value > MAX_SIZE:
        raise ValueError(f"size must be at most {MAX_SIZE}, got {value}")


@attrs.frozen
class CatalogEntry:
    """One way to get the content served at *path*.

    *path* is the served path ``<base_path>/<relative_path>`` without a leading slash;
    *remote* names the remote that provides it from upstream *url*. Entries for one path
    are tried in order of (*position*, *remote*).
    """

    path: str = attrs.field(validator=_check_path)
    remote: str
    url: str
    size: int = attrs.field(validator=_check_size)
    digests: dict[str, str] = attrs.field(
        converter=_normalise_digests, validator=_check_digests, hash=False
    )
    stored: bool = attrs.field(default=False, converter=bool)
    position: int = 0

    @property
    def sha256(self) -> str:
        """The artifact's sha256 hex digest (its name in artifact storage)."""
        return self.digests["sha256"]

    @classmethod
    def checked(
        cls,
        path: str,
        remote: str,
        url: str,
        size: int,
        digests: dict[str, str],
        stored: bool,
        position: int,
    ) -> CatalogEntry:
        """An entry of values known to pass the checks already (a relative path, a size of
        at least 0, lower-case digests with a sha256, a bool: an importer's validated
        listing), made without running the converter and validators again. A sync makes
        two entries per listed file; this costs half of ``CatalogEntry(...)``."""
        entry = object.__new__(cls)
        set_ = object.__setattr__  # (the class is frozen)
        set_(entry, "path", path)
        set_(entry, "remote", remote)
        set_(entry, "url", url)
        set_(entry, "size", size)
        set_(entry, "digests", digests)
        set_(entry, "stored", stored)
        set_(entry, "position", position)
        return entry


@attrs.frozen
class ListingItem:
    """One direct child of a catalog folder: a file (with size) or a sub-folder."""

    name: str
    is_dir: bool
    size: int | None = None
    stored: bool = False


@attrs.frozen
class ReplaceReport:
    """What ``replace_remote`` changed for one remote."""

    remote: str
    total: int
    added: int
    changed: int
    unchanged: int
    removed: int


#: Rows a listing reads per query.
LISTING_BATCH = 1000
#: ``fetch(start, inclusive, upper, limit)``: up to *limit* ``(path, min size, any stored)``
#: rows, one per distinct path ``>= start`` (``> start`` when not *inclusive*) and ``< upper``
#: (no bound when None), in byte order of path.
#: The ``catalog_meta`` key whose value changes whenever a `replace_remote` changes what
#: listings show (paths added, removed or resized): listings may be cached under it.
LISTING_VERSION_KEY = "listing_version"


def new_listing_version() -> str:
    """A fresh value for `LISTING_VERSION_KEY` (random: several writers never collide)."""
    return uuid.uuid4().hex


ListingFetch = Callable[[str, bool, "str | None", int], Sequence[tuple[str, int, Any]]]


def walk_listing(prefix: str, fetch: ListingFetch) -> list[ListingItem]:
    """The direct children of folder *prefix*, read through *fetch* (one implementation per
    database): files come in batches, and each sub-folder costs one seek past its contents,
    so a folder of a few entries above 100,000 files is listed in a few queries."""
    base = prefix + "/" if prefix else ""
    upper = prefix + "0" if prefix else None  # "0" sorts right after "/"
    items: list[ListingItem] = []
    start, inclusive = base, True
    while True:
        rows = fetch(start, inclusive, upper, LISTING_BATCH)
        if not rows:
            break
        for path, size, stored in rows:
            name, sep, _rest = path[len(base) :].partition("/")
            if sep:
                if name:
                    items.append(ListingItem(name=name, is_dir=True))
                start, inclusive = base + name + "0", True  # skip the whole sub-folder
                break
            items.append(ListingItem(name=name, is_dir=False, size=size, stored=bool(stored)))
        else:
            if len(rows) < LISTING_BATCH:
                break
            start, inclusive = rows[-1][0], False
    # Path order puts "a.txt" before the folder "a" ("." sorts before "/"): sort by name.
    items.sort(key=lambda item: (item.name, item.is_dir))
    return items


def open_catalog(
    url: str,
    storage_root: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    reactor: object | None = None,
    pool_size: int | None = None,
) -> ICatalog:
    """Return an (unopened) ICatalog for *url*; call its ``open()`` before use.

    * ``""``: SQLite file ``catalog.sqlite3`` under *storage_root* (the default).
    * ``sqlite:///relative/path`` (relative to *base_dir*, default the current folder),
      ``sqlite:////absolute/path``, or ``sqlite:///:memory:`` (for tests).
    * ``postgresql://[user[:password]@][host][:port][/database][?param=value...]``
      (``postgres://`` too; any libpq parameter in the query): a `PostgresCatalog` with
      *pool_size* connections (default 4).
    """
    from store.sqlite import SQLiteCatalog

    url = (url or "").strip()
    if not url:
        return SQLiteCatalog(os.path.join(os.fspath(storage_root), DEFAULT_CATALOG_FILE), reactor)
    try:
        path = sqlite_path(url, base_dir or os.getcwd())
    except CatalogError as exc:
        raise CatalogError(f"catalog url {url!r}: {exc}") from None
    if path is not None:
        return SQLiteCatalog(path, reactor)
    scheme = catalog_scheme(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from store.postgres import DEFAULT_POOL_SIZE, PostgresCatalog
        except ImportError as exc:  # pragma: no cover - psycopg is a dependency
            raise CatalogError(
                f"catalog url uses PostgreSQL, but psycopg is not installed ({exc})"
            ) from None
        return PostgresCatalog(url, reactor, pool_size or DEFAULT_POOL_SIZE)
    raise CatalogError(
        f"unsupported catalog url scheme {scheme or '(none)'!r}; "
        "expected sqlite:///path, postgresql://... (or an empty url for the default)"
    )


@defer.inlineCallbacks
def open_for_storage(catalog: ICatalog, storage: IArtifactStorage) -> Any:
    """Open *catalog* (creating or upgrading its schema) and bind it to *storage*.

    The first process to open a catalog records the id of its storage folder in it; every
    later one must bring the same folder (shared storage), else CatalogRefused, one line,
    and the catalog is closed again. Fires with None.
    """
    yield catalog.open()
    try:
        ours = storage.identity()
        recorded = yield catalog.claim_storage(ours)
        check_storage_id(recorded, ours, storage.root, _location(catalog))
    except BaseException:
        yield catalog.close()
        raise


def _location(catalog: object) -> str:
    return str(getattr(catalog, "location", None) or getattr(catalog, "database", catalog))


def mark_all_stored(catalog: Any, sha256s: list[str]) -> defer.Deferred[Any]:
    """Mark *sha256s* stored in one call and one transaction (``mark_stored_many``), or, for
    an `ICatalog` without it, one ``mark_stored`` each (failing with the first error, as a
    ``FirstError``)."""
    many = getattr(catalog, "mark_stored_many", None)
    if many is not None:
        return defer.maybeDeferred(many, sha256s)
    return defer.gatherResults(
        [defer.maybeDeferred(catalog.mark_stored, sha256) for sha256 in sha256s],
        consumeErrors=True,
    )
