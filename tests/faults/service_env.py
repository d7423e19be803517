"""Moved to tests.support.service (``make_service`` is now a fixture every test gets by
name); this re-export serves tests written against the old place until they are moved."""

from tests.support.service import ServiceEnv, open_fds

__all__ = ["ServiceEnv", "open_fds"]
