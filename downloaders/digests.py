"""Digest algorithms we compute while downloading, and the running state for one download."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

#: Algorithms a caller may name in ``expected_digests``; md5 and sha1 are refused (untrusted).
SUPPORTED_DIGESTS: tuple[str, ...] = ("sha224", "sha256", "sha384", "sha512")

#: Digests computed on every download unless configured otherwise.
DEFAULT_DIGESTS: tuple[str, ...] = ("sha256",)


def unsupported_digest(names: Iterable[str]) -> str | None:
    """Return the first name that is not a supported algorithm, or None."""
    for name in names:
        if name not in SUPPORTED_DIGESTS:
            return name
    return None


class DigestCalculator:
    """Size and digests of a byte stream, updated chunk by chunk."""

    def __init__(self, algorithms: Iterable[str]) -> None:
        self._hashers = {name: hashlib.new(name) for name in dict.fromkeys(algorithms)}
        self.size = 0

    def update(self, data: bytes) -> None:
        self.size += len(data)
        for hasher in self._hashers.values():
            hasher.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {name: hasher.hexdigest() for name, hasher in self._hashers.items()}

    def artifact_attributes(self) -> dict[str, int | str]:
        """``size`` plus one key per computed digest, as in `DownloadResult`."""
        attributes: dict[str, int | str] = {"size": self.size}
        attributes.update(self.hexdigests())
        return attributes


def normalise_digests(digests: Mapping[str, str] | None) -> dict[str, str]:
    """Lower-case algorithm names and hex values; drop empty values."""
    return {k.lower(): v.lower() for k, v in (digests or {}).items() if v}
