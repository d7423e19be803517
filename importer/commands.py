"""The ``streamer sync`` and ``streamer fetch`` commands, called from the plain console script.

Each runs the reactor itself (``twisted.internet.task.react``) and returns an exit status:
0 on success, 1 when something failed, 2 for a usage error (an unknown remote). Errors are
one clear line on stderr, never a traceback. The Deferred-returning halves (`sync_remotes`,
`fetch_url`) are usable from code that already runs a reactor.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from twisted.internet import defer

from downloaders.errors import DownloadError
from downloaders.settings import SettingsError
from downloaders.urls import origin
from importer.progress import format_report, make_progress
from importer.remote import Remote
from importer.sync import SyncError, sync_remote
from importer.workers import SyncWorkers, helper_count
from store import ArtifactStorage, CatalogError, open_catalog, open_for_storage
from store.storage import STALE_TEMP_SECONDS
from store.tempdirs import remove_quietly

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def settle_imports() -> None:
    """Imports are done: take every object made so far out of the cyclic collector's sight
    (`gc.freeze`). Each full collection during the command, and the ones Python runs as it
    exits, then skip the ~50,000 objects of the imports: about 0.1 s less at the exit of a
    sync here. Before forking workers, it also keeps the collector from touching (and so
    copying) the pages they share with this process."""
    gc.freeze()


def _run_reactor(main: Callable[[Any], defer.Deferred[int]]) -> int:
    """Run ``main(reactor)`` under ``task.react``; its int result is the exit status.

    Stopping the reactor (Ctrl-C, SIGTERM) cancels ``main``'s Deferred, so downloads in
    flight are aborted and their temporary files removed; the status is then 130.
    """
    from twisted.internet import task

    settle_imports()

    def wrapper(reactor: Any) -> defer.Deferred[None]:
        d = main(reactor)
        stopping = []
        ended: defer.Deferred[None] = defer.Deferred()

        def stop() -> defer.Deferred[None]:
            """Cancel ``main``; the reactor stops once its clean-up ended (worker
            processes exiting, a catalog closing), so its status is still reported."""
            stopping.append(True)
            d.cancel()
            return ended

        trigger = reactor.addSystemEventTrigger("before", "shutdown", stop)

        def done(result: Any) -> None:
            if not stopping:
                reactor.removeSystemEventTrigger(trigger)
            if isinstance(result, int):
                if result:
                    raise SystemExit(result)
                return None
            if result.check(defer.CancelledError):
                print("interrupted", file=sys.stderr)
                raise SystemExit(EXIT_INTERRUPTED)
            print(f"error: {result.getErrorMessage()}", file=sys.stderr)
            raise SystemExit(EXIT_FAILED)

        def end(result: Any) -> Any:
            ended.callback(None)
            return result

        return d.addBoth(end).addBoth(done)

    try:
        task.react(wrapper)
    except SystemExit as exit:
        code = exit.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAILED)
    return EXIT_OK  # pragma: no cover - react always exits


# -- sync -----------------------------------------------------------------------------------


def select_remotes(config: Any, names: Sequence[str]) -> list[Remote]:
    """The configured remotes called *names* (all of them when empty), in the given order.

    Raises ValueError naming the unknown ones and the known ones.
    """
    if not names:
        return list(config.remotes)
    by_name = {remote.name: remote for remote in config.remotes}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        known = ", ".join(by_name) or "none configured"
        raise ValueError(f"unknown remote {', '.join(map(repr, unknown))} (known: {known})")
    return [by_name[name] for name in dict.fromkeys(names)]


@defer.inlineCallbacks
def sync_remotes(
    config: Any,
    remotes: Sequence[Remote],
    progress: Any = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    workers: SyncWorkers | None = None,
) -> Any:
    """Sync *remotes* one after the other into the configured storage and catalog.

    Prints each remote's summary to *out* and each remote-level failure to *err*; fires
    with the exit status (1 if any file or remote failed). *workers*: `SyncWorkers` started
    beforehand, shared by the remotes' syncs and closed at the end.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        storage = ArtifactStorage(config.storage.path)
        storage.clean_temp(min_age=STALE_TEMP_SECONDS)
        catalog = open_catalog(
            config.catalog.url, config.storage.path, pool_size=config.catalog.pool_size
        )
        yield open_for_storage(catalog, storage)
    except BaseException:
        if workers is not None:
            yield workers.close()
        raise
    status = EXIT_OK
    try:
        for remote in remotes:
            try:
                report = yield sync_remote(remote, catalog, storage, progress, workers)
            except SyncError as error:
                print(f"error: {error}", file=err)
                status = EXIT_FAILED
                continue
            finally:
                yield remote.close()
            print(format_report(report), file=out)
            if not report.ok:
                status = EXIT_FAILED
    finally:
        if workers is not None:
            yield workers.close()
        yield catalog.close()
        storage.close()
    return status


