"""Moved to tests.support.lazy (``lazy_env`` is now a fixture every test gets by name); this
re-export serves tests written against the old place until they are moved, then goes."""

from tests.support.lazy import LazyEnv, parse_response, sha256, traced_peak
from tests.support.polling import holds_within as wait_until

__all__ = ["LazyEnv", "parse_response", "sha256", "traced_peak", "wait_until"]
