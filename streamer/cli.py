"""The ``streamer`` console script: sync, fetch, verify, sign, migrate.

``streamer [--config FILE] COMMAND ...``; ``$STREAMER_CONFIG`` names the file when --config
is absent. Exit statuses: see `EXIT_STATUSES`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from store.errors import CatalogError, StorageError
from streamer.config import CONFIG_ENV, Config, ConfigError, load_config

__all__ = ["main"]

DEFAULT_SIGNATURE_LIFETIME = 3600
EXIT_STATUSES = """exit status:
  0    done (verify: every artifact is good)
  1    the work failed (verify: bad artifacts found and moved aside; sync or fetch: failures;
       migrate: the database could not be reached, or its schema is newer than this code)
  2    usage or configuration error (one line on stderr names the key at fault)
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
    print(f"streamer: {message}", file=sys.stderr)
    return status


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
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    from store.catalog import open_catalog, open_for_storage
    from store.storage import ArtifactStorage

    async def unmark(reactor: object) -> None:
        catalog = open_catalog(
            config.catalog.url,
            config.storage.path,
            reactor=reactor,
            pool_size=config.catalog.pool_size,
        )
        await open_for_storage(catalog, ArtifactStorage(config.storage.path))
        try:
            for sha256 in digests:
                await catalog.mark_stored(sha256, False)
        finally:
            await catalog.close()

    try:
        react(lambda reactor: ensureDeferred(unmark(reactor)))
    except SystemExit as exc:
        if exc.code:
            print("streamer: could not update the catalog's stored flags", file=sys.stderr)


def _fetch_arguments_problem(sha256: str | None, size: str | None) -> str:
    """What is wrong with ``fetch``'s --sha256 and --size, in one line ("" if nothing)."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        return f"--sha256: must be 64 hexadecimal digits, not {sha256!r}"
    if size is not None and not re.fullmatch(r"[0-9]+", size):
        return f"--size: must be a non-negative integer, not {size!r}"
    return ""


def _importer_command(name: str):  # type: ignore[no-untyped-def]
    try:
        from importer import commands
    except ModuleNotFoundError as exc:
        if exc.name not in ("importer.commands", "importer"):
            raise
        return None
    return getattr(commands, name, None)


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
            command = _importer_command("migrate_command")
            if command is None:
                return _error("the migrate command is not available (importer.commands is missing)")
            return command(config)
        if args.command == "sync":
            command = _importer_command("sync_command")
            if command is None:
                return _error("the sync command is not available (importer.commands is missing)")
            return command(config, args.remotes)
        command = _importer_command("fetch_command")
        if command is None:
            return _error("the fetch command is not available (importer.commands is missing)")
        problem = _fetch_arguments_problem(args.sha256, args.size)
        if problem:
            return _error(problem)
        size = None if args.size is None else int(args.size)
        return command(config, args.url, args.sha256, size, args.output)
    except ConfigError as exc:
        return _error(f"configuration error: {exc}")
    except (StorageError, CatalogError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
