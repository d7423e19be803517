"""Fetch bytes: Deferred-based downloaders that validate size and digests while they download.

`Group`, `GroupDownloader`, `GroupResult` and `GroupSummary` are imported on first use (PEP
562): a sync never groups downloads, and ``streamer sync`` starts without their module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from downloaders.base import BaseDownloader, fetch_all
from downloaders.digests import (
    DEFAULT_ALLOWED_DIGESTS,
    DEFAULT_DIGESTS,
    KNOWN_DIGESTS,
    SUPPORTED_DIGESTS,
)
from downloaders.errors import (
    ConnectionFailed,
    DigestValidationError,
    DownloadError,
    DownloadTimeout,
    FileNotFound,
    ForbiddenPath,
    HttpError,
    NotAuthorized,
    NotFound,
    NotModified,
    ProxyError,
    SizeValidationError,
    TooManyRedirects,
    TruncatedBody,
    UnsupportedDigestValidationError,
    ValidationError,
)
from downloaders.factory import DownloaderFactory
from downloaders.file import FileDownloader
from downloaders.headers import ResponseHeaders
from downloaders.http import HttpDownloader
from downloaders.interfaces import IDownloader, ITap, IWriter
from downloaders.result import DownloadResult
from downloaders.retry import Backoff
from downloaders.settings import RemoteSettings, SettingsError
from downloaders.tap import tap

if TYPE_CHECKING:
    from downloaders.group import Group, GroupDownloader, GroupResult, GroupSummary

#: Imported from `downloaders.group` on first use.
_GROUP_NAMES = frozenset({"Group", "GroupDownloader", "GroupResult", "GroupSummary"})

__all__ = [
    "DEFAULT_ALLOWED_DIGESTS",
    "DEFAULT_DIGESTS",
    "KNOWN_DIGESTS",
    "SUPPORTED_DIGESTS",
    "Backoff",
    "BaseDownloader",
    "ConnectionFailed",
    "DigestValidationError",
    "DownloadError",
    "DownloadResult",
    "DownloadTimeout",
    "DownloaderFactory",
    "Group",
    "GroupDownloader",
    "GroupResult",
    "GroupSummary",
    "FileDownloader",
    "FileNotFound",
    "ForbiddenPath",
    "HttpDownloader",
    "HttpError",
    "IDownloader",
    "ITap",
    "IWriter",
    "NotAuthorized",
    "NotFound",
    "NotModified",
    "ProxyError",
    "RemoteSettings",
    "ResponseHeaders",
    "SettingsError",
    "SizeValidationError",
    "TooManyRedirects",
    "TruncatedBody",
    "UnsupportedDigestValidationError",
    "ValidationError",
    "fetch_all",
    "tap",
]


def __getattr__(name: str) -> Any:
    if name not in _GROUP_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("downloaders.group"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_GROUP_NAMES})
