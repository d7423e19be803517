"""Errors raised by the store package."""


class StorageError(Exception):
    """An artifact could not be stored, found or read; nothing partial was left behind."""


class ArtifactNotFound(StorageError):
    """No artifact with the requested sha256 is in storage."""


class CatalogError(Exception):
    """The catalog could not be opened, read or updated (bad URL, bad entry, database error)."""
