"""A remote repository as configured: where its manifest is, how to sync it, how to reach it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer

from downloaders.settings import RemoteSettings, SettingsError
from downloaders.urls import origin
from importer.manifest import unservable

POLICIES = ("immediate", "on_demand", "streamed")
RESERVED_BASE_PATHS = ("metrics", "healthz")


def _policy(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in POLICIES:
        raise SettingsError(attribute.name, f"must be one of {', '.join(POLICIES)}, not {value!r}")


def _name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value or "/" in value or value.strip() != value:
        raise SettingsError(attribute.name, f"must be a non-empty name without '/': {value!r}")
    _servable(attribute, value)


def _servable(attribute: attrs.Attribute, value: str) -> None:
    """A name or base path that is part of every served path of the remote (and of the
    command's lines): none the streamer would refuse to be asked for."""
    problem = unservable(value)
    if problem:
        raise SettingsError(attribute.name, f"{problem}: {value!r}")


def _importer(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value:
        from importer.importers import load_importer_class

        load_importer_class(value)


def _mirror_list(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value and urlsplit(value).scheme not in ("http", "https"):
        raise SettingsError(attribute.name, f"must be an http(s) url, not {value!r}")


def _processes(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise SettingsError(
            attribute.name, f"must be an integer from 0 (auto) to 64, not {value!r}"
        )


def _base_path(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    parts = value.split("/")
    if not value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SettingsError(attribute.name, f"must be a relative path like 'a/b': {value!r}")
    if parts[0] in RESERVED_BASE_PATHS:
        raise SettingsError(attribute.name, f"/{parts[0]} is reserved for the service itself")
    _servable(attribute, value)


@attrs.define(kw_only=True)
class Remote(RemoteSettings):
    """One ``[[remotes]]`` table of the configuration; its keys are these attribute names."""

    name: str = attrs.field(validator=_name)
    policy: str = attrs.field(default="on_demand", validator=_policy)
    base_path: str = attrs.field(
        default=attrs.Factory(lambda self: self.name, takes_self=True), validator=_base_path
    )
    #: Further base urls, tried in order after the manifest's own location.
    mirrors: list[str] = attrs.field(factory=list)
    #: The url of a mirror list (one base url a line), fetched once per remote; a download
    #: whose own url failed tries those mirrors in order.
    mirror_list: str = attrs.field(default="", validator=_mirror_list)
    #: ``module:Class`` of a custom importer; empty for the built-in PULP_MANIFEST importer.
    importer: str = attrs.field(default="", validator=_importer)

    #: Processes sharing an ``immediate`` sync's downloads, the syncing one included (each
    #: with a share of ``download_concurrency``): 1 for none besides it; 0 (auto) for one
    #: per CPU, at most 4, when the listing has 1000 files or more (`importer.helpers`).
    sync_processes: int = attrs.field(default=0, validator=_processes)

    _factory: Any = attrs.field(init=False, default=None, repr=False, eq=False)
    _importer: Any = attrs.field(init=False, default=None, repr=False, eq=False)

    def downloader_factory(self) -> Any:
        """The remote's `DownloaderFactory`, made on first use (one connection pool per remote)."""
        if self._factory is None:
            from downloaders.factory import DownloaderFactory

            self._factory = DownloaderFactory(self)
        return self._factory

    def http_client(self) -> Any:
        """A ``treq.HTTPClient`` over the remote's own agent stack (its pool, TLS, proxy,
        credentials and concurrency limit), for listings, metadata and API requests."""
        return self.downloader_factory().http_client()

    def get_importer(self) -> Any:
        """The remote's `IImporter` (``importer`` names a custom one), made on first use."""
        if self._importer is None:
            from importer.importers import make_importer

            self._importer = make_importer(self)
        return self._importer

    def get_downloader(
        self, url: str | None = None, remote_artifact: Any = None, **kwargs: Any
    ) -> Any:
        """The black-box factory: a configured `IDownloader` for a url or a catalog entry.

        ``remote_artifact`` is Pulp's name for what the catalog's entries are here (``entry=``
        is the same argument); its downloader expects the entry's size and digests. Further
        keywords go to the downloader. The remote's importer builds it (the built-in one asks
        the remote's `DownloaderFactory`).
        """
        entry = kwargs.pop("entry", None)
        if remote_artifact is not None and entry is not None and remote_artifact is not entry:
            raise TypeError("give remote_artifact= or entry=, not both")
        entry = remote_artifact if remote_artifact is not None else entry
        return self.get_importer().get_downloader(url=url, entry=entry, **kwargs)

    def close(self) -> Any:
        """Close the remote's connection pool; a Deferred."""
        if self._factory is None:
            return defer.succeed(None)
        factory, self._factory = self._factory, None
        return factory.close()


def remote_for_url(remotes: Iterable[Remote], url: str, allowed_import_paths: Any = ()) -> Remote:
    """Settings for a one-off download of *url*: those of the first of *remotes* whose
    manifest lives on the same origin (its TLS, auth, proxy), else plain defaults (``file://``
    urls limited to *allowed_import_paths*)."""
    for remote in remotes:
        if origin(remote.url) == origin(url):
            return remote
    return Remote(name="fetch", url=url, allowed_import_paths=tuple(allowed_import_paths))


@defer.inlineCallbacks
def download_url(
    remote: Remote,
    url: str,
    sha256: str | None = None,
    size: int | None = None,
    temp_dir: str | None = None,
) -> Any:
    """Download *url* once with *remote*'s settings into a temporary file (in *temp_dir*, else
    the system's), validating *sha256* and *size* when given; then close the remote's
    connections. Fires with the `DownloadResult` (the caller owns its file); a failed
    download leaves no file and its error propagates."""
    digests = {"sha256": sha256.lower()} if sha256 else None
    try:
        downloader = remote.get_downloader(
            url=url, expected_digests=digests, expected_size=size, temp_dir=temp_dir
        )
        result = yield downloader.run()
    finally:
        yield remote.close()
    return result
