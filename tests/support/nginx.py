"""A real nginx for tests: its binary, a main configuration whose files stay in a test's
folder, and start/stop through ``nginx -c`` (run as ``tests.support.clients.run_process``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.clients import ProcessResult, run_process

__all__ = ["NGINX", "access_lines", "start_nginx", "stop_nginx", "write_conf"]

#: Debian's nginx, or None where it is not installed (tests then skip).
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def write_conf(work: Path, http: str, worker_connections: int = 256) -> Path:
    """``work/nginx.conf`` with *http* as the inside of its ``http`` block. The pid file, the
    logs (``work/logs/``) and nginx's temp files (``work/tmp/``) stay under *work*; it runs
    as root, as the workers must read a test's private (0700) folders."""
    for name in ("tmp", "logs"):
        (work / name).mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/logs/error.log;
events {{ worker_connections {worker_connections}; }}
http {{
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
{http}
}}
"""
    )
    return conf


def access_lines(work: Path) -> list[str]:
    """The lines of ``work/logs/access.log`` so far."""
    log = work / "logs" / "access.log"
    return log.read_text().splitlines() if log.exists() else []


async def start_nginx(conf: Path) -> None:
    """Start nginx with *conf*; fail the test with nginx's own words if it does not start."""
    assert NGINX is not None
    started: ProcessResult = await run_process(NGINX, "-c", str(conf))
    assert started.exit_code == 0, started.stderr


async def stop_nginx(conf: Path) -> None:
    """Stop the nginx started with *conf* (fast shutdown)."""
    assert NGINX is not None
    await run_process(NGINX, "-c", str(conf), "-s", "stop")
