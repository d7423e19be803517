"""When to try again: exponential backoff with jitter, honouring Retry-After with a cap."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from typing import Protocol

import attrs


class RetryDelays(Protocol):
    """What a downloader's ``backoff`` is: seconds to wait before retry number *attempt*
    (0-based), or None for no retry at all (the download ends with its error)."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None: ...


@attrs.frozen
class Backoff:
    """Delay before retry number ``attempt`` (0-based): ``base * factor**attempt``, jittered.

    A server's ``Retry-After`` wins over the computed delay, but never beyond ``retry_after_cap``.
    Any backoff's ``delay`` may answer None instead of seconds: no retry, the download ends
    with its error (the streamer's live downloads do so rather than retry before a
    ``Retry-After``).
    """

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.5
    retry_after_cap: float = 120.0
    random: Callable[[], float] = attrs.field(default=random.random, eq=False, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_cap))
        raw = min(self.max_delay, self.base * self.factor**attempt)
        # Full delay minus up to `jitter` of it, so a crowd of clients spreads out.
        return raw * (1.0 - self.jitter * self.random())


def parse_retry_after(value: str | bytes | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)
