"""FileDownloader: a ``file://`` url under the allowed import paths, read in chunks.

Reading uses a `Cooperator` on the downloader's reactor rather than a thread per chunk: a
local read of one chunk is a short, bounded call, the cooperator hands control back to the
reactor between chunks (so other downloads and clients keep moving), and `handle_data` runs
on the reactor thread, where a caller's writer (a twisted.web response, say) must be used.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, task

from downloaders import errors
from downloaders.base import BaseDownloader

#: Bytes read per step: big enough for fast hashing, small enough to keep the reactor lively.
CHUNK_SIZE = 256 * 1024


def path_from_url(url: str) -> str:
    """The local path of a ``file://`` url (host empty or ``localhost``)."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise errors.DownloadError(url, f"not a file:// url: scheme {parts.scheme!r}")
    if parts.netloc not in ("", "localhost"):
        raise errors.ForbiddenPath(url, f"file:// urls must be local, not on host {parts.netloc!r}")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise errors.DownloadError(url, "a file:// url needs an absolute path")
    return path


def is_under(path: str, folders: Iterable[str]) -> bool:
    """Whether ``path`` (symlinks resolved) is inside one of ``folders`` (symlinks resolved),
    compared by whole path components: ``/srv/allowed_evil`` is not under ``/srv/allowed``."""
    real = os.path.realpath(path)
    for folder in folders:
        if not folder:
            continue
        root = os.path.realpath(folder)
        if os.path.commonpath([root, real]) == root:
            return True
    return False


class FileDownloader(BaseDownloader):
    """Copy a local file named by a ``file://`` url, computing size and digests as HTTP does.

    :param allowed_import_paths: folders the file must be inside, after resolving symlinks;
        empty refuses every file (`ForbiddenPath`).
    """

    def __init__(
        self,
        url: str,
        *args: Any,
        allowed_import_paths: Iterable[str] = (),
        **kwargs: Any,
    ) -> None:
        # ``*args``: `BaseDownloader`'s positional parameters (Pulp's FileDownloader(url, *args)).
        super().__init__(url, *args, **kwargs)
        self.allowed_import_paths = tuple(str(p) for p in allowed_import_paths)
        self.local_path = path_from_url(url)

    def check_path(self) -> str:
        """The resolved path to read; `ForbiddenPath` outside the allowed folders, then
        `FileNotFound` when missing (so nothing is revealed about forbidden places)."""
        path = self.local_path
        if not self.allowed_import_paths:
            raise errors.ForbiddenPath(
                self.url, f"{path} refused: no allowed import paths are configured"
            )
        if not is_under(path, self.allowed_import_paths):
            raise errors.ForbiddenPath(
                self.url,
                f"{path} is outside the allowed import paths "
                f"({', '.join(self.allowed_import_paths)})",
            )
        real = os.path.realpath(path)
        if not os.path.exists(real):
            raise errors.FileNotFound(self.url, path)
        if not os.path.isfile(real):
            raise errors.DownloadError(self.url, f"{path} is not a regular file")
        return real

    def _run(self, extra_data: Any = None) -> defer.Deferred[None]:
        try:
            source = open(self.check_path(), "rb")  # noqa: SIM115 (closed by _chunks)
        except OSError as exc:
            return defer.fail(errors.DownloadError(self.url, f"cannot read: {exc.strerror}"))
        except errors.DownloadError as exc:
            return defer.fail(exc)
        cooperator = task.Cooperator(
            scheduler=lambda step: self.reactor.callLater(0, step),
            started=True,
        )
        steps = self._chunks(source)
        work = cooperator.cooperate(steps)

        def cancel(_: defer.Deferred[None]) -> None:
            work.stop()
            steps.close()  # closes the file now, not whenever the generator is collected

        done: defer.Deferred[None] = defer.Deferred(cancel)

        def finished(result: Any) -> None:
            if not done.called:
                done.callback(None)

        def failed(failure: Any) -> None:
            if failure.check(task.TaskStopped):
                return  # cancelled: `done` already failed with CancelledError
            if not done.called:
                done.errback(failure)

        work.whenDone().addCallbacks(finished, failed)
        return done

    def _chunks(self, source: IO[bytes]) -> Generator[None]:
        """Read and hand over one chunk per step; the file is closed however this ends."""
        with source:
            while True:
                try:
                    chunk = source.read(CHUNK_SIZE)
                except OSError as exc:
                    raise errors.DownloadError(self.url, f"cannot read: {exc.strerror}") from exc
                if not chunk:
                    return
                self.handle_data(chunk)
                yield None
