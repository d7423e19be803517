#!/usr/bin/env python3
"""Peer for the sync benchmark: a PULP_MANIFEST sync built the way Pulp 3's downloaders are.

    python bench/peers/aiohttp_sync.py MANIFEST_URL DEST [--concurrency 10] [--digests sha256]

One aiohttp session with at most --concurrency connections; each listed file is streamed
into a temp file under DEST/tmp while its digests are computed (Pulp's ``handle_data``),
checked against the listing's size and sha256 (Pulp's ``finalize``), then renamed to
DEST/<relative path>. Prints ``N downloaded, M failed`` and exits 1 when any failed.
``sync()`` is importable, so a benchmark can time the sync without the start-up. Needs
aiohttp; a benchmark peer, not a dependency of the project.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

import aiohttp

CHUNK = 1 << 20


class Mismatch(Exception):
    """A downloaded file whose size or sha256 differs from its listing."""


async def download(
    session: aiohttp.ClientSession,
    url: str,
    target: Path,
    temp: Path,
    sha256: str,
    size: int,
    digests: list[str],
) -> None:
    """Fetch one file, validate it, and rename it into place (or leave nothing)."""
    hashers = {name: hashlib.new(name) for name in digests}
    handle, spooled = tempfile.mkstemp(dir=temp)
    received = 0
    try:
        with os.fdopen(handle, "wb") as spool:
            async with session.get(url) as response:
                response.raise_for_status()
                async for chunk in response.content.iter_chunked(CHUNK):
                    for hasher in hashers.values():
                        hasher.update(chunk)
                    spool.write(chunk)
                    received += len(chunk)
        if received != size or hashers["sha256"].hexdigest() != sha256:
            raise Mismatch(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spooled, target)
    except BaseException:
        Path(spooled).unlink(missing_ok=True)
        raise


async def sync(manifest_url: str, dest: str, concurrency: int, digests: list[str]) -> int:
    """Sync every file the listing names into *dest*; return how many failed."""
    root = Path(dest)
    temp = root / "tmp"
    temp.mkdir(parents=True, exist_ok=True)
    base = manifest_url.rsplit("/", 1)[0]
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(manifest_url) as response:
            response.raise_for_status()
            listing = await response.text()

        async def one(line: str) -> None:
            relative, sha256, size = line.split(",")
            async with limit:
                await download(
                    session, f"{base}/{relative}", root / relative, temp, sha256, int(size), digests
                )

        lines = [line for line in listing.splitlines() if line.strip()]
        outcomes = await asyncio.gather(*(one(line) for line in lines), return_exceptions=True)
    failed = sum(isinstance(outcome, BaseException) for outcome in outcomes)
    print(f"{len(outcomes) - failed} downloaded, {failed} failed")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest_url")
    parser.add_argument("dest")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--digests", default="sha256", help="hashlib names, comma-separated")
    args = parser.parse_args()
    digests = sorted({*args.digests.split(","), "sha256"})
    failed = asyncio.run(sync(args.manifest_url, args.dest, args.concurrency, digests))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
