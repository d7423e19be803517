"""The streamer behind a real nginx, as operators run it: stored content handed to nginx with
``X-Accel-Redirect`` (nginx sends the bytes from the storage folder), lazy content streamed
through ``proxy_pass``, and the internal location unreachable from outside."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import pytest_twisted

from store import CatalogEntry
from streamer.config import load_config
from streamer.service import StreamerService
from tests.faults.service_env import settle
from tests.support.clients import free_port, run_curl, run_process
from tests.support.faults import Serve

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed")

STORED = b"stored bytes, sent by nginx\n" * 1000
LAZY = b"lazy bytes, streamed through nginx\n" * 1000


def nginx_conf(work: Path, port: int, streamer_port: int, storage: Path) -> Path:
    conf = work / "nginx.conf"
    for name in ("tmp", "logs"):
        (work / name).mkdir(exist_ok=True)
    conf.write_text(
        f"""
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/logs/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {work}/logs/access.log;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{streamer_port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
    location /protected/ {{
      internal;
      alias {storage}/;
    }}
  }}
}}
"""
    )
    return conf


@pytest_twisted.ensureDeferred
async def test_stored_content_is_sent_by_nginx_and_lazy_content_streams_through(tmp_path, upstream):
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
    service = StreamerService(load_config(config_file, environ={}))
    service.startService()
    work = tmp_path / "nginx"
    work.mkdir()
    conf = None
    try:
        assert await settle(lambda: service.ready), "the service did not become ready"
        storage = service.storage
        source = tmp_path / "incoming"
        source.write_bytes(STORED)
        storage.import_file(str(source))
        lazy_url = upstream.register("/lazy.bin", Serve(LAZY))
        await service.catalog.replace_remote(
            "fixtures",
            [
                CatalogEntry(
                    "fixtures/stored.bin",
                    "fixtures",
                    upstream.url("/never"),
                    len(STORED),
                    {"sha256": hashlib.sha256(STORED).hexdigest()},
                    stored=True,
                ),
                CatalogEntry(
                    "fixtures/lazy.bin",
                    "fixtures",
                    lazy_url,
                    len(LAZY),
                    {"sha256": hashlib.sha256(LAZY).hexdigest()},
                ),
            ],
        )
        port = free_port()
        conf = nginx_conf(work, port, service.address.port, Path(storage.root))
        started = await run_process(NGINX, "-c", str(conf))
        assert started.exit_code == 0, started.stderr
        front = f"http://127.0.0.1:{port}"

        # Stored: the streamer answers with X-Accel-Redirect only; nginx sends the file.
        result = await run_curl("-sS", "-D", "-", f"{front}/fixtures/stored.bin")
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        assert result.exit_code == 0, result.stderr
        assert body == STORED
        assert b" 200 " in head.split(b"\r\n")[0]
        assert b"x-accel-redirect" not in head.lower()  # nginx consumes it
        served = [line for line in (work / "logs" / "access.log").read_text().splitlines()]
        assert any("/fixtures/stored.bin" in line for line in served)
        # nginx serves ranges of the stored file itself.
        ranged = await run_curl("-sS", "-r", "100-199", f"{front}/fixtures/stored.bin")
        assert ranged.stdout == STORED[100:200]

        # Lazy: streamed from upstream through the streamer and nginx, then stored.
        result = await run_curl("-sS", f"{front}/fixtures/lazy.bin")
        assert (result.exit_code, result.stdout) == (0, LAZY), result.stderr
        sha = hashlib.sha256(LAZY).hexdigest()
        assert await settle(lambda: storage.has(sha), 10.0)
        result = await run_curl("-sS", f"{front}/fixtures/lazy.bin")  # now via X-Accel
        assert result.stdout == LAZY
        assert len(upstream.requests("/lazy.bin")) == 1

        # The internal location is not reachable from outside.
        relative = Path(storage.path_for(sha)).relative_to(storage.root)
        outside = await run_curl(
            "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{front}/protected/{relative}"
        )
        assert outside.stdout == b"404"
    finally:
        if conf is not None:
            await run_process(NGINX, "-c", str(conf), "-s", "stop")
        await service.stopService()
