"""The wire protocol between a sync and its helper processes.

Messages are JSON lines over a socket pair (``op`` names the message):

* to a helper: ``config`` (the remote's settings, the storage root), ``fetch`` (a file's
  sources; a helper holds up to `WINDOW_PER_SLOT` files per download slot, the others wait
  for a slot), ``return`` (give back the files that have not started), ``flush`` (commit
  what waits for a batch now);
* from a helper: ``hello`` once it has started, ``ready`` / ``error`` (answering
  ``config``), then per file ``free`` (it no longer takes a place in the helper's window),
  ``failed`` or ``returned``, and ``stored`` for the files that entered storage in one
  reactor turn (a commit batch), together (``files``: ``[sha256, url]`` each).

The syncing process's end is `importer.helpers.handout.HelperLink`, the helper's
`importer.helpers.child.HelperSide`.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet import protocol

from store.catalog import CatalogEntry

__all__ = [
    "MAX_LINE",
    "WINDOW_PER_SLOT",
    "HelperError",
    "SingleProtocolFactory",
    "decode_message",
    "decode_sources",
    "encode_message",
    "encode_sources",
    "remote_fields",
]

#: Files handed to a helper ahead of its free download slots, per slot: its slots never wait
#: for the (busy) syncing process to hand out the next file; its own ``download_concurrency``
#: still bounds its connections. (With two per slot, a helper's slots sat idle for about 40%
#: of a 2000-file sync, waiting for the syncing process to answer; with four, about 15%.)
WINDOW_PER_SLOT = 4
#: Longest message line (a file's sources, with every mirror's url).
MAX_LINE = 1 << 20


class HelperError(Exception):
    """A helper process refused a sync's configuration, or ended."""


def remote_fields(remote: Any, slots: int) -> dict[str, Any]:
    """*remote*'s settings as a helper rebuilds its `Remote`, with *slots* downloads."""
    fields = {a.alias: getattr(remote, a.name) for a in attrs.fields(type(remote)) if a.init}
    fields.update(download_concurrency=slots, sync_processes=1)
    return fields


#: One encoder for every message (``json.dumps`` with separators makes a new one per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode
#: One decoder, given text (``json.loads`` of bytes first guesses their encoding, per call).
_decode = json.JSONDecoder().decode


def encode_message(message: dict[str, Any]) -> bytes:
    """One message as a line's bytes (without the line end)."""
    return _encode(message).encode()


def decode_message(line: bytes) -> dict[str, Any]:
    """The message a line holds; ValueError (UTF-8 or JSON) if it holds none."""
    message = _decode(line.decode())
    if not isinstance(message, dict):
        raise ValueError(f"not a message: {line[:80]!r}")
    return message


def encode_sources(sources: list[CatalogEntry]) -> list[list[Any]]:
    return [[e.path, e.remote, e.url, e.size, e.digests, e.position] for e in sources]


def decode_sources(data: list[list[Any]]) -> list[CatalogEntry]:
    return [
        CatalogEntry(path=path, remote=remote, url=url, size=size, digests=digests, position=pos)
        for path, remote, url, size, digests, pos in data
    ]


class SingleProtocolFactory(protocol.ServerFactory):
    """Builds the one protocol instance it was given (for ``adoptStreamConnection``)."""

    def __init__(self, instance: protocol.Protocol) -> None:
        self.instance = instance

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.instance
