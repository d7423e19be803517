#!/usr/bin/env python3
"""Peer for the streaming benchmark: a caching proxy built the way Pulp 3's content app is.

    python bench/peers/aiohttp_proxy.py --upstream URL --port N --store DIR [--digests sha256]

A GET for a path already under DIR/store is answered from disk (aiohttp's FileResponse, as
Pulp serves a stored artifact). Otherwise the path is downloaded from the upstream with one
shared client session: each chunk goes to the client, to a temp file under DIR/tmp and to
the digests, and the complete file is renamed into DIR/store (Pulp's on-demand content
saved as an artifact). Pulp computes sha224, sha256, sha384 and sha512 by default: pass
``--digests`` to compare like with like. Needs aiohttp (``pip install aiohttp``); it is a
benchmark peer, not a dependency of the project.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

CHUNK = 1 << 20
FORWARDED = ("Content-Type", "Content-Length", "Last-Modified", "ETag")


class ContentApp:
    """One upstream, one store folder, one client session for every download."""

    def __init__(self, upstream: str, store: Path, digests: list[str], connections: int):
        self.upstream = upstream.rstrip("/")
        self.stored = store / "store"
        self.temp = store / "tmp"
        self.digests = digests
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None

    async def open(self, _app: web.Application) -> None:
        self.temp.mkdir(parents=True, exist_ok=True)
        connector = aiohttp.TCPConnector(limit=self.connections)
        self.session = aiohttp.ClientSession(connector=connector)

    async def close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        if any(part in ("", ".", "..") for part in relative.split("/")):
            raise web.HTTPNotFound()
        local = self.stored / relative
        if local.is_file():
            return web.FileResponse(local)
        return await self.stream(request, relative, local)

    async def stream(self, request: web.Request, relative: str, local: Path) -> web.StreamResponse:
        """Send the upstream's bytes as they arrive while hashing and spooling them."""
        assert self.session is not None
        async with self.session.get(f"{self.upstream}/{relative}") as upstream:
            if upstream.status != 200:
                raise web.HTTPBadGateway()
            response = web.StreamResponse()
            for name in FORWARDED:
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            hashers = [hashlib.new(name) for name in self.digests]
            handle, spooled = tempfile.mkstemp(dir=self.temp)
            try:
                with os.fdopen(handle, "wb") as spool:
                    async for chunk in upstream.content.iter_chunked(CHUNK):
                        for hasher in hashers:
                            hasher.update(chunk)
                        spool.write(chunk)
                        await response.write(chunk)
                local.parent.mkdir(parents=True, exist_ok=True)
                os.replace(spooled, local)
            except BaseException:
                Path(spooled).unlink(missing_ok=True)
                raise
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--digests", default="sha256", help="hashlib names, comma-separated")
    parser.add_argument("--concurrency", type=int, default=10, help="upstream connections")
    args = parser.parse_args()
    content = ContentApp(args.upstream, args.store, args.digests.split(","), args.concurrency)
    app = web.Application()
    app.on_startup.append(content.open)
    app.on_cleanup.append(content.close)
    app.router.add_get("/{path:.*}", content.handle)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
