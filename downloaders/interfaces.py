"""The black-box boundary: what a remote hands out and the streamer runs."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IDownloader(Interface):
    """Something that fetches one url's bytes, validates them and reports the result."""

    url = Attribute("The url fetched (never with credentials in it).")

    def run(extra_data=None):  # type: ignore[no-untyped-def]
        """Download; return a Deferred firing with a `DownloadResult`.

        Cancelling the Deferred aborts the download and removes its temporary file.
        """


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
