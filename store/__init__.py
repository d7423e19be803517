"""store: keep bytes. Content-addressed artifact storage and the catalog of known content.

``store`` knows nothing of HTTP; the importer fills it and the streamer reads it.
"""

from store.catalog import CatalogEntry, ListingItem, ReplaceReport, open_catalog
from store.digests import is_sha256_hex
from store.errors import ArtifactNotFound, CatalogError, StorageError
from store.interfaces import IArtifactStorage, ICatalog
from store.sqlite import SQLiteCatalog
from store.storage import ArtifactStorage, BadArtifact, VerifyReport, hash_file

__all__ = [
    "ArtifactNotFound",
    "ArtifactStorage",
    "BadArtifact",
    "CatalogEntry",
    "CatalogError",
    "IArtifactStorage",
    "ICatalog",
    "ListingItem",
    "ReplaceReport",
    "SQLiteCatalog",
    "StorageError",
    "VerifyReport",
    "hash_file",
    "is_sha256_hex",
    "open_catalog",
]
