"""The service's configuration: one TOML file, validated up front into attrs values.

Every problem is a `ConfigError` whose message starts with the key at fault
(``remotes[0].policy: must be one of ...``), so the service and the console script can print
one clear line instead of a traceback. Relative paths in a file (including the key and
certificate files of an ``ssl:`` listen endpoint and the socket of a ``unix:`` one) are
relative to that file's folder; paths given as overrides (the command line) and the embedded
defaults used without any file are relative to the working directory.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from downloaders.settings import SettingsError
from downloaders.urls import redact_url
from downloaders.version import PROJECT
from importer.remote import Remote
from store.catalog import catalog_scheme, sqlite_path
from store.errors import CatalogError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_LISTEN",
    "CatalogConfig",
    "Config",
    "ConfigError",
    "SecurityConfig",
    "ServerConfig",
    "StorageConfig",
    "load_config",
    "resolve_endpoint_paths",
    "validate_endpoint",
]

#: The environment variable naming the configuration file when no ``--config`` is given.
CONFIG_ENV = "STREAMER_CONFIG"
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
MIN_SIGNING_KEY_BYTES = 16


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and never shows a secret."""


class _NoReactor:
    """Stands in for a reactor while parsing endpoint descriptions: nothing listens."""


def validate_endpoint(description: str) -> None:
    """Raise SettingsError unless *description* parses as a Twisted server endpoint."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_NoReactor(), description)
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise SettingsError("listen", f"invalid endpoint {description!r} ({detail})") from None


def _endpoint(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    validate_endpoint(value)


#: Endpoint arguments naming files: (endpoint type, keyword or position after the type).
_ENDPOINT_PATHS: dict[str, tuple[tuple[str, int | None], ...]] = {
    "ssl": (
        ("privateKey", None),
        ("certKey", None),
        ("extraCertChain", None),
        ("dhParameters", None),
    ),
    "unix": (("address", 0),),
}


def _endpoint_parts(description: str) -> list[tuple[str | None, str]]:
    """Split a description like Twisted does: ``(keyword or None, unescaped value)`` parts."""
    parts: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    chars = iter(description)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append((key, "".join(current)))
            key, current = None, []
        elif ch == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(ch)
    parts.append((key, "".join(current)))
    return parts


def _endpoint_escape(value: str, positional: bool) -> str:
    value = value.replace("\\", "\\\\").replace(":", "\\:")
    return value.replace("=", "\\=") if positional else value


def resolve_endpoint_paths(description: str, base_dir: str) -> str:
    """*description* with the relative file paths of ``ssl:`` (privateKey, certKey,
    extraCertChain, dhParameters) and ``unix:`` (the socket address) made absolute against
    *base_dir*; other endpoint types are returned unchanged."""
    parts = _endpoint_parts(description)
    wanted = _ENDPOINT_PATHS.get(parts[0][1]) if parts[0][0] is None else None
    if not wanted:
        return description
    keywords = {name for name, _ in wanted}
    positions = {index for _, index in wanted if index is not None}
    out = [parts[0][1]]
    position = 0
    for key, value in parts[1:]:
        if key is None:
            if position in positions:
                value = _resolve(base_dir, value)
            position += 1
            out.append(_endpoint_escape(value, positional=True))
        else:
            if key in keywords:
                value = _resolve(base_dir, value)
            out.append(f"{key}={_endpoint_escape(value, positional=False)}")
    return ":".join(out)


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:  # NaN too (it compares false with everything)
        raise SettingsError(attribute.name, f"must be >= 0, not {value!r}")


def _finite_non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise SettingsError(attribute.name, f"must be a finite number >= 0, not {value!r}")


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise SettingsError(attribute.name, f"must be >= 1, not {value!r}")


def _accel_prefix(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value and not value.startswith("/"):
        raise SettingsError(attribute.name, f"must be empty or a path starting with '/': {value!r}")


def _catalog_url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        return
    scheme = catalog_scheme(value)
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise SettingsError(
            attribute.name, "expected sqlite:///path, postgresql://..., or empty for the default"
        )
    try:
        if sqlite_path(value) is None:
            from store.postgres import connection_params

            connection_params(value)
    except CatalogError as exc:
        raise SettingsError(attribute.name, str(exc)) from None


@attrs.frozen(kw_only=True)
class ServerConfig:
    """``[server]``: where to listen and how to behave as an HTTP server."""

    #: Any Twisted server endpoint description (tcp:, ssl:, unix:).
    listen: str = attrs.field(default=DEFAULT_LISTEN, validator=_endpoint)
    #: Server processes sharing the listening socket (0: one per CPU; 1: only this one).
    processes: int = attrs.field(default=0, validator=_non_negative)
    #: Seconds in-flight responses may take to finish after SIGTERM before they are aborted.
    grace_period: float = attrs.field(default=30.0, validator=_non_negative)
    #: Seconds without progress after which a client or upstream transfer is aborted.
    stall_timeout: float = attrs.field(default=60.0, validator=_non_negative)
    #: When set (e.g. "/protected"), stored files are handed to a fronting nginx with
    #: ``X-Accel-Redirect: <prefix>/<artifact path under storage>`` instead of being sent, when
    #: the request carries ``X-Sendfile-Type: X-Accel-Redirect`` (set by the front).
    x_accel_redirect: str = attrs.field(default="", validator=_accel_prefix)
    #: Where access lines go: "" the service's log, "-" standard output, or a file path.
    access_log: str = ""
    #: Write the access log as one JSON object per line (needs access_log set).
    access_log_json: bool = False
    #: Seconds a client has to send a whole request head (from the connection's start, or
    #: the end of the previous response); then 408 and close. 0: no deadline.
    request_header_timeout: float = attrs.field(default=30.0, validator=_finite_non_negative)
    #: Open connections allowed per client address; 0: no cap (behind a load balancer every
    #: client has its address).
    max_connections_per_client: int = attrs.field(default=0, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.access_log_json and not self.access_log:
            raise SettingsError(
                "access_log_json", "needs server.access_log ('-' for standard output, or a file)"
            )


@attrs.frozen(kw_only=True)
class StorageConfig:
    """``[storage]``: the folder holding artifacts/, tmp/ and the default SQLite catalog."""

    path: str


@attrs.frozen(kw_only=True)
class CatalogConfig:
    """``[catalog]``: the catalog database; empty url means SQLite under the storage path."""

    url: str = attrs.field(default="", validator=_catalog_url, repr=False)
    #: PostgreSQL: connections (and threads) per process; SQLite has one of each.
    pool_size: int = attrs.field(default=4, validator=_positive)

    def describe(self, storage_path: str) -> str:
        """Where the catalog lives, for logs: the SQLite file, or the url redacted."""
        if not self.url:
            return os.path.join(storage_path, "catalog.sqlite3")
        return sqlite_path(self.url) or redact_url(self.url)


@attrs.frozen(kw_only=True)
class SecurityConfig:
    """``[security]``: signed URLs and the folders file:// remotes may read from."""

    #: A file holding the HMAC key; when set, every content request must be signed.
    signing_key_file: str = ""
    allowed_import_paths: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def signing_key(self) -> bytes | None:
        """Read the signing key (surrounding whitespace stripped); None when signing is off."""
        if not self.signing_key_file:
            return None
        try:
            with open(self.signing_key_file, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"security.signing_key_file: cannot read {self.signing_key_file!r}: "
                f"{exc.strerror or exc}"
            ) from None
        if len(key) < MIN_SIGNING_KEY_BYTES:
            raise ConfigError(
                f"security.signing_key_file: the key must be at least {MIN_SIGNING_KEY_BYTES} "
                "bytes long"
            )
        return key


