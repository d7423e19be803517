"""One client following a shared download: a push producer registered on its request.

A `Follower` sends a list of *segments* (literal bytes, such as multipart framing, and
half-open byte ranges ``(start, end)`` of the artifact) from a *source* (an
`streamer.inflight.InFlight`). It sends only while its transport wants bytes (it honours
``pauseProducing``/``resumeProducing``), reading what the source has already written; so a
slow client costs one chunk of memory at most and never holds back the source or the other
clients. The response starts (``on_start`` writes the status and headers) only once the
first byte of content can be sent, so until then the source may fail and the caller can
fail over to another one without the client noticing.

The last byte of the body (the final byte of the last range, before any multipart trailer) is
held back until the source validated the whole artifact (``source.succeeded``), whatever part
of the artifact the client asked for: a client that asked for ``bytes=0-99`` gets 99 bytes as
they arrive and the 100th once size and digests were checked, or an aborted connection if they
were wrong. So no response completes with bytes that no digest checked, and every client keeps
the download going to its end (a ``streamed`` download is only cancelled when nobody follows).

A follower paused for ``no_progress_timeout`` seconds (a client that stopped reading) has
its connection aborted.

What a slow client holds is the chunk its transport has not sent yet: with many clients at
once, that adds up (1,000 clients x 512 KiB is 500 MiB). So a follower's reads start at
`MIN_READ_SIZE` and double each time its transport asks for more (up to *read_size*). On a
TCP connection whose kernel tells its room (`streamer.sendroom.SendRoom`, Linux), a read is
no larger than what the kernel takes at once, so it leaves the process in the next reactor
turn, and a client that does not read costs a `streamer.sendroom.NUDGE`; the bytes that are
read and not yet handed to the kernel stay within `streamer.static.SEND_BUDGET` together
(`streamer.static.Senders.in_transit`; a follower that finds it spent waits for bytes to
leave). Elsewhere, a read is never above the follower's share of that budget among the
bodies the process sends (`streamer.static.Senders`, stored files included). Either way one
fast client soon reads 1 MiB at a time (a whole chunk of the download, without a copy), a
thousand slow ones 64 KiB each at most.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from streamer.sendroom import NUDGE, SendRoom
from streamer.static import FIRST_CHUNK, Senders, widen_sends

__all__ = ["Follower", "Segment"]

#: Literal bytes, or a half-open range ``(start, end)`` of the artifact's bytes.
Segment = bytes | tuple[int, int]

DEFAULT_READ_SIZE = 1024 * 1024
#: The smallest read: no fewer bytes per reactor turn for a follower, however many there are
#: (Twisted pauses a producer only once more than 64 KiB wait, so less would not hold less).
MIN_READ_SIZE = FIRST_CHUNK


@implementer(IPushProducer)
class Follower:
    """Send *segments* of *source* into *request* as the bytes become available.

    :param on_start: called once, right before the first write: set status and headers.
    :param on_failed: called with the error if the source fails before anything was sent
        (the caller may try another source); after that a failure aborts the connection.
    """

    def __init__(
        self,
        request: Any,
        source: Any,
        segments: Sequence[Segment],
        *,
        on_start: Callable[[], None],
        on_failed: Callable[[BaseException], None],
        reactor: IReactorTime,
        no_progress_timeout: float = 60.0,
        read_size: int = DEFAULT_READ_SIZE,
    ) -> None:
        self.request = request
        self.source = source
        self.segments = [s for s in segments if not isinstance(s, tuple) or s[1] > s[0]]
        self._on_start = on_start
        self._on_failed = on_failed
        self._reactor = reactor
        self._no_progress_timeout = no_progress_timeout
        self._read_size = read_size
        #: This follower's next read (grows from MIN_READ_SIZE while the client keeps up).
        self._next_read = min(MIN_READ_SIZE, read_size)
        self.started = False
        self.done = False
        self.paused = False
        #: Artifact bytes sent so far (framing not counted).
        self.sent = 0
        self._index = 0
        self._position = self._segment_start(0)
        self._timer: IDelayedCall | None = None
        #: Whether the body is more than one turn's first read: its first bytes are sent at
        #: once (`send_now`) instead of after the reads the next turn brings.
        self._large = sum(s[1] - s[0] for s in self.segments if isinstance(s, tuple)) > (
            self._next_read
        )
        #: When the transport last paused this follower (it runs the no-progress timer).
        self._paused_at = 0.0
        #: The kernel's room on the client's connection, where it can tell (`SendRoom`).
        self._room: SendRoom | None = None
        #: Bytes written that the transport has not handed to the kernel yet (with a room).
        self._in_transit = 0
        #: Whether this follower waits for bytes in transit to leave (`Senders.wait`).
        self._awaiting_budget = False
        ranges = [i for i, s in enumerate(self.segments) if isinstance(s, tuple)]
        self._first_range = ranges[0] if ranges else None
        #: The segment whose last byte waits for validation.
        self._final_range = ranges[-1] if ranges else None

    # -- driven by the caller and the source ----------------------------------------------

    def attach(self) -> None:
        """Join the source and send whatever is already available."""
        self.source.add(self)
        self.progress()

    def progress(self) -> None:
        """The source has more bytes (or succeeded): send what the client can take."""
        if self.done or self.paused:
            return
        if not self.started:
            if not self._can_start():
                return
            if self.source.succeeded and not self._large:
                self._send_whole()
                return
            self.started = True
            Senders.count += 1
            self._on_start()
            widen_sends(self.request)
            if self._large and len(self.segments) == 1:
                self._start_large()
                return
            if self._large:
                # A body of one read gains nothing, and a pause after its write would make its
                # last byte (released at validation) come from the file instead of memory.
                self._room = SendRoom.attach(self.request)
            self.request.registerProducer(self, True)
            self._pump()
            # The client's first bytes, before the next reads; and the client's turn first.
            if self._large and not self.done and send_now(self.request):
                let_the_client_run()
            return
        self._pump()

    def _start_large(self) -> None:
        """Start a body of more than one read (one range): its first read is written before
        this follower is the request's producer, so the channel hands it to the kernel with
        the response's head as it is written (`streamer.channel.StreamerChannel.write`), and
        the client on this host gets the CPU to read it (`let_the_client_run`); only then
        the connection is set up for the rest (`SendRoom`, the producer), and what more can
        be read is sent as usual (a client joining a download under way)."""
        request = self.request
        self._pump(once=True)
        if self.done:
            return
        # (A channel that queued the write, Twisted's own: sent from its buffer now.)
        if sent_whole(request) or send_now(request):
            let_the_client_run()
        self._room = SendRoom.attach(request)
        request.registerProducer(self, True)
        self._pump()

    def failed(self, error: BaseException) -> None:
        """The source failed: abort a started response, or let the caller fail over."""
        if self.done:
            return
        started, on_failed = self.started, self._on_failed
        self._stop()
        if started:
            transport = getattr(self.request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        else:
            on_failed(error)

    def stop(self) -> None:
        """The client went away: leave the source and send nothing more."""
        self._stop()

    # -- IPushProducer ----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        if self.done or self.paused:
            return
        self.paused = True
        self._paused_at = self._reactor.seconds()
        if self._timer is None and self._no_progress_timeout:
            self._timer = self._reactor.callLater(self._no_progress_timeout, self._stalled)

    def resumeProducing(self) -> None:
        # The no-progress timer keeps running: it checks, when it fires, whether this follower
        # has been paused since then (one timer per timeout, not one per chunk).
        self.paused = False
        self._release()
        self._next_read = min(self._read_size, self._next_read * 2)
        self.progress()

    def stopProducing(self) -> None:
        self._stop()

    # -- internals ------------------------------------------------------------------------------

    def _can_start(self) -> bool:
        if self.source.succeeded:
            return True
        if self._first_range is None:
            return False
        return self._sendable_end(self._first_range) > self._segment_start(self._first_range)

    def _sendable_end(self, index: int) -> int:
        """Where sending segment *index* must stop for now: what the source has written,
        less the body's last byte while the artifact is not validated."""
        end: int = self.segments[index][1]
        if self.source.succeeded:
            return end
        if index == self._final_range:
            end -= 1
        return min(end, self.source.readable())

    def _segment_start(self, index: int) -> int:
        if index < len(self.segments) and isinstance(self.segments[index], tuple):
            return self.segments[index][0]
        return 0

    def _next_segment(self) -> None:
        self._index += 1
        self._position = self._segment_start(self._index)

    def _pump(self, once: bool = False) -> None:
        """Send what the client's connection takes now; with *once*, one read at most."""
        request = self.request
        while not self.paused and not self.done:
            if self._index >= len(self.segments):
                self._finish()
                return
            segment = self.segments[self._index]
            if isinstance(segment, bytes):
                self._next_segment()
                request.write(segment)
                continue
            end = self._sendable_end(self._index)
            if self._position >= end:
                return  # wait for the source
            size = min(self._next_read, end - self._position)
            counted = False
            if self._room is None:
                size = min(size, Senders.share())
            elif (room := self._room.room()) == 0:
                size = min(size, NUDGE)  # waits in the transport until the client reads
            elif Senders.unspent() > 0:
                size = min(size, room, Senders.unspent())  # leaves in the next turn
                counted = True
            else:
                if not self._awaiting_budget:
                    self._awaiting_budget = True
                    Senders.wait(self._budget_freed)
                return
            data = self.source.read(self._position, size)
            if not data:
                return
            if counted:
                self._in_transit += len(data)
                Senders.take(len(data))
            self._position += len(data)
            self.sent += len(data)
            if self._position >= segment[1]:
                if self._index == self._final_range and self._room is not None:
                    self._room.detach()
                self._next_segment()
            request.write(data)
            if once:
                return

    def _send_whole(self) -> None:
        """A validated body of one read (a small download held in memory, or one a client
        joined late): status, headers and every byte in one write, and done; no producer
        (the kernel takes it whole: nothing to pause) and no share of the send budget."""
        parts = []
        for segment in self.segments:
            if isinstance(segment, bytes):
                parts.append(segment)
                continue
            start, end = segment
            while start < end:
                data = self.source.read(start, end - start)
                if not data:
                    raise OSError(f"short read at {start} of {end} bytes")
                parts.append(data)
                start += len(data)
                self.sent += len(data)
        on_start = self._on_start
        self._stop()  # (not started: no sender to count off)
        self.started = True
        if getattr(self.request, "_disconnected", False):
            return
        on_start()
        self.request.write(parts[0] if len(parts) == 1 else b"".join(parts))
        self.request.finish()

    def _finish(self) -> None:
        self._stop()
        self.request.unregisterProducer()
        if not getattr(self.request, "_disconnected", False):
            self.request.finish()

    def _stalled(self) -> None:
        self._timer = None
        if self.done or not self.paused:
            return
        paused_for = self._reactor.seconds() - self._paused_at
        if paused_for < self._no_progress_timeout:
            self._timer = self._reactor.callLater(
                self._no_progress_timeout - paused_for, self._stalled
            )
            return
        self._stop()
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _stop(self) -> None:
        if self.done:
            return
        self.done = True
        if self.started:
            Senders.count -= 1
        room, self._room = self._room, None
        if room is not None:
            room.detach()
        self._release()
        self._cancel_timer()
        self.source.remove(self)
        # The caller's callbacks hold the caller, which holds us: let go of them, so a
        # finished response is freed at once, not later by the cyclic garbage collector.
        self._on_start = _nothing
        self._on_failed = _nothing

    def _budget_freed(self) -> None:
        self._awaiting_budget = False
        self.progress()

    def _release(self) -> None:
        """The transport handed what this follower wrote to the kernel (or it stopped)."""
        if self._in_transit:
            size, self._in_transit = self._in_transit, 0
            Senders.release(size)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _nothing(*_args: object) -> None:
    """What a finished follower calls instead of its caller's callbacks (never, in fact)."""


