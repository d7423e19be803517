"""The old names of `downloaders.direct_get`: ``Http11Agent`` is `DirectGetAgent`."""

from downloaders.direct_get import DirectGetAgent, ResponseParseError

Http11Agent = DirectGetAgent

__all__ = ["Http11Agent", "ResponseParseError"]
