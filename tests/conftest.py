"""Shared pytest configuration: tests run on the real default reactor via pytest-twisted."""
