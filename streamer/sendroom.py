"""How many bytes a client's TCP connection takes now: a slow client's bytes wait in the
kernel (a bounded amount), not in this process.

Twisted keeps what a producer writes in the transport's buffer until the socket reports room,
and pauses a push producer only once more than ``bufferSize`` (64 KiB) waits there. A client
that reads slowly therefore held up to two of its producer's chunks in the process (two
64 KiB reads, the second before the pause), besides the kernel's own send buffer, which Linux
grows to 4 MiB a connection: 1,000 slow clients held 128 MiB in the process and some 3 GiB in
the kernel.

`SendRoom.attach` changes that for one connection whose body a push producer sends:

* the transport pauses the producer as soon as anything waits in its buffer (``bufferSize``
  0), so the producer writes one chunk, then waits until the kernel took all of it;
* the kernel keeps at most `UNSENT_LIMIT` bytes that are not on the wire yet
  (``TCP_NOTSENT_LOWAT``), and reports room once less than half of that waits; bytes on the
  wire (a fast client's window) are not limited;
* the producer asks `SendRoom.room` before each read: the kernel's room (within that limit
  and the free part of the send buffer), so the chunk goes from the transport's buffer into
  the kernel at once; or, when the kernel would keep a write waiting, a `NUDGE`: a small
  write that waits in the buffer, so that Twisted watches the socket and resumes the
  producer once the client read enough.

A slow client then costs the process a `NUDGE`, not a chunk or two. Elsewhere than Linux, or
on a transport without a socket (TLS), `attach` returns None and nothing changes.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
from typing import Any

import attrs

__all__ = ["NUDGE", "UNSENT_LIMIT", "SendRoom"]

#: The most bytes the kernel keeps for a body's connection that are not on the wire yet. Half
#: of it is what the process must refill before the client could starve (4 ms at 1 Gbit/s);
#: all of it is what a fast client's follower reads at a time: a whole chunk of the download
#: (`streamer.follower.DEFAULT_READ_SIZE`), which is then sent without a copy.
UNSENT_LIMIT = 1024 * 1024
#: What a producer writes when the kernel has no room: it waits in the process (the only
#: bytes a stalled client costs here) and its send is what resumes the producer.
NUDGE = 4 * 1024
#: ``ioctl`` asking for the bytes not yet sent (Linux ``SIOCOUTQNSD``, tcp(7)).
_SIOCOUTQNSD = 0x894B
_INT = bytes(4)
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: ``getsockopt`` of the socket's memory figures (Linux ``SO_MEMINFO``: nine u32, of which
#: the send buffer's size and what is queued in it, both counted as the kernel charges them).
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")
_SNDBUF, _WMEM_QUEUED = 3, 5


@attrs.define
class SendRoom:
    """The kernel's room for a body on one TCP connection, *handle* (a socket), whose
    Twisted transport (if any) pauses its producer at once until `detach`."""

    handle: socket.socket
    limit: int = UNSENT_LIMIT
    transport: Any = None
    _buffer_size: int | None = None
    #: What `attach` measured, the answer of the first `room` (asked right after it).
    _first: int | None = None

    @classmethod
    def attach(cls, request: Any, limit: int = UNSENT_LIMIT) -> SendRoom | None:
        """Set up *request*'s connection for a push producer that reads `room` bytes at a
        time (see the module); None where the kernel cannot tell (not Linux, not TCP)."""
        transport: Any = getattr(getattr(request, "channel", None), "transport", None)
        handle = getattr(transport, "getHandle", lambda: None)()
        if not isinstance(handle, socket.socket) or sys.platform != "linux":
            return None
        room = cls(handle, limit, transport, transport.bufferSize)
        try:
            handle.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, limit)
            # Both queries work (or this kernel cannot tell), and what they say now is the
            # first read's room: the body's first bytes wait for no more system calls.
            room._first = room._measure()
            if room._first == 0:  # perhaps told by the first query alone: ask the second
                handle.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
        except OSError:
            return None
        transport.bufferSize = 0
        return room

    def detach(self) -> None:
        """Give the transport its own ``bufferSize`` back, before the body's last write: the
        next response on the connection may have a pull producer, which Twisted pauses once
        per write past ``bufferSize`` and resumes once (with 0, a headers write and a body
        write pause it twice, and it would never resume); and a last write left waiting
        would keep the connection from reading the next pipelined request."""
        if self._buffer_size is not None:
            self.transport.bufferSize, self._buffer_size = self._buffer_size, None

    def unsent(self) -> int:
        """Bytes the kernel holds that are not on the wire yet."""
        out = fcntl.ioctl(self.handle.fileno(), _SIOCOUTQNSD, _INT)
        return int.from_bytes(out, sys.byteorder)

    def room(self) -> int:
        """How many bytes the kernel takes at once (within the unsent limit and the free
        part of its send buffer); 0 when it would keep a write waiting (it reports room again
        once half of either is free): then write a `NUDGE`."""
        first, self._first = self._first, None
        if first is not None:
            return first
        try:
            return self._measure()
        except OSError:  # closed under us: the write that follows fails the usual way
            return 0

    def _measure(self) -> int:
        """`room`, asked of the kernel (two system calls); raises `OSError`."""
        unsent = self.unsent()
        if unsent >= self.limit // 2:
            return 0
        meminfo = _MEMINFO.unpack(
            self.handle.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
        )
        size, queued = meminfo[_SNDBUF], meminfo[_WMEM_QUEUED]
        free = size - queued
        if free < queued // 2:
            return 0
        # The kernel charges a byte a little more than one (its buffers' own bookkeeping).
        return min(self.limit - unsent, free - free // 8)
