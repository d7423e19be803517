"""Connection settings of a remote, as one validated value: TLS, auth, proxy, limits, timeouts.

`DownloaderFactory(remote)` accepts any object with these attribute names; `importer.Remote`
extends this class with what a sync needs (name, policy, base path, mirrors).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs


class SettingsError(ValueError):
    """An invalid setting; the message names the setting and never shows a secret."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {problem}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value is None or value < 0:
        raise SettingsError(attribute.name, f"must be >= 0, not {value!r}")


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value is None or value <= 0:
        raise SettingsError(attribute.name, f"must be > 0, not {value!r}")


def _http_url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "file") or (
        parts.scheme != "file" and not parts.hostname
    ):
        raise SettingsError(attribute.name, "must be an http(s):// or file:// url with a host")


def _proxy_url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(attribute.name, "must be an http:// proxy url with a host")


@attrs.define(kw_only=True)
class RemoteSettings:
    """How to reach one remote. Secrets (passwords, key paths' contents) are never in repr."""

    url: str = attrs.field(validator=_http_url)
    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_validation: bool = True
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    proxy_url: str = attrs.field(default="", validator=_proxy_url, repr=False)
    proxy_username: str = ""
    proxy_password: str = attrs.field(default="", repr=False)
    headers: dict[str, str] = attrs.field(factory=dict)
    user_agent: str = ""
    download_concurrency: int = attrs.field(default=10, validator=_positive)
    max_retries: int = attrs.field(default=3, validator=_non_negative)
    connect_timeout: float = attrs.field(default=60.0, validator=_non_negative)
    sock_read_timeout: float = attrs.field(default=60.0, validator=_non_negative)
    #: 0 means no total limit.
    total_timeout: float = attrs.field(default=0.0, validator=_non_negative)
    #: Requests per second; 0 means unlimited.
    rate_limit: float = attrs.field(default=0.0, validator=_non_negative)
    max_redirects: int = attrs.field(default=10, validator=_non_negative)
    #: Folders file:// urls may read from (set from the [security] section).
    allowed_import_paths: tuple[str, ...] = attrs.field(default=(), converter=tuple)