def _remote_names(remotes: list[Remote]) -> str:
    return repr([r.name for r in remotes])


@attrs.frozen(kw_only=True)
class Config:
    """The whole validated configuration. Its repr names remotes only (no secrets)."""

    server: ServerConfig
    storage: StorageConfig
    catalog: CatalogConfig
    security: SecurityConfig
    remotes: list[Remote] = attrs.field(factory=list, repr=_remote_names)
    #: The file this came from, or None for the embedded defaults.
    source: str | None = None

    def remote(self, name: str) -> Remote:
        """The remote called *name*; ConfigError when there is none."""
        for remote in self.remotes:
            if remote.name == name:
                return remote
        known = ", ".join(r.name for r in self.remotes) or "none configured"
        raise ConfigError(f"remotes: no remote named {name!r} (known: {known})")

    def remotes_by_name(self) -> dict[str, Remote]:
        return {r.name: r for r in self.remotes}

    def catalog_location(self) -> str:
        """Where the catalog lives, for logs (never with a password)."""
        return self.catalog.describe(self.storage.path)


# -- loading ------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "catalog": CatalogConfig,
    "security": SecurityConfig,
}
#: Keys holding filesystem paths, resolved against the config file's folder.
_PATH_KEYS = {
    "storage": ("path",),
    "security": ("signing_key_file", "allowed_import_paths"),
    "server": ("access_log",),
    "remotes": ("ca_cert", "client_cert", "client_key"),
}
#: Remote attributes set from other sections, not from a ``[[remotes]]`` table.
_REMOTE_DERIVED = {
    "allowed_import_paths": "set it in [security] allowed_import_paths",
    "via": "the Via pseudonym is derived from the host name and [storage] path",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list of strings"
    if origin is dict:
        return "a table of strings"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(
        tp, str(tp)
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check a TOML value against an attribute's type; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    ok: bool
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    elif origin in (typing.Union, types.UnionType):
        ok = any(_matches(value, a) for a in typing.get_args(tp))
    else:
        ok = True
    if not ok:
        shown = "a table" if isinstance(value, dict) else repr(value)
        raise ConfigError(f"{key}: must be {_type_name(tp)}, not {shown}")
    return value


def _matches(value: Any, tp: Any) -> bool:
    try:
        _coerce("", value, tp)
    except ConfigError:
        return False
    return True


def _resolve(base_dir: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_resolve(base_dir, v) for v in value]
    if not value or value == "-" or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _resolve_key(section: str, key: str, value: Any, base_dir: str) -> Any:
    """*value* with relative paths made absolute against *base_dir* when *key* holds paths."""
    if section == "server" and key == "listen" and isinstance(value, str):
        return resolve_endpoint_paths(value, base_dir)
    if key in _PATH_KEYS.get(section, ()):
        return _resolve(base_dir, value)
    return value


def _build(cls: type, table: Mapping[str, Any], prefix: str, base_dir: str, **extra: Any) -> Any:
    """Construct attrs class *cls* from a TOML table, naming *prefix*.key in every error."""
    # Only what ``__init__`` takes: a remote's private state (``init=False``) is no key.
    fields = {f.name: f for f in attrs.fields(attrs.resolve_types(cls)) if f.init}
    section = prefix.split("[")[0]
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _REMOTE_DERIVED and cls is Remote:
            raise ConfigError(f"{prefix}.{key}: not a per-remote key; {_REMOTE_DERIVED[key]}")
        if key not in fields or key in extra:
            known = ", ".join(sorted(k for k in fields if k not in extra))
            raise ConfigError(f"{prefix}.{key}: unknown key (known keys: {known})")
        value = _coerce(f"{prefix}.{key}", value, fields[key].type)
        values[key] = _resolve_key(section, key, value, base_dir)
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in values and name not in extra:
            raise ConfigError(f"{prefix}.{name}: required")
    try:
        return cls(**values, **extra)
    except SettingsError as exc:
        problem = str(exc)[len(exc.setting) + 2 :]
        raise ConfigError(f"{prefix}.{exc.setting}: {problem}") from None


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r}: invalid TOML: {exc}") from None


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: must be a table")
        # Command-line values are relative to the working directory, not the file.
        table[key] = _resolve_key(section, key, value, os.getcwd())


def _catalog_with_base(catalog: CatalogConfig, base_dir: str) -> CatalogConfig:
    """Make a relative ``sqlite:///relative/path`` absolute against *base_dir*."""
    path = sqlite_path(catalog.url, base_dir)
    return catalog if path is None else attrs.evolve(catalog, url="sqlite:///" + path)


def parse_config(data: Mapping[str, Any], base_dir: str, source: str | None = None) -> Config:
    """Validate a parsed TOML document (relative paths against *base_dir*) into a Config."""
    data = dict(data)
    for name in data:
        if name not in _SECTIONS and name != "remotes":
            known = ", ".join([*_SECTIONS, "remotes"])
            raise ConfigError(f"{name}: unknown section (known sections: {known})")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table ([{name}])")
        if name == "storage":
            table = {"path": "var", **table}
        sections[name] = _build(cls, table, name, base_dir)
    sections["catalog"] = _catalog_with_base(sections["catalog"], base_dir)

    tables = data.get("remotes", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("remotes: must be an array of tables ([[remotes]])")
    allowed = sections["security"].allowed_import_paths
    via = instance_name(sections["storage"].path)
    remotes: list[Remote] = []
    seen_names: dict[str, int] = {}
    seen_paths: dict[str, int] = {}
    for index, table in enumerate(tables):
        prefix = f"remotes[{index}]"
        remote = _build(Remote, table, prefix, base_dir, allowed_import_paths=allowed, via=via)
        if remote.name in seen_names:
            first = seen_names[remote.name]
            raise ConfigError(f"{prefix}.name: {remote.name!r} is already used by remotes[{first}]")
        for other, other_index in seen_paths.items():
            if _overlaps(remote.base_path, other):
                raise ConfigError(
                    f"{prefix}.base_path: {remote.base_path!r} overlaps {other!r} of "
                    f"remotes[{other_index}]"
                )
        seen_names[remote.name] = index
        seen_paths[remote.base_path] = index
        remotes.append(remote)
    return Config(remotes=remotes, source=source, **sections)


def instance_name(storage_path: str) -> str:
    """The pseudonym naming this installation in the ``Via`` of its upstream requests
    (`downloaders.via`): the same in every process of a service and in the commands run with
    its configuration, another for another host or storage folder. A hash: it tells no path."""
    seed = f"{socket.gethostname()}\0{os.path.abspath(storage_path)}".encode()
    return f"{PROJECT}-{hashlib.sha256(seed).hexdigest()[:12]}"


def _overlaps(a: str, b: str) -> bool:
    """True when one base path equals or contains the other (``a`` and ``a/b``)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load and validate the configuration.

    *path* is the file; when None, the file named by ``$STREAMER_CONFIG``; when neither, the
    embedded defaults (storage in ``./var``, SQLite under it, listening on 127.0.0.1:8080).
    *overrides* maps dotted keys (``{"server.listen": "tcp:0"}``) to values that replace the
    file's (None values are ignored). Raises ConfigError naming the key at fault.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(CONFIG_ENV) or None
    if path is not None:
        source = os.path.abspath(os.fspath(path))
        data = _read_file(source)
        base_dir = os.path.dirname(source)
    else:
        source, data, base_dir = None, {}, os.getcwd()
    _apply_overrides(data, overrides or {})
    return parse_config(data, base_dir, source)
