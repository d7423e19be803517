"""Importers: how a remote's listing becomes catalog entries and configured downloaders.

The sync and the streamer never look inside a remote's repository format: they ask the
remote's importer. The built-in `PulpManifestImporter` reads a ``PULP_MANIFEST``; a custom
one plugs in by naming ``module:Class`` in the remote's ``importer`` key. The class is
called with the `Remote` and must provide `IImporter`.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from downloaders.session import fetch_to_file
from downloaders.settings import SettingsError
from downloaders.urls import without_userinfo
from importer.manifest import MANIFEST_NAME, read_manifest, validate_manifest
from store.catalog import CatalogEntry

IsStored = Callable[[str], bool]


class IImporter(Interface):
    """Turns one remote's listing into catalog entries and hands out its downloaders."""

    remote = Attribute("The `Remote` this importer serves.")

    def fetch_listing(temp_dir):  # type: ignore[no-untyped-def]
        """Download the remote's listing (its manifest) into *temp_dir*.

        Deferred firing with the local path of the file; the caller removes it.
        """

    def validate_listing(path):  # type: ignore[no-untyped-def]
        """Check the whole listing at *path* (blocking; run it in a thread).

        Return the number of files; raise a ValueError naming the bad line otherwise.
        """

    def catalog_entries(path, is_stored):  # type: ignore[no-untyped-def]
        """Yield the CatalogEntry objects of the listing at *path*, lazily.

        All sources of one served path come one after another, in the order to try them
        (position 0, 1, ...). ``is_stored(sha256)`` says whether an artifact is stored.
        May run in a worker thread: it must not touch reactor state.
        """

    def get_downloader(url=None, entry=None, **kwargs):  # type: ignore[no-untyped-def]
        """A configured `IDownloader` for *url* or for a catalog *entry* (expecting its
        size and digests).

        The streamer calls ``get_downloader(entry=entry)`` and nothing more, and streams the
        downloader through the contract of `downloaders.interfaces` alone: ``run()``, every
        byte through ``handle_data()``, then ``finalize()``. A `BaseDownloader` subclass
        whose ``_run`` does that (with any client) streams to clients as it downloads; one
        that reports headers through ``headers_ready`` has them forwarded, otherwise clients
        get the catalog's size and a type by extension. A downloader that finishes without
        passing the artifact's bytes through ``handle_data`` is answered with 502 at once.
        """


@implementer(IImporter)
class PulpManifestImporter:
    """The default importer: a ``PULP_MANIFEST`` at the remote's url, files beside it.

    Each file gets one entry per source: position 0 is the manifest's own location, then
    one per mirror base url, in the configured order.
    """

    #: The largest manifest fetched (decoded bytes): about ten million files. A bigger one
    #: fails the sync before it fills the storage's disk (an upstream that never ends its
    #: body, or a gzip bomb).
    max_listing_size = 1 << 30

    def __init__(self, remote: Any) -> None:
        self.remote = remote
        #: The identity (`_file_identity`) of the listing `validate_listing` last accepted:
        #: its later passes skip the checks (a sync reads its listing three times).
        self._validated: tuple[int, ...] | None = None
        #: ``(base without userinfo, base)`` of each mirror whose url holds a login.
        self._mirror_logins: list[tuple[str, str]] | None = None

    def fetch_listing(self, temp_dir: str | None) -> defer.Deferred[str]:
        """The manifest, over http(s) through the remote's treq client (a manifest served with
        ``Content-Encoding: gzip`` is decoded), from a ``file://`` url by a downloader."""
        remote = self.remote
        if urlsplit(remote.url).scheme not in ("http", "https"):
            downloader = self.get_downloader(url=remote.url, temp_dir=temp_dir)
            return downloader.run().addCallback(lambda result: result.path)
        return fetch_to_file(
            remote.http_client(),
            remote.url,
            temp_dir or tempfile.gettempdir(),
            max_retries=remote.max_retries,
            read_timeout=remote.sock_read_timeout,
            connect_timeout=remote.connect_timeout,
            max_size=self.max_listing_size,
        )

    def validate_listing(self, path: str) -> int:
        self._validated = None
        # Lines are named in the listing's published name, not the temporary file's.
        name = unquote(urlsplit(self.remote.url).path.rpartition("/")[2])
        count = validate_manifest(path, source=name or MANIFEST_NAME)
        self._validated = _file_identity(path)
        return count

    def catalog_entries(self, path: str, is_stored: IsStored) -> Iterator[CatalogEntry]:
        remote = self.remote
        # The listing validate_listing accepted, unchanged since: its lines are not checked
        # again, nor the entries made of them.
        checked = self._validated is not None and self._validated == _file_identity(path)
        make = CatalogEntry.checked if checked else CatalogEntry
        # The manifest's folder, then the mirrors; a quoted relative path has no scheme, no
        # "//" and no "..", so appending it equals urljoin and costs far less.
        bases = [urljoin(remote.url, ".")]
        # A mirror's user:password@ stays in its settings (`get_downloader` puts it back):
        # the catalog, which other nodes and their backups read, never holds it.
        bases += [without_userinfo(base) for base in _mirror_bases(remote)]
        prefix = remote.base_path + "/"
        for item in read_manifest(path, check=not checked):
            relative = quote(item.relative_path)
            digests = {"sha256": item.sha256}
            stored = bool(is_stored(item.sha256))
            served = prefix + item.relative_path
            urls = [base + relative for base in bases]
            for position, url in enumerate(urls):
                yield make(
                    path=served,
                    remote=remote.name,
                    url=url,
                    size=item.size,
                    digests=digests,
                    stored=stored,
                    position=position,
                )

    def get_downloader(self, url: str | None = None, entry: Any = None, **kwargs: Any) -> Any:
        entry = kwargs.pop("remote_artifact", None) or entry
        if entry is not None:
            url = url or entry.url
            kwargs.setdefault("expected_size", entry.size)
            kwargs.setdefault("expected_digests", dict(entry.digests))
        if url is None:
            raise ValueError("get_downloader needs a url or a catalog entry (remote_artifact=)")
        if self._mirror_logins is None:
            self._mirror_logins = [
                (without_userinfo(base), base) for base in _mirror_bases(self.remote) if "@" in base
            ]
        for bare, base in self._mirror_logins:
            if url.startswith(bare):  # a mirror's url as the catalog has it: its login back
                url = base + url[len(bare) :]
                break
        return self.remote.downloader_factory().build(url, **kwargs)


def _mirror_bases(remote: Any) -> list[str]:
    """The remote's mirrors as the base urls files are appended to (each ending in ``/``)."""
    return [base if base.endswith("/") else base + "/" for base in remote.mirrors]


def _file_identity(path: str) -> tuple[int, ...]:
    """What tells one version of the file at *path* from another (device, inode, size,
    modification time in ns)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_importer_class(spec: str) -> type:
    """The class named by ``module:Class``; a `SettingsError` naming ``importer`` otherwise."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise SettingsError("importer", f"must look like 'module:Class', not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SettingsError("importer", f"cannot import {module_name!r}: {error}") from None
    obj: Any = module
    for part in class_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise SettingsError("importer", f"{module_name!r} has no {class_name!r}")
    if not isinstance(obj, type) or not IImporter.implementedBy(obj):
        raise SettingsError("importer", f"{spec!r} is not a class implementing IImporter")
    return obj


def make_importer(remote: Any) -> Any:
    """The importer the remote's configuration names (the PULP_MANIFEST one by default)."""
    spec = getattr(remote, "importer", "")
    cls = load_importer_class(spec) if spec else PulpManifestImporter
    return cls(remote)
