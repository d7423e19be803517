"""Attach an `ITap` to any downloader, through the only calls every downloader promises.

A `BaseDownloader` has a hook for it (`BaseDownloader.add_tap`): the tap takes the bytes instead
of the temporary file and hears the headers. Anything else that keeps the contract of
`downloaders.interfaces` (a plugin's own class) gets its ``handle_data`` and ``finalize``
wrapped on the instance, so whoever calls them, the downloader itself included, feeds the tap.
"""

from __future__ import annotations

import inspect
from typing import Any

from downloaders.base import as_deferred

__all__ = ["tap"]


def tap(downloader: Any, sink: Any) -> None:
    """Make *sink* (an `ITap`) see every chunk *downloader* passes to ``handle_data``, its
    headers when it reports them, and the end of a successful ``finalize``.

    Raises `TypeError` for an object without ``handle_data``: nothing could be seen of it.
    """
    add_tap = getattr(downloader, "add_tap", None)
    if callable(add_tap):
        add_tap(sink)
        return
    handle_data = getattr(downloader, "handle_data", None)
    if not callable(handle_data):
        raise TypeError(
            f"{type(downloader).__name__} has no handle_data(): a downloader must pass its "
            "bytes through handle_data() and call finalize()"
        )

    def tapped_handle_data(data: bytes) -> Any:
        result = handle_data(data)
        sink.write(data)
        return result

    downloader.handle_data = tapped_handle_data
    finalize = getattr(downloader, "finalize", None)
    if callable(finalize):

        def tapped_finalize(*args: Any, **kwargs: Any) -> Any:
            result = finalize(*args, **kwargs)
            if inspect.isawaitable(result):
                # An ``async def finalize``: tell the tap once it has validated.
                done = as_deferred(result)
                return done.addCallback(_then_finalized, sink)
            sink.finalized()
            return result

        downloader.finalize = tapped_finalize
    report = getattr(downloader, "headers_ready", None)
    if callable(report):

        def tapped_headers_ready(headers: Any) -> Any:
            sink.headers_ready(headers)
            return report(headers)

        downloader.headers_ready = tapped_headers_ready


def _then_finalized(result: Any, sink: Any) -> Any:
    sink.finalized()
    return result
