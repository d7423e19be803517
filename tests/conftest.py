"""Shared pytest configuration: tests run on the real default reactor via pytest-twisted;
the loopback upstream and certificate fixtures come from tests.support.fixtures, the
private PostgreSQL cluster and catalog urls from tests.support.postgres, the lazy-streaming
harness (``lazy_env``) from tests.support.lazy, the in-process service (``make_service``)
from tests.support.service."""

pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.postgres",
    "tests.support.lazy",
    "tests.support.service",
]
