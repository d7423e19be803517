"""Shared pytest configuration: tests run on the real default reactor via pytest-twisted;
the loopback upstream and certificate fixtures come from tests.support.fixtures."""

pytest_plugins = ["tests.support.fixtures"]
