"""Helpers for sha256 hex digests shared by storage and catalog."""

import re

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(value: object) -> bool:
    """True when *value* is a sha256 digest written as 64 lowercase hex characters."""
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None
