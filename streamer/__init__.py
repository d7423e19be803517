"""Serve bytes: the content service, its configuration, signed URLs, metrics and logs."""

from streamer.config import Config, ConfigError, load_config
from streamer.logs import RequestLog
from streamer.metrics import Metrics
from streamer.service import StreamerService
from streamer.signing import SignedResource, sign_path, verify

__all__ = [
    "Config",
    "ConfigError",
    "Metrics",
    "RequestLog",
    "SignedResource",
    "StreamerService",
    "load_config",
    "sign_path",
    "verify",
]
