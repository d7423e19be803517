"""What every catalog implementation shares about its schema: versions and the storage binding.

A catalog records two facts in its ``catalog_meta`` table:

* ``schema_version``: the number of the last migration applied. Code supports versions up to
  its own ``SCHEMA_VERSION`` and upgrades older ones at start (or by ``streamer migrate``); a
  newer version (a newer streamer migrated the database) is refused, never written to.
* ``storage_id``: the identity of the artifact storage folder the catalog describes (the
  ``storage-id`` file in that folder). Its ``stored`` flags only mean something for that
  folder, so every process and node sharing a catalog must share that folder; one configured
  with another folder is refused at start.
"""

from __future__ import annotations

import attrs

from store.errors import CatalogError, CatalogRefused

__all__ = ["SchemaReport", "check_storage_id", "check_version", "parse_version"]


@attrs.frozen
class SchemaReport:
    """The outcome of a migration: the version found (0: no schema yet) and the one now."""

    location: str
    before: int
    after: int

    def describe(self) -> str:
        """One line for ``streamer migrate``."""
        if self.before == self.after:
            state = "up to date"
        elif self.before == 0:
            state = "created"
        else:
            state = f"upgraded from version {self.before}"
        return f"catalog {self.location}: schema version {self.after} ({state})"


def parse_version(value: object, location: str) -> int:
    """The stored ``schema_version`` as an int; CatalogError if it is not a number."""
    try:
        return int(str(value))
    except ValueError:
        raise CatalogError(
            f"catalog {location}: unreadable schema version {value!r} in catalog_meta"
        ) from None


def check_version(found: int, supported: int, location: str) -> None:
    """Refuse a schema newer than this code (CatalogRefused, one line)."""
    if found > supported:
        raise CatalogRefused(
            f"catalog {location} has schema version {found}, newer than this streamer "
            f"supports ({supported}): upgrade the streamer, or use another catalog"
        )


def check_storage_id(recorded: str, ours: str, storage_root: str, location: str) -> None:
    """Refuse a catalog that describes another storage folder (CatalogRefused, one line)."""
    if recorded != ours:
        raise CatalogRefused(
            f"catalog {location} belongs to the storage folder with id {recorded}, but "
            f"{storage_root} has id {ours}: every process and node sharing a catalog must "
            "use the same (shared) storage folder"
        )
