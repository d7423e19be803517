"""store: keep bytes. Content-addressed artifact storage and the catalog of known content.

``store`` knows nothing of HTTP; the importer fills it and the streamer reads it.
"""

from store.catalog import CatalogEntry, ListingItem, ReplaceReport, open_catalog, open_for_storage
from store.digests import is_sha256_hex
from store.errors import (
    ArtifactNotFound,
    CatalogError,
    CatalogRefused,
    CatalogUnavailable,
    StorageError,
)
from store.interfaces import IArtifactStorage, ICatalog
from store.schema import SchemaReport
from store.sqlite import SQLiteCatalog
from store.storage import ArtifactStorage, BadArtifact, VerifyReport, hash_file

__all__ = [
    "ArtifactNotFound",
    "ArtifactStorage",
    "BadArtifact",
    "CatalogEntry",
    "CatalogError",
    "CatalogRefused",
    "CatalogUnavailable",
    "IArtifactStorage",
    "ICatalog",
    "ListingItem",
    "ReplaceReport",
    "SchemaReport",
    "SQLiteCatalog",
    "StorageError",
    "VerifyReport",
    "hash_file",
    "is_sha256_hex",
    "open_catalog",
    "open_for_storage",
]
