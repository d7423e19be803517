"""Fetch bytes: Deferred-based downloaders that validate size and digests while they download."""

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
from downloaders.group import Group, GroupDownloader, GroupResult, GroupSummary
from downloaders.headers import ResponseHeaders
from downloaders.http import HttpDownloader
from downloaders.interfaces import IDownloader, ITap, IWriter
from downloaders.result import DownloadResult
from downloaders.retry import Backoff
from downloaders.settings import RemoteSettings, SettingsError
from downloaders.tap import tap

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
