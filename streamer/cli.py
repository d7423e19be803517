"""The ``streamer`` console script: sync, fetch, verify, sign, migrate.

``streamer [--config FILE] COMMAND ...``; ``$STREAMER_CONFIG`` names the file when --config
is absent. Exit statuses: see `EXIT_STATUSES`.

This module owns the command line: its arguments, what it prints, its exit statuses, and the
reactor (`run_reactor`, the one place a command runs it). The work is the importer's and the
store's, asked for with plain values (remotes, a storage, a catalog): `importer.sync_remotes`,
`importer.download_url`, `ICatalog.migrate`. The Deferred-returning halves (`run_sync`,
`run_fetch`) are usable from code that already runs a reactor.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit

# These imports bring in Twisted, its TLS stack and the project: some 100,000 objects, which
# the cyclic collector walked about a hundred times meanwhile (30-100 ms of every command's
# start here), and once more when turned back on. It is off while they run, and what they
# made (long-lived: modules, classes, functions) is frozen out of its sight before it is
# on again, as `settle_imports` does before a command's work.
_collecting = gc.isenabled()
gc.disable()
try:
    import tempfile  # (shutil, collections' namedtuples: collections of their own)

    from twisted.internet import defer

    from store.errors import CatalogError, StorageError
    from streamer.collector import settle_imports
    from streamer.config import CONFIG_ENV, Config, ConfigError, load_config
finally:
    if _collecting:
        gc.freeze()
        gc.enable()

__all__ = ["exit_now", "main", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Python's own status when the standard output cannot be flushed at exit.
EXIT_OUTPUT = 120
DEFAULT_SIGNATURE_LIFETIME = 3600
EXIT_STATUSES = """exit status:
  0    done (verify: every artifact is good)
  1    the work failed (verify: bad artifacts found and moved aside; sync or fetch: failures;
       migrate: the database could not be reached, or its schema is newer than this code)
  2    usage or configuration error (one line on stderr names the key at fault)
  120  the output could not be written (a full disk, a closed pipe; one line on stderr)
  130  interrupted (Ctrl-C)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Sync, fetch, verify and sign repository content; create or upgrade the "
        "catalog schema.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help=f"configuration file (TOML); default: ${CONFIG_ENV}, else embedded defaults",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync = commands.add_parser("sync", help="sync all remotes, or the named ones")
    sync.add_argument("remotes", nargs="*", metavar="REMOTE")

    fetch = commands.add_parser(
        "fetch",
        help="download one URL, validating size and digest",
        description="Download URL with the settings of the configured remote on its origin "
        "(else defaults), through a temporary file next to the target that becomes the target "
        "only once size and sha256 are validated; nothing is left behind on failure. Prints "
        "'size: N', 'sha256: HEX' and 'written: WHERE' (to standard error with -o -).",
    )
    fetch.add_argument("url", metavar="URL")
    fetch.add_argument("--sha256", metavar="HEX", help="expected sha256 (64 hex digits)")
    fetch.add_argument("--size", metavar="N", help="expected size in bytes")
    fetch.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to write the bytes (replaced if it exists); '-' for standard output "
        "(only validated bytes are written). Default: the URL's file name in the current "
        "folder, as curl -O and wget do, never replacing an existing file",
    )

    commands.add_parser(
        "verify",
        help="re-hash every stored artifact; set aside bad ones",
        description="Re-hash every stored artifact. Prints one 'BAD <sha256>: ...' line per "
        "damaged artifact (moved to quarantine/ and unmarked in the catalog, so it is fetched "
        "again), then 'verified N artifact(s) in FOLDER: G good, B bad'. Exit status 1 when "
        "any was bad.",
    )

    commands.add_parser(
        "migrate",
        help="create or upgrade the catalog schema",
        description="Create the configured catalog's schema, or upgrade it to this version's, "
        "then print 'catalog LOCATION: schema version N (created | up to date | upgraded from "
        "version M)'. The streamer and sync do the same when they start; run it by hand to "
        "upgrade with a database user that may change the schema while the service runs "
        "with one that may not. A schema newer than this code is refused (exit status 1).",
    )

    sign = commands.add_parser(
        "sign",
        help="print a signed URL path",
        description="Print PATH?expires=UNIX_TIME&signature=HEX for the configured "
        "[security] signing_key_file. Given a full URL, print the full signed URL.",
    )
    sign.add_argument(
        "path", metavar="PATH", help="the path (or URL) to sign, e.g. /fixtures/a.rpm"
    )
    sign.add_argument(
        "--expires",
        metavar="SECONDS",
        type=int,
        default=DEFAULT_SIGNATURE_LIFETIME,
        help=f"lifetime of the signature in seconds (default {DEFAULT_SIGNATURE_LIFETIME})",
    )
    return parser