def send_now(request: Any) -> bool:
    """Send what the client's connection holds now, instead of at the reactor's next turn;
    True if it went to the kernel here.

    Twisted queues every write until the next turn asks the connection whether it can be
    written: a cold response's first bytes would wait behind the reads that turn brings (the
    next upstream chunk, hashed and written). On a plain TCP connection that is not closing,
    the queued bytes go out with the transport's own ``doWrite`` at once; what the socket
    does not take, and any error, stays with the transport for its next turn (it still waits
    for writability). A connection being closed (its close follows its last write), TLS and
    any other transport keep Twisted's way.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if (
        type(transport) is not tcp.Server
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or not (transport.dataBuffer or transport._tempDataBuffer)
    ):
        return False
    try:
        transport.doWrite()
    except Exception:
        return False  # the transport's next turn meets the same error and reports it
    return True


def sent_whole(request: Any) -> bool:
    """Whether everything written to *request* so far went to the kernel: a plain TCP
    connection, open, with nothing left in its transport's buffer."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    return (
        type(transport) is tcp.Server
        and not transport.TLS
        and bool(transport.connected)
        and not transport.disconnecting
        and not (transport.dataBuffer or transport._tempDataBuffer)
    )


def let_the_client_run() -> None:
    """Give up the CPU once, right after a cold response's first bytes went to the kernel.

    The kernel wakes a client on this host that those bytes reach as if we were about to
    sleep (a sync wake-up): with no idle CPU it queues the client behind us, on our CPU. But a
    cold response's first bytes are followed at once by the rest of the download (read,
    written, hashed), and the client would see them only once our time slice ends (1.5 ms on
    a 2-CPU host) instead of now. Where nothing else waits for our CPU (a remote client), the
    call returns at once.
    """
    if hasattr(os, "sched_yield"):  # (not on every platform)
        os.sched_yield()
