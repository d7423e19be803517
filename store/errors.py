"""Errors raised by the store package."""


class StorageError(Exception):
    """An artifact could not be stored, found or read; nothing partial was left behind."""


class ArtifactNotFound(StorageError):
    """No artifact with the requested sha256 is in storage."""


class CatalogError(Exception):
    """The catalog could not be opened, read or updated (bad URL, bad entry, database error)."""


class CatalogUnavailable(CatalogError):
    """The catalog's database cannot be reached right now (down, restarting, unreachable).

    Worth retrying later: the streamer answers 503 while it lasts and recovers by itself.
    """


class CatalogRefused(CatalogError):
    """The catalog cannot be used by this code or this node: its schema is newer than this
    code knows, or it belongs to another storage folder. Retrying does not help."""
