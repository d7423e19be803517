"""The black-box boundary: what a remote hands out and the streamer runs.

The contract every downloader keeps (the one Pulp's ``pulpcore.plugin.download`` states, and the
only one the streamer relies on):

* ``run(extra_data=None)`` starts the download and returns a Deferred (or a coroutine) that
  fires once it is over: with a `DownloadResult`, or with the error that ended it.
* Every body byte passes through ``handle_data(data)``, in order, each exactly once per
  successful attempt; repeated calls equal one call with the concatenated data.
* ``finalize()`` runs after the last ``handle_data`` call; it closes the file and validates.

Nothing else is promised. Keywords such as ``writer=`` or ``headers_ready_callback=`` belong to
the built-in downloaders; a plugin's downloader may not take them. So the streamer *taps* a
downloader (`downloaders.tap.tap`) instead: it sees each chunk as ``handle_data`` gets it, and
the response headers when the downloader reports them (`BaseDownloader.headers_ready`; a
downloader that never reports headers is answered with the catalog's size and a type by
extension). A downloader whose ``run()`` succeeds without having passed the artifact's bytes
through ``handle_data`` breaks the contract: the streamer answers 502 at once instead of
waiting for bytes that will never come.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IDownloader(Interface):
    """Something that fetches one url's bytes, validates them and reports the result."""

    url = Attribute("The url fetched (never with credentials in it).")

    def run(extra_data=None):  # type: ignore[no-untyped-def]
        """Download; return a Deferred firing with a `DownloadResult`.

        Cancelling the Deferred aborts the download and removes its temporary file.
        """

    def handle_data(data):  # type: ignore[no-untyped-def]
        """Take the next chunk of body bytes: count, hash and store it. Every byte of the
        download passes here exactly once (per attempt)."""

    def finalize():  # type: ignore[no-untyped-def]
        """After the last chunk: close the file and validate size and digests."""


class IWriter(Interface):
    """A caller-supplied destination for the bytes, instead of a temporary file.

    Chunks are pushed as they arrive from upstream, on the reactor thread, with no
    backpressure: the downloader never pauses the upstream for a writer. So ``write`` must not
    block, and a writer whose own consumer is slower (a client connection) must not buffer
    without bound either: spill to disk and let the slow side read at its own pace, as the
    streamer's `InFlight` does. An exception from ``write`` aborts the download (no retry) and
    reaches the caller of ``run()`` unchanged. The downloader never closes the writer.
    """

    def write(data):  # type: ignore[no-untyped-def]
        """Take the next chunk of body bytes (in order, each exactly once)."""


class ITap(IWriter):
    """An observer attached to any downloader with `downloaders.tap.tap` (the streamer's
    `InFlight` is one): it gets what ``handle_data`` gets and what ``finalize`` concludes,
    whatever protocol or plugin is behind them.

    ``write`` is called from inside ``handle_data`` (an exception ends the download, as for an
    `IWriter`). On a `BaseDownloader` the tap takes the bytes *instead of* its temporary file
    (``result.path`` is None) and, once it got a byte or the headers, the download is not
    retried (they cannot be taken back), unless the tap says it can take them back: a true
    ``restartable`` attribute, and a ``restart()`` that forgets every header and byte it got
    (called before the next attempt or mirror, which reports them again).
    """

    def headers_ready(headers):  # type: ignore[no-untyped-def]
        """The final response's headers (before the first chunk), for downloaders that report
        them; raising refuses the response before any byte is passed on."""

    def finalized():  # type: ignore[no-untyped-def]
        """``finalize()`` ran and validated: every byte was passed to ``write``."""