def sync_command(config: Any, remote_names: Sequence[str]) -> int:
    """``streamer sync [REMOTE...]``: sync the named remotes (all when none are named)."""
    try:
        remotes = select_remotes(config, remote_names)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not remotes:
        print("nothing to sync: no remotes are configured", file=sys.stderr)
        return EXIT_OK
    progress = make_progress(sys.stderr)
    # Worker processes start now, before the reactor: forked, they are ready at once.
    settle_imports()
    count = max(helper_count(remote) for remote in remotes)
    workers = SyncWorkers(count).start() if count else None
    return _run_reactor(lambda reactor: sync_remotes(config, remotes, progress, workers=workers))


# -- fetch ----------------------------------------------------------------------------------


def remote_for_url(config: Any, url: str) -> Remote:
    """Settings for a one-off download of *url*: those of the configured remote whose
    manifest lives on the same origin (its TLS, auth, proxy), else plain defaults."""
    for remote in getattr(config, "remotes", ()):
        if origin(remote.url) == origin(url):
            return remote
    security = getattr(config, "security", None)
    allowed = tuple(getattr(security, "allowed_import_paths", ()))
    return Remote(name="fetch", url=url, allowed_import_paths=allowed)


#: ``-o -``: the validated bytes go to standard output (and the report to standard error).
STDOUT = "-"


def fetch_target(url: str, output: str | None) -> str:
    """Where ``streamer fetch`` writes: *output* (a file, or ``-`` for standard output), else
    the url's file name in the current folder, as ``curl -O`` and ``wget`` do, never replacing
    an existing file (``-o`` replaces). A `ValueError` with one line says why not."""
    if output:
        if output != STDOUT and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
            raise ValueError(f"the folder of {output!r} does not exist")
        if output != STDOUT and os.path.isdir(output):
            raise ValueError(f"{output!r} is a folder: give -o a file name")
        return output
    try:
        name = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    except ValueError:
        name = ""
    if name in ("", ".", "..") or "\0" in name:
        raise ValueError("the url names no file: give -o FILE (or -o - for standard output)")
    if os.path.lexists(name):
        raise ValueError(f"{name} exists: give -o {name} to replace it")
    return name


def _copy_to_stdout(path: str) -> None:
    stream = sys.stdout.buffer
    with open(path, "rb") as source:
        while chunk := source.read(1024 * 1024):
            stream.write(chunk)
    stream.flush()


@defer.inlineCallbacks
def fetch_url(
    config: Any,
    url: str,
    sha256: str | None = None,
    size: int | None = None,
    output: str | None = None,
    out: TextIO | None = None,
) -> Any:
    """Download *url* once through the downloaders, validating *sha256* and *size* if given.

    The bytes go to `fetch_target` (*output*, ``-`` for standard output, else the url's file
    name): through a temporary file next to the target (``-``: in the system's temporary
    folder), renamed (``-``: copied, then removed) only once validated. Nothing is left
    behind on failure. Prints ``size``, ``sha256`` and ``written: WHERE`` to *out* (default:
    standard output, standard error with ``-``). Fires with the `DownloadResult`; download
    errors propagate.
    """
    target = fetch_target(url, output)
    to_stdout = target == STDOUT
    out = out or (sys.stderr if to_stdout else sys.stdout)
    remote = remote_for_url(config, url)
    digests = {"sha256": sha256.lower()} if sha256 else None
    temp_dir = None if to_stdout else os.path.dirname(os.path.abspath(target))
    try:
        downloader = remote.get_downloader(
            url=url, expected_digests=digests, expected_size=size, temp_dir=temp_dir
        )
        result = yield downloader.run()
    finally:
        yield remote.close()
    try:
        if to_stdout:
            _copy_to_stdout(result.path)
        else:
            os.replace(result.path, target)
    finally:
        remove_quietly(result.path)
    attributes = result.artifact_attributes
    print(f"size: {attributes['size']}", file=out)
    print(f"sha256: {attributes['sha256']}", file=out)
    print(f"written: {'standard output' if to_stdout else target}", file=out)
    return result


def fetch_command(
    config: Any, url: str, sha256: str | None, size: int | None, output: str | None
) -> int:
    """``streamer fetch URL [--sha256 HEX] [--size N] [-o FILE]``: one download, for scripts
    (see `fetch_url`). A target that cannot be written is refused (status 2) before any
    download."""
    try:
        target = fetch_target(url, output)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        try:
            yield fetch_url(config, url, sha256, size, target)
        except (DownloadError, SettingsError, ValueError, OSError) as error:
            print(f"error: fetch failed: {error}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    return _run_reactor(main)


# -- migrate --------------------------------------------------------------------------------


def migrate_command(config: Any, out: TextIO | None = None) -> int:
    """``streamer migrate``: create or upgrade the configured catalog's schema, print one
    line saying what it did; 1 (one line on stderr) when the database cannot be reached or
    refuses (a schema newer than this code)."""
    out = out or sys.stdout

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        catalog = open_catalog(
            config.catalog.url, config.storage.path, reactor=reactor, pool_size=1
        )
        try:
            report = yield catalog.migrate()
        except CatalogError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            yield catalog.close()
        print(report.describe(), file=out)
        return EXIT_OK

    return _run_reactor(main)