def _error(message: str, status: int = 2) -> int:
    try:
        print(f"streamer: {message}", file=sys.stderr)
    except (AttributeError, OSError, ValueError):  # no standard error, or a broken one
        pass
    return status


class OutputError(Exception):
    """Standard output could not be written: the command ends with one line saying so.

    Not an ``OSError``, so no command's own handling of its file errors takes it for one."""

    @classmethod
    def writing(cls, error: BaseException) -> OutputError:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        return cls(f"cannot write the standard output: {reason}")

    @classmethod
    def closed(cls) -> OutputError:
        """Started with descriptor 1 closed (``>&-``: ``sys.stdout`` is None), said as the
        failed write to it would say it."""
        return cls.writing(OSError(errno.EBADF, os.strerror(errno.EBADF)))


class _GuardedOutput:
    """A text stream whose first failure to write or flush raises `OutputError`; after it,
    what is written is dropped (the command was told once; its end flushes nothing twice).
    The rest of the stream's interface is the stream's own."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._failed = False

    def write(self, text: str) -> int:
        if self._failed:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as error:  # a full disk, a closed pipe or stream
            raise self._failure(error) from None

    def flush(self) -> None:
        if self._failed:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as error:
            raise self._failure(error) from None

    def _failure(self, error: BaseException) -> OutputError:
        self._failed = True
        return OutputError.writing(error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def sign_command(config: Config, path: str, lifetime: int, now: float | None = None) -> int:
    """Print *path* (or the path of URL *path*) signed with the configured key, valid for
    *lifetime* seconds."""
    from streamer.paths import RefusedPath
    from streamer.signing import sign_path

    key = config.security.signing_key()
    if key is None:
        return _error("security.signing_key_file is not set: URL signing is off")
    if lifetime <= 0:
        return _error(f"--expires: must be > 0 seconds, not {lifetime}")
    parts = urlsplit(path)
    if parts.query or parts.fragment:
        return _error(f"PATH: must not carry a query or fragment: {path!r}")
    origin = urlunsplit((parts.scheme, parts.netloc, "", "", "")) if parts.netloc else ""
    now = time.time() if now is None else now
    try:
        signed = sign_path(key, parts.path if origin else path, int(now) + lifetime)
    except RefusedPath as refused:
        return _error(f"PATH: the server would refuse {path!r}: {refused.reason}")
    print(origin + signed)
    return 0


def verify_command(config: Config) -> int:
    """Re-hash the store, move bad artifacts aside, unmark them in the catalog; 1 if any bad."""
    from store.storage import ArtifactStorage

    if not os.path.isdir(config.storage.path):
        print(f"verified 0 artifact(s) in {config.storage.path}: no store there yet")
        return 0
    storage = ArtifactStorage(config.storage.path)
    report = storage.verify(
        on_bad=lambda bad: print(
            f"BAD {bad.sha256}: {bad.reason or f'content hashes to {bad.actual_sha256}'}; "
            f"moved to {bad.quarantine_path}"
        )
    )
    if report.bad:
        _unmark_in_catalog(config, [bad.sha256 for bad in report.bad])
    print(
        f"verified {report.checked} artifact(s) in {storage.root}: "
        f"{report.good} good, {len(report.bad)} bad"
    )
    return 1 if report.bad else 0


def _unmark_in_catalog(config: Config, digests: list[str]) -> None:
    """Clear the catalog's stored flag of quarantined artifacts, so they are fetched again."""
    from store.catalog import open_for_storage
    from store.storage import ArtifactStorage

    @defer.inlineCallbacks
    def unmark(reactor: Any) -> Any:
        try:
            catalog = _open_catalog(config, reactor)
            yield open_for_storage(catalog, ArtifactStorage(config.storage.path))
            try:
                for sha256 in digests:
                    yield catalog.mark_stored(sha256, False)
            finally:
                yield catalog.close()
        except Exception as error:
            print(
                f"streamer: could not update the catalog's stored flags: {error}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        return EXIT_OK

    run_reactor(unmark)


def _open_catalog(config: Config, reactor: Any = None, pool_size: int | None = None) -> Any:
    """The configured catalog (unopened)."""
    from store.catalog import open_catalog

    return open_catalog(
        config.catalog.url,
        config.storage.path,
        reactor=reactor,
        pool_size=pool_size or config.catalog.pool_size,
    )


def _fetch_arguments_problem(sha256: str | None, size: str | None) -> str:
    """What is wrong with ``fetch``'s --sha256 and --size, in one line ("" if nothing)."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        return f"--sha256: must be 64 hexadecimal digits, not {sha256!r}"
    if size is not None and not re.fullmatch(r"[0-9]+", size):
        return f"--size: must be a non-negative integer, not {size!r}"
    return ""


# -- the reactor ----------------------------------------------------------------------------


def _stop_once(reactor: Any) -> None:
    if reactor.running and not getattr(reactor, "_stopped", False):
        reactor.stop()


def run_reactor(main: Callable[[Any], defer.Deferred[int]]) -> int:
    """Run ``main(reactor)`` under ``task.react``; its int result is the exit status.

    Stopping the reactor (Ctrl-C, SIGTERM, SIGHUP) cancels ``main``'s Deferred, so downloads in
    flight are aborted and their temporary files removed; the status is then 130. Any other
    failure is one line (``error: ...``) and status 1.
    """
    from twisted.internet import task

    settle_imports()

    def wrapper(reactor: Any) -> defer.Deferred[None]:
        d = main(reactor)
        stopping = []
        ended: defer.Deferred[None] = defer.Deferred()

        def stop() -> defer.Deferred[None]:
            """Cancel ``main``; the reactor stops once its clean-up ended (helper
            processes exiting, a catalog closing), so its status is still reported."""
            stopping.append(True)
            d.cancel()
            return ended

        trigger = reactor.addSystemEventTrigger("before", "shutdown", stop)
        # A terminal that hangs up (an ssh session ending) interrupts as Ctrl-C does: the
        # work is cancelled and cleans up (its default action ended the process at once).
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(_stop_once, reactor))

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
            if result.check(OutputError):
                raise SystemExit(_error(result.getErrorMessage(), EXIT_OUTPUT))
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


# -- sync -----------------------------------------------------------------------------------


def select_remotes(config: Config, names: Sequence[str]) -> list[Any]:
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
def run_sync(
    config: Config,
    remotes: Sequence[Any],
    progress: Any = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    helpers: Any = None,
) -> Any:
    """Sync *remotes* into the configured storage and catalog (`importer.sync_remotes`).

    Prints each remote's summary to *out* and each remote-level failure to *err*; fires
    with the exit status (1 if any file or remote failed). *helpers*: `SyncHelpers` started
    beforehand, shared by the remotes' syncs and closed at the end.
    """
    from importer.progress import format_report
    from importer.sync import SyncError, sync_remotes
    from store import ArtifactStorage, open_for_storage
    from store.storage import STALE_TEMP_SECONDS

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        storage = ArtifactStorage(config.storage.path)
        storage.clean_temp(min_age=STALE_TEMP_SECONDS)
        catalog = _open_catalog(config)
    except BaseException:
        if helpers is not None:
            yield helpers.close()
        raise
    # The catalog opens (schema, storage check: in its own thread) while the first remote's
    # listing is fetched and checked; that sync waits for it before it writes to it.
    opening = open_for_storage(catalog, storage)

    def reported(remote: Any, outcome: Any) -> None:
        if isinstance(outcome, SyncError):
            print(f"error: {outcome}", file=err)
        else:
            print(format_report(outcome), file=out)

    try:
        outcomes = yield sync_remotes(
            remotes,
            catalog,
            storage,
            progress,
            helpers,
            reported,
            catalog_ready=opening,
            close_helpers=False,
        )
    finally:
        # The helpers exit (their connections closed, their temporary folders removed) while
        # the catalog closes (SQLite's last checkpoint, which holds this thread): once they
        # have been told, the one does not wait for the other.
        exiting = None
        if helpers is not None:
            exiting = helpers.close()
            yield helpers.disconnected()
        try:
            yield catalog.close()
            storage.close()
        finally:
            if exiting is not None:
                yield exiting
    failed = any(isinstance(outcome, SyncError) or not outcome.ok for outcome in outcomes)
    return EXIT_FAILED if failed else EXIT_OK


def sync_command(config: Config, remote_names: Sequence[str]) -> int:
    """``streamer sync [REMOTE...]``: sync the named remotes (all when none are named)."""
    from importer.helpers.process import SyncHelpers, helper_count, import_for_fork
    from importer.progress import make_progress

    try:
        remotes = select_remotes(config, remote_names)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not remotes:
        print("nothing to sync: no remotes are configured", file=sys.stderr)
        return EXIT_OK
    progress = make_progress(sys.stderr)
    # A helper's trouble (it died, it could not start) only slows the sync down: say so.
    from twisted.logger import ILogObserver, globalLogPublisher
    from zope.interface import provider

    globalLogPublisher.addObserver(provider(ILogObserver)(_print_helper_warnings))
    # Helper processes start now, before the reactor: forked, they are ready at once. What
    # they run is imported first, so it is out of the collector's sight with the rest.
    count = max(helper_count(remote) for remote in remotes)
    if count:
        import_for_fork()
    settle_imports()
    helpers = SyncHelpers(count).start() if count else None
    return run_reactor(lambda reactor: run_sync(config, remotes, progress, helpers=helpers))


def _print_helper_warnings(event: dict[str, Any]) -> None:
    """A warning or worse of the sync helpers (``importer.helpers``) as one line on stderr:
    the command routes no other log event, and a helper that died would otherwise be seen only
    as a slower sync."""
    from twisted.logger import LogLevel, formatEvent

    namespace = str(event.get("log_namespace", ""))
    level = event.get("log_level")
    if namespace.startswith("importer.helpers") and level is not None and level >= LogLevel.warn:
        print(f"warning: {formatEvent(event)}", file=sys.stderr)


# -- fetch ----------------------------------------------------------------------------------

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
    if sys.stdout is None:
        raise OutputError.closed()
    try:
        _copy(path, sys.stdout.buffer)
    except OSError as error:  # (not the download's fault: said as any command says it)
        raise OutputError.writing(error) from None


def _copy(path: str, stream: IO[bytes]) -> None:
    with open(path, "rb") as source:
        while chunk := source.read(1024 * 1024):
            stream.write(chunk)
        stream.flush()


def _special_file(target: str) -> bool:
    """Whether *target* exists and is not a regular file once links are followed
    (``/dev/null``, ``/dev/stdout``, a FIFO): written into, as curl does, never replaced."""
    try:
        return not stat.S_ISREG(os.stat(target).st_mode)
    except OSError:
        return False


def _new_file_mode(target: str) -> int:
    """The mode a fetched file gets, as curl's and wget's: a file it replaces keeps its own,
    a new one is 0o666 less the umask (the temporary file it was written to is 0o600)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@defer.inlineCallbacks
def run_fetch(
    config: Config,
    url: str,
    sha256: str | None = None,
    size: int | None = None,
    output: str | None = None,
    out: TextIO | None = None,
) -> Any:
    """Download *url* once (`importer.download_url`, with the settings of the configured
    remote on its origin), validating *sha256* and *size* if given.

    The bytes go to `fetch_target` (*output*, ``-`` for standard output, else the url's file
    name): through a temporary file next to the target (``-``, or a target that is not a
    regular file such as ``/dev/null`` or a FIFO: in the system's temporary folder), renamed
    (``-`` and those: copied into, then removed) only once validated. Nothing is left
    behind on failure. Prints ``size``, ``sha256`` and ``written: WHERE`` to *out* (default:
    standard output, standard error with ``-``). Fires with the `DownloadResult`; download
    errors propagate.
    """
    from importer.remote import download_url, remote_for_url
    from store.tempdirs import remove_quietly

    target = fetch_target(url, output)
    to_stdout = target == STDOUT
    into = not to_stdout and _special_file(target)
    out = out or (sys.stderr if to_stdout else sys.stdout)
    remote = remote_for_url(config.remotes, url, config.security.allowed_import_paths)
    # Standard output or a FIFO: the system's temporary folder (the working folder, the
    # downloaders' default, may be read-only); else next to the target, for one rename.
    temp_dir = (
        tempfile.gettempdir() if to_stdout or into else os.path.dirname(os.path.abspath(target))
    )
    result = yield download_url(remote, url, sha256, size, temp_dir)
    try:
        if to_stdout:
            _copy_to_stdout(result.path)
        elif into:
            with open(target, "wb") as stream:
                _copy(result.path, stream)
        else:
            os.chmod(result.path, _new_file_mode(target))
            os.replace(result.path, target)
    finally:
        remove_quietly(result.path)
    if out is None:  # that stream was closed at start (print would take sys.stdout: the bytes)
        return result
    attributes = result.artifact_attributes
    print(f"size: {attributes['size']}", file=out)
    print(f"sha256: {attributes['sha256']}", file=out)
    print(f"written: {'standard output' if to_stdout else target}", file=out)
    return result


def fetch_command(
    config: Config, url: str, sha256: str | None, size: int | None, output: str | None
) -> int:
    """``streamer fetch URL [--sha256 HEX] [--size N] [-o FILE]``: one download, for scripts
    (see `run_fetch`). A target that cannot be written is refused (status 2) before any
    download."""
    from downloaders.errors import DownloadError
    from downloaders.settings import SettingsError

    try:
        target = fetch_target(url, output)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if target == STDOUT and sys.stdout is None:  # nowhere to write the bytes: download nothing
        return _error(str(OutputError.closed()), EXIT_OUTPUT)

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        try:
            yield run_fetch(config, url, sha256, size, target)
        except (DownloadError, SettingsError, ValueError, OSError) as error:
            print(f"error: fetch failed: {error}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    return run_reactor(main)


# -- migrate --------------------------------------------------------------------------------


def migrate_command(config: Config, out: TextIO | None = None) -> int:
    """``streamer migrate``: create or upgrade the configured catalog's schema, print one
    line saying what it did; 1 (one line on stderr) when the database cannot be reached or
    refuses (a schema newer than this code)."""
    out = out or sys.stdout

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        catalog = _open_catalog(config, reactor, pool_size=1)
        try:
            report = yield catalog.migrate()
        except CatalogError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            yield catalog.close()
        print(report.describe(), file=out)
        return EXIT_OK

    return run_reactor(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``streamer`` command; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _error(f"configuration error: {exc}")
    try:
        if args.command == "sign":
            return sign_command(config, args.path, args.expires)
        if args.command == "verify":
            return verify_command(config)
        if args.command == "migrate":
            return migrate_command(config)
        if args.command == "sync":
            return sync_command(config, args.remotes)
        problem = _fetch_arguments_problem(args.sha256, args.size)
        if problem:
            return _error(problem)
        size = None if args.size is None else int(args.size)
        return fetch_command(config, args.url, args.sha256, size, args.output)
    except ConfigError as exc:
        return _error(f"configuration error: {exc}")
    except (StorageError, CatalogError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted", 130)


def run() -> NoReturn:
    """The ``streamer`` console script: `main`, then `exit_now` with its status.

    Standard output is guarded: a command that cannot write it (``> /dev/full``, a reader
    that went away) ends with one line on stderr and `EXIT_OUTPUT`, not a traceback."""
    if sys.stdout is not None:
        sys.stdout = _GuardedOutput(sys.stdout)
    try:
        status = main()
    except OutputError as exc:  # (also from argparse: --help, usage)
        status = _error(str(exc), EXIT_OUTPUT)
    exit_now(status)


def exit_now(status: int) -> NoReturn:
    """End the process with *status*, skipping only the interpreter's teardown.

    What an orderly exit finishes is finished first: the `atexit` callbacks run (logging's
    flush among them) and the standard streams are flushed (a failed flush makes the status
    120, as Python's own exit does). What is left out is freeing every object one by one:
    some 100,000 from the imports alone, 15-20 ms at the end of every command, for memory
    the kernel takes back at once. While a non-daemon thread is still running, the ordinary
    exit runs instead, so it is waited for as Python would.
    """
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with that descriptor closed
                stream.flush()
        except OutputError as error:  # what the command printed could not be written
            status = _error(str(error), status or EXIT_OUTPUT)
        except (OSError, ValueError):  # a closed pipe or stream
            status = status or EXIT_OUTPUT
    os._exit(status)


if __name__ == "__main__":
    run()
