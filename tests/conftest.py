"""Shared pytest configuration: tests run on the real default reactor via pytest-twisted;
the loopback upstream and certificate fixtures come from tests.support.fixtures, the
private PostgreSQL cluster and catalog urls from tests.support.postgres."""

pytest_plugins = ["tests.support.fixtures", "tests.support.postgres"]
