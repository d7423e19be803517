"""Helpers for the service tests: a tiny real content resource and a running service."""

from __future__ import annotations

from pathlib import Path

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from streamer.config import Config, load_config


class EchoContent(Resource):
    """Stands in for the content resource: answers ``/<path>`` from memory.

    ``/slow`` writes a first chunk and waits in ``pending`` until the test finishes it;
    every other path is a "hit" whose body names the path. ``seen`` records each request's
    uri and args as the content resource saw them.
    """

    isLeaf = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.pending: list[Request] = []
        self.seen: list[tuple[bytes, dict[bytes, list[bytes]]]] = []
        self.closed = False

    def render_GET(self, request: Request) -> bytes | int:
        self.seen.append((request.uri, dict(request.args)))
        name = b"/".join(request.postpath)
        if name.endswith(b"slow"):
            request.cache_status = "miss"
            request.write(b"first-chunk;")
            self.pending.append(request)
            return NOT_DONE_YET
        request.cache_status = "hit"
        return b"content of /" + name

    def close(self) -> None:
        self.closed = True


def service_config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "streamer.toml"
    path.write_text(
        '[server]\nlisten = "tcp:0:interface=127.0.0.1"\ngrace_period = 5\n'
        '[storage]\npath = "var"\n' + extra
    )
    return load_config(path, environ={})
