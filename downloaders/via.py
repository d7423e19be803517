"""``Via`` (RFC 9110 section 7.6.3): the entry naming this installation, added to every
upstream request, and the check that refuses a request that already went through it.

A remote (or a redirect, or a mirror) that points back at the streamer would otherwise make
it ask itself for the file it is fetching, and the nested requests wait for each other
until read timeouts unwind them. As squid does, each hop appends ``1.1 <name>`` to the
``Via`` it forwards, and a request whose ``Via`` already holds our name is a loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping

__all__ = ["append_via", "check_pseudonym", "via_entry", "via_names"]

#: The protocol an entry names: the requests we send are HTTP/1.1.
_PROTOCOL = "1.1"
#: A ``received-by`` pseudonym: an RFC 9110 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_pseudonym(name: str) -> str | None:
    """What is wrong with *name* as a ``received-by`` pseudonym (None if nothing)."""
    if name and not _TOKEN.fullmatch(name):
        return f"{name!r} is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"
    return None


def via_entry(name: str) -> str:
    """Our entry in a ``Via`` header: ``1.1 <name>``."""
    return f"{_PROTOCOL} {name}"


def append_via(headers: MutableMapping[str, str], name: str) -> None:
    """Append our entry to the ``Via`` *headers* hold (any case; a remote's ``headers``
    may set one), or set it."""
    before = ", ".join(headers.pop(key) for key in [k for k in headers if k.lower() == "via"])
    headers["Via"] = f"{before}, {via_entry(name)}" if before else via_entry(name)


def via_names(values: Iterable[bytes | str]) -> set[str]:
    """The ``received-by`` names of the entries in ``Via`` header *values* (comments
    dropped; an entry without a name gives nothing)."""
    names = set()
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for entry in re.sub(r"\([^)]*\)", "", text).split(","):
            parts = entry.split()
            if len(parts) >= 2:
                names.add(parts[1])
    return names
