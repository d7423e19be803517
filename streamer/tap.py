"""``twistd streamer``: command-line options and the service maker."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from streamer.config import CONFIG_ENV, DEFAULT_LISTEN, ConfigError, load_config

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Options of ``twistd streamer``."""

    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = (
        "Serve repository content over HTTP: stored files from disk, lazy files streamed from "
        f"upstream while they are stored. Without --config, ${CONFIG_ENV} names the "
        "configuration file; without either, embedded defaults are used (storage and SQLite "
        f"catalog in ./var, listening on {DEFAULT_LISTEN}). SIGTERM stops gracefully (exit "
        "status 0); a failed start prints one line and exits non-zero. For JSON logs: "
        "twistd -n --logger streamer.logs.json_observer streamer."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            f"Configuration file (TOML). Default: ${CONFIG_ENV}, else embedded defaults.",
        ],
        [
            "listen",
            "l",
            None,
            "Twisted endpoint description to listen on, overriding [server] listen "
            "(e.g. tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, "
            "unix:/run/s.sock); relative paths in it are relative to the working folder.",
        ],
    ]


def _fail(message: str) -> SystemExit:
    """Print one clear line and return the exit to raise (never a traceback)."""
    print(f"streamer: {message}", file=sys.stderr)
    return SystemExit(2)


def makeService(options: Options) -> IService:
    """Load the configuration and build the service; configuration errors exit with status 2."""
    from streamer import processes

    try:
        config = load_config(options["config"], {"server.listen": options["listen"]})
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    if processes.adopted_socket() is not None:
        processes.die_with_parent()
    elif processes.process_count(config.server.processes) > 1:
        processes.share_metrics()  # before anything imports prometheus_client

    from store.errors import CatalogError, StorageError
    from streamer.service import StreamerService

    try:
        return StreamerService(config, standalone=True)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    except (StorageError, CatalogError) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{exc.filename or ''}: {exc.strerror or exc}") from None
