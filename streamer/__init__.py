"""Serve bytes: the content service, its configuration, signed URLs, metrics and logs."""

from streamer.config import Config, ConfigError, load_config
from streamer.content import ContentResource
from streamer.lazy import LazyOptions, LazyStreamer
from streamer.logs import RequestLog
from streamer.metrics import Metrics
from streamer.service import StreamerService
from streamer.signing import SignedResource, sign_path, verify

__all__ = [
    "Config",
    "ConfigError",
    "ContentResource",
    "LazyOptions",
    "LazyStreamer",
    "Metrics",
    "RequestLog",
    "SignedResource",
    "StreamerService",
    "load_config",
    "sign_path",
    "verify",
]
