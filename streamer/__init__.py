"""Serve bytes: the content service, its configuration, signed URLs, metrics and logs.

The names below are imported on first use (PEP 562): ``streamer sync`` and the other console
commands import ``streamer.cli`` and its configuration only, not the whole web service.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamer.config import Config, ConfigError, load_config
    from streamer.content import ContentResource
    from streamer.lazy import LazyOptions, LazyStreamer
    from streamer.logs import RequestLog
    from streamer.metrics import Metrics
    from streamer.service import StreamerService
    from streamer.signing import SignedResource, sign_path, verify

_EXPORTS = {
    "Config": "streamer.config",
    "ConfigError": "streamer.config",
    "ContentResource": "streamer.content",
    "LazyOptions": "streamer.lazy",
    "LazyStreamer": "streamer.lazy",
    "Metrics": "streamer.metrics",
    "RequestLog": "streamer.logs",
    "SignedResource": "streamer.signing",
    "StreamerService": "streamer.service",
    "load_config": "streamer.config",
    "sign_path": "streamer.signing",
    "verify": "streamer.signing",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
