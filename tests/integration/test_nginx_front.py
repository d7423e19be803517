"""The streamer behind a real nginx, as operators run it: stored content handed to nginx with
``X-Accel-Redirect`` (nginx sends the bytes from the storage folder), lazy content streamed
through ``proxy_pass``, and the internal location unreachable from outside."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from store import CatalogEntry
from streamer.config import load_config
from streamer.service import StreamerService
from tests.support.clients import free_port, run_curl
from tests.support.faults import Serve
from tests.support.nginx import NGINX, access_lines, start_nginx, stop_nginx, write_conf
from tests.support.polling import holds_within

pytestmark = pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed")

STORED = b"stored bytes, sent by nginx\n" * 1000
LAZY = b"lazy bytes, streamed through nginx\n" * 1000


def nginx_conf(work: Path, port: int, streamer_port: int, storage: Path) -> Path:
    return write_conf(
        work,
        f"""
  # The body bytes nginx received from the streamer, and those it sent to the client.
  log_format front '$request_uri $status upstream=$upstream_response_length sent=$body_bytes_sent';
  access_log {work}/logs/access.log front;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{streamer_port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # Says "this request came through a front that acts on X-Accel-Redirect".
      proxy_set_header X-Sendfile-Type X-Accel-Redirect;
      proxy_buffering off;
    }}
    location /protected/ {{
      internal;
      alias {storage}/;
    }}
  }}
""",
        worker_connections=64,
    )


class Front:
    """The streamer (``x_accel_redirect = "/protected/"``) behind a real nginx, both started by
    `start` and stopped by `stop`; `add` catalogs stored or lazy content."""

    def __init__(self, tmp_path: Path, upstream) -> None:
        self.tmp_path = tmp_path
        self.upstream = upstream
        config_file = tmp_path / "streamer.toml"
        config_file.write_text(
            "[server]\n"
            'listen = "tcp:0:interface=127.0.0.1"\n'
            'x_accel_redirect = "/protected/"\n'
            "grace_period = 1\n"
            "[storage]\n"
            'path = "var"\n'
            "[[remotes]]\n"
            'name = "fixtures"\n'
            f'url = "{upstream.url("/PULP_MANIFEST")}"\n'
            "max_retries = 0\n"
        )
        self.service = StreamerService(load_config(config_file, environ={}))
        self.work = tmp_path / "nginx"
        self.work.mkdir()
        self.conf: Path | None = None
        self.entries: list[CatalogEntry] = []
        self.url = ""

    @property
    def storage(self):
        return self.service.storage

    @property
    def direct_url(self) -> str:
        """The streamer itself, as a client that bypasses nginx reaches it."""
        return f"http://127.0.0.1:{self.service.address.port}"

    def access_log(self) -> list[str]:
        return access_lines(self.work)

    async def start(self) -> Front:
        self.service.startService()
        assert await holds_within(lambda: self.service.ready), "the service did not become ready"
        port = free_port()
        self.conf = nginx_conf(self.work, port, self.service.address.port, Path(self.storage.root))
        await start_nginx(self.conf)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.conf is not None:
            await stop_nginx(self.conf)
        await self.service.stopService()

    async def add(self, name: str, data: bytes, *, stored: bool) -> str:
        """Catalog *data* at ``fixtures/<name>``: stored, or lazy from the upstream."""
        url = self.upstream.register(f"/{name}", Serve(data))
        if stored:
            source = self.tmp_path / "incoming"
            source.write_bytes(data)
            self.storage.import_file(str(source))
        sha256 = hashlib.sha256(data).hexdigest()
        self.entries.append(
            CatalogEntry(
                f"fixtures/{name}", "fixtures", url, len(data), {"sha256": sha256}, stored=stored
            )
        )
        await self.service.catalog.replace_remote("fixtures", list(self.entries))
        return sha256


@pytest.fixture
def front(tmp_path, upstream):
    started = Front(tmp_path, upstream)
    yield started
    pytest_twisted.blockon(defer.ensureDeferred(started.stop()))


@pytest_twisted.ensureDeferred
async def test_stored_content_is_sent_by_nginx_and_lazy_content_streams_through(front, upstream):
    await front.start()
    await front.add("stored.bin", STORED, stored=True)
    await front.add("lazy.bin", LAZY, stored=False)
    storage = front.storage

    # Stored: the streamer answers with X-Accel-Redirect only; nginx sends the file.
    result = await run_curl("-sS", "-D", "-", f"{front.url}/fixtures/stored.bin")
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert result.exit_code == 0, result.stderr
    assert body == STORED
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"x-accel-redirect" not in head.lower()  # nginx consumes it
    assert f"/fixtures/stored.bin 200 upstream=0 sent={len(STORED)}" in front.access_log()
    # nginx serves ranges of the stored file itself.
    ranged = await run_curl("-sS", "-r", "100-199", f"{front.url}/fixtures/stored.bin")
    assert ranged.stdout == STORED[100:200]

    # Lazy: streamed from upstream through the streamer and nginx, then stored.
    result = await run_curl("-sS", f"{front.url}/fixtures/lazy.bin")
    assert (result.exit_code, result.stdout) == (0, LAZY), result.stderr
    sha = hashlib.sha256(LAZY).hexdigest()
    assert await holds_within(lambda: storage.has(sha), 10.0)
    result = await run_curl("-sS", f"{front.url}/fixtures/lazy.bin")  # now via X-Accel
    assert result.stdout == LAZY
    assert len(upstream.requests("/lazy.bin")) == 1

    # The internal location is not reachable from outside.
    relative = Path(storage.path_for(sha)).relative_to(storage.root)
    outside = await run_curl(
        "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{front.url}/protected/{relative}"
    )
    assert outside.stdout == b"404"


@pytest_twisted.ensureDeferred
async def test_a_client_bypassing_nginx_gets_the_content_itself(front):
    """In x_accel_redirect mode, only a request that came through the front (nginx sets
    ``X-Sendfile-Type: X-Accel-Redirect``) is answered with the header and no body; a client
    reaching the streamer directly gets the file (it used to get 200 and an empty body)."""
    await front.start()
    await front.add("stored.bin", STORED, stored=True)

    direct = await run_curl("-sS", "-D", "-", f"{front.direct_url}/fixtures/stored.bin")
    head, _, body = direct.stdout.partition(b"\r\n\r\n")
    assert direct.exit_code == 0, direct.stderr
    assert b" 200 " in head.split(b"\r\n")[0]
    assert body == STORED
    assert b"x-accel-redirect" not in head.lower()
    ranged = await run_curl("-sS", "-r", "100-199", f"{front.direct_url}/fixtures/stored.bin")
    assert ranged.stdout == STORED[100:200]
    head_only = await run_curl("-sS", "-I", f"{front.direct_url}/fixtures/stored.bin")
    assert f"content-length: {len(STORED)}".encode() in head_only.stdout.lower()

    # Through nginx, the same file is still sent by nginx (nothing came from the streamer).
    via = await run_curl("-sS", f"{front.url}/fixtures/stored.bin")
    assert via.stdout == STORED
    assert front.access_log() == [f"/fixtures/stored.bin 200 upstream=0 sent={len(STORED)}"]
