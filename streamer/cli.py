"""The ``streamer`` console script: sync, fetch, verify, sign.

``streamer [--config FILE] COMMAND ...``; ``$STREAMER_CONFIG`` names the file when --config
is absent. Configuration errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from store.errors import CatalogError, StorageError
from streamer.config import CONFIG_ENV, Config, ConfigError, load_config

__all__ = ["main"]

DEFAULT_SIGNATURE_LIFETIME = 3600


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer", description="Sync, fetch, verify and sign repository content."
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

    fetch = commands.add_parser("fetch", help="download one URL, validating size and digest")
    fetch.add_argument("url", metavar="URL")
    fetch.add_argument("--sha256", metavar="HEX", help="expected sha256 digest")
    fetch.add_argument("--size", metavar="N", type=int, help="expected size in bytes")
    fetch.add_argument("-o", "--output", metavar="FILE", help="where to write the file")

    commands.add_parser("verify", help="re-hash every stored artifact; set aside bad ones")

    sign = commands.add_parser("sign", help="print a signed URL path")
    sign.add_argument("path", metavar="PATH", help="the path to sign, e.g. /fixtures/a.rpm")
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
    """Print *path* signed with the configured key, valid for *lifetime* seconds."""
    from streamer.signing import sign_path

    key = config.security.signing_key()
    if key is None:
        return _error("security.signing_key_file is not set: URL signing is off")
    if lifetime <= 0:
        return _error(f"--expires: must be > 0 seconds, not {lifetime}")
    now = time.time() if now is None else now
    print(sign_path(key, path, int(now) + lifetime))
    return 0


def verify_command(config: Config) -> int:
    """Re-hash the store, move bad artifacts aside, unmark them in the catalog; 1 if any bad."""
    from store.storage import ArtifactStorage

    storage = ArtifactStorage(config.storage.path)
    report = storage.verify(
        on_bad=lambda bad: print(
            f"BAD {bad.sha256}: content hashes to {bad.actual_sha256}; "
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

    from store.catalog import open_catalog

    async def unmark(reactor: object) -> None:
        catalog = open_catalog(config.catalog.url, config.storage.path, reactor=reactor)
        await catalog.open()
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
        if args.command == "sync":
            command = _importer_command("sync_command")
            if command is None:
                return _error("the sync command is not available (importer.commands is missing)")
            return command(config, args.remotes)
        command = _importer_command("fetch_command")
        if command is None:
            return _error("the fetch command is not available (importer.commands is missing)")
        return command(config, args.url, args.sha256, args.size, args.output)
    except ConfigError as exc:
        return _error(f"configuration error: {exc}")
    except (StorageError, CatalogError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
