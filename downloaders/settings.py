"""Connection settings of a remote, as one validated value: TLS, auth, proxy, limits, timeouts.

`DownloaderFactory(remote)` accepts any object with these attribute names; `importer.Remote`
extends this class with what a sync needs (name, policy, base path, mirrors).

Everything is checked when the value is built, so a bad remote fails at configuration time with
a `SettingsError` naming the setting, never later in the middle of a sync. Secrets (passwords,
credentials inside ``proxy_url``, Authorization-like header values) never appear in ``repr``
or in error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import SplitResult, urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from downloaders.digests import DEFAULT_ALLOWED_DIGESTS, check_allowed
from downloaders.urls import MASK, redact_url, url_credentials, without_userinfo
from downloaders.via import check_pseudonym

#: Header names whose values are secrets: masked in ``repr`` and dropped on cross-host redirects.
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "x-auth-token"}
)


class SettingsError(ValueError):
    """An invalid setting; the message names the setting and never shows a secret."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {problem}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    # NaN compares false with everything, so ``value < 0`` alone let it through.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise SettingsError(attribute.name, f"must be a number >= 0, not {value!r}")


def _positive_int(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SettingsError(attribute.name, f"must be an integer > 0, not {value!r}")


def _non_negative_int(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingsError(attribute.name, f"must be an integer >= 0, not {value!r}")


def _http_url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "file") or (
        parts.scheme != "file" and not parts.hostname
    ):
        raise SettingsError(attribute.name, "must be an http(s):// or file:// url with a host")


def _safe_split(setting: str, value: str) -> SplitResult:
    """``urlsplit`` whose errors never quote the url (it may hold credentials)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingsError(setting, "is not a valid url") from None
    return parts


def _proxy_url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    parts = _safe_split(attribute.name, value)
    if parts.scheme != "http":
        raise SettingsError(attribute.name, "must be an http:// proxy url")
    if not parts.hostname:
        raise SettingsError(attribute.name, "must name the proxy's host")


def _headers(instance: Any, attribute: attrs.Attribute, value: Mapping[str, str]) -> None:
    for name, item in value.items():
        if not isinstance(name, str) or not isinstance(item, str):
            raise SettingsError(attribute.name, "names and values must be strings")
        if any(c in name + item for c in "\r\n\0"):
            raise SettingsError(attribute.name, f"{name!r} contains a line break or NUL")


def _allowed_digests(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise SettingsError("allowed_digests", f"must be a list of algorithm names, not {value!r}")
    try:
        return check_allowed(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError("allowed_digests", str(exc).removeprefix("allowed_digests: ")) from None


def _pseudonym(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    problem = check_pseudonym(value)
    if problem is not None:
        raise SettingsError(attribute.name, problem)


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with the values of secret-bearing headers masked."""
    return {k: (MASK if k.lower() in SENSITIVE_HEADERS else v) for k, v in headers.items()}


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise SettingsError(setting, f"cannot read {path}: {error.strerror}") from None


def load_certificates(setting: str, path: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (not only the first); a `SettingsError` if none."""
    data = _read(setting, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SettingsError(setting, f"{path} is not a valid PEM certificate bundle") from None
    return certificates


def load_private_key(setting: str, path: str) -> Any:
    """The (unencrypted) private key in a PEM file."""
    data = _read(setting, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SettingsError(setting, f"{path} holds an encrypted key (not supported)") from None
    except ValueError:
        raise SettingsError(setting, f"{path} holds no valid PEM private key") from None


def _public_bytes(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _has_private_key(path: str) -> bool:
    return b"PRIVATE KEY-----" in _read("client_cert", path)


@attrs.define(kw_only=True)
class RemoteSettings:
    """How to reach one remote; validated at construction (see `SettingsError`).

    ``ca_cert``: a PEM bundle; every certificate in it is trusted (instead of the system's).
    ``client_cert``/``client_key``: PEM files; the key may instead be inside ``client_cert``.
    ``proxy_url``: ``http://[user:password@]host:port``; credentials there or in
    ``proxy_username``/``proxy_password``.
    """

    url: str = attrs.field(validator=_http_url)
    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_validation: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    proxy_url: str = attrs.field(
        default="", validator=_proxy_url, repr=lambda u: repr(redact_url(u))
    )
    proxy_username: str = ""
    proxy_password: str = attrs.field(default="", repr=False)
    headers: dict[str, str] = attrs.field(
        factory=dict, converter=dict, validator=_headers, repr=lambda h: repr(mask_headers(h))
    )
    user_agent: str = ""
    download_concurrency: int = attrs.field(default=10, validator=_positive_int)
    max_retries: int = attrs.field(default=3, validator=_non_negative_int)
    connect_timeout: float = attrs.field(default=60.0, validator=_non_negative)
    sock_read_timeout: float = attrs.field(default=60.0, validator=_non_negative)
    #: 0 means no total limit.
    total_timeout: float = attrs.field(default=0.0, validator=_non_negative)
    #: Requests per second; 0 means unlimited.
    rate_limit: float = attrs.field(default=0.0, validator=_non_negative)
    max_redirects: int = attrs.field(default=10, validator=_non_negative_int)
    #: Digest algorithms downloads may check (``expected_digests``); md5 and sha1 only when
    #: listed here.
    allowed_digests: tuple[str, ...] = attrs.field(
        default=DEFAULT_ALLOWED_DIGESTS, converter=_allowed_digests
    )
    #: Follow redirects to loopback, link-local and private addresses even though the url
    #: names a public host (`downloaders.addresses`); a url naming such a host may anyway.
    allow_private_redirects: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )
    #: Folders file:// urls may read from (set from the [security] section).
    allowed_import_paths: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: The pseudonym naming this installation in the ``Via`` entry every request carries
    #: (`downloaders.via`; the service sets it from its host and storage folder); "": none.
    via: str = attrs.field(default="", validator=_pseudonym)

    def __attrs_post_init__(self) -> None:
        self._check_tls_files()
        if "@" in self.url:
            self._take_url_credentials()
        if self.password and not self.username:
            raise SettingsError("password", "is set but username is empty")
        if self.proxy_password and not self.proxy_username:
            raise SettingsError("proxy_password", "is set but proxy_username is empty")

    def _take_url_credentials(self) -> None:
        """``https://user:password@host/...``: the credentials become ``username`` and
        ``password`` (sent as Basic auth to the url's origin only, like those settings) and
        leave the url, so the catalog's urls, logs and ``repr`` never hold them."""
        found = url_credentials(self.url)
        if found is None:
            return
        if self.username:
            raise SettingsError(
                "url", "holds a user:password@ and username is set too: give the credentials once"
            )
        if not found[0]:
            raise SettingsError("url", "holds a password without a user name before its '@'")
        self.username, self.password = found
        self.url = without_userinfo(self.url)

    def _check_tls_files(self) -> None:
        if self.ca_cert:
            load_certificates("ca_cert", self.ca_cert)
        if self.client_key and not self.client_cert:
            raise SettingsError("client_key", "is set but client_cert is empty")
        if not self.client_cert:
            return
        certificate = load_certificates("client_cert", self.client_cert)[0]
        if self.client_key:
            key = load_private_key("client_key", self.client_key)
        elif _has_private_key(self.client_cert):
            key = load_private_key("client_cert", self.client_cert)
        else:
            raise SettingsError("client_cert", "is set but client_key is empty")
        if _public_bytes(key.public_key()) != _public_bytes(certificate.public_key()):
            raise SettingsError("client_key", "does not match the client_cert certificate")

    def proxy_credentials(self) -> tuple[str, str] | None:
        """``(username, password)`` for the proxy, from the settings or the proxy url."""
        if self.proxy_username:
            return self.proxy_username, self.proxy_password
        found = url_credentials(self.proxy_url) if self.proxy_url else None
        return found if found is not None and found[0] else None
