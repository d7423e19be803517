"""Digest algorithms we compute while downloading, which ones are trusted, and the running
state for one download."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from downloaders.inorder import INLINE_BYTES, InOrder

#: Every algorithm a download can compute (the names of ``hashlib``, as Pulp's artifacts).
KNOWN_DIGESTS: tuple[str, ...] = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")

#: Algorithms accepted unless ``allowed_digests`` says otherwise; md5 and sha1 are broken
#: (collisions can be made), so a digest of theirs proves nothing unless a remote allows it.
SUPPORTED_DIGESTS: tuple[str, ...] = ("sha224", "sha256", "sha384", "sha512")

#: The default of ``allowed_digests`` (downloader, factory and remote).
DEFAULT_ALLOWED_DIGESTS: tuple[str, ...] = SUPPORTED_DIGESTS

#: Digests computed on every download unless configured otherwise.
DEFAULT_DIGESTS: tuple[str, ...] = ("sha256",)


def unsupported_digest(
    names: Iterable[str], allowed: Iterable[str] = DEFAULT_ALLOWED_DIGESTS
) -> str | None:
    """Return the first name that is not an allowed algorithm, or None."""
    if not isinstance(allowed, tuple):
        allowed = tuple(allowed)
    for name in names:
        if name not in allowed:
            return name
    return None


def refusal(name: str, allowed: Iterable[str]) -> str:
    """Why *name* is refused, naming the switch that would accept it."""
    if name not in KNOWN_DIGESTS:
        return (
            f"unsupported or untrusted digest algorithm {name!r}: unknown "
            f"(known: {', '.join(KNOWN_DIGESTS)})"
        )
    return (
        f"unsupported or untrusted digest algorithm {name!r}: not in allowed_digests "
        f"({', '.join(allowed) or 'none'}); to accept it, add it to the remote's "
        "allowed_digests setting, or pass allowed_digests=[...] to the downloader or the "
        "DownloaderFactory"
    )


def check_allowed(allowed: Iterable[str]) -> tuple[str, ...]:
    """*allowed* as a tuple of lower-case names; a ValueError for an unknown one."""
    return _check_allowed(allowed if isinstance(allowed, tuple) else tuple(allowed))


@functools.lru_cache(maxsize=64)
def _check_allowed(allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(str(name).lower() for name in allowed))
    for name in names:
        if name not in KNOWN_DIGESTS:
            raise ValueError(
                f"allowed_digests: unknown algorithm {name!r} (known: {', '.join(KNOWN_DIGESTS)})"
            )
    return names


def _new_hash(name: str) -> Any:
    """``hashlib.new(name)``, through the algorithm's own constructor where hashlib has one
    (half the cost: no lookup by name in OpenSSL per download)."""
    constructor = _CONSTRUCTORS.get(name)
    return constructor() if constructor is not None else hashlib.new(name)


_CONSTRUCTORS: dict[str, Any] = {
    name: getattr(hashlib, name) for name in hashlib.algorithms_guaranteed if name.isidentifier()
}


class DigestCalculator:
    """Size and digests of a byte stream, updated chunk by chunk.

    The size is counted at once; the hashing of a large stream's chunks (past its first MiB)
    runs on a thread beside the caller's (`downloaders.inorder`): ``hashlib`` releases the GIL,
    so the reactor goes on reading and sending meanwhile. `hexdigests` waits for it.
    """

    def __init__(self, algorithms: Iterable[str]) -> None:
        self._hashers = tuple([(name, _new_hash(name)) for name in dict.fromkeys(algorithms)])
        #: Made once the stream is past `INLINE_BYTES`: a small one is hashed here.
        self._queue: InOrder | None = None
        self.size = 0
        #: ``(size, digests)`` as `hexdigests` last computed them.
        self._final: tuple[int, dict[str, str]] | None = None

    def update(self, data: bytes) -> None:
        self.size += len(data)
        queue = self._queue
        if queue is None:
            if self.size <= INLINE_BYTES:
                self._hash(data)
                return
            queue = self._queue = InOrder(self._hash)
        queue.put(data)

    def _hash(self, data: bytes) -> None:
        for _name, hasher in self._hashers:
            hasher.update(data)

    def hexdigests(self) -> dict[str, str]:
        """The digests of every byte given to `update` (this waits for the hashing thread).
        Computed once per size: validating a download and reporting its result ask twice."""
        if self._final is not None and self._final[0] == self.size:
            return dict(self._final[1])
        if self._queue is not None:
            self._queue.finish()
        digests = {name: hasher.hexdigest() for name, hasher in self._hashers}
        self._final = (self.size, digests)
        return dict(digests)

    def close(self) -> None:
        """Stop hashing (the download failed): what waits for the thread is dropped."""
        if self._queue is not None:
            self._queue.close()

    def artifact_attributes(self) -> dict[str, int | str]:
        """``size`` plus one key per computed digest, as in `DownloadResult`."""
        attributes: dict[str, int | str] = {"size": self.size}
        attributes.update(self.hexdigests())
        return attributes


def normalise_digests(digests: Mapping[str, str] | None) -> dict[str, str]:
    """Lower-case algorithm names and hex values; drop empty values."""
    return {k.lower(): v.lower() for k, v in (digests or {}).items() if v}
