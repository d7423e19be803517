"""A real forward proxy for tests: Debian's squid on free loopback ports, in the foreground.

One squid serves two ports: ``open_url`` lets anyone through, ``auth_url`` requires Basic proxy
credentials (``username``/``password``, checked by squid's basic_ncsa_auth against an htpasswd
file written here). Both forward plain ``http://`` requests and ``CONNECT`` tunnels to any port.
Everything squid writes (config, logs, pid) lives in a private temporary folder, removed at
``stop()``. ``access_log()`` returns squid's access log lines, so tests can see what went
through the proxy. Squid resolves `PROXY_NAME` to 127.0.0.1 (its own hosts file).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure

from tests.support.clients import run_process

__all__ = ["PROXY_NAME", "SQUID", "Squid", "squid_available"]

SQUID = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
START_TIMEOUT = 15.0
#: A name that only squid resolves (to 127.0.0.1): a remote named by it is, to the
#: downloaders, on a public host.
PROXY_NAME = "repo.test"


def squid_available() -> str | None:
    """None when squid can run here, else the reason it cannot."""
    if not os.access(SQUID, os.X_OK):
        return f"squid is not installed ({SQUID} missing)"
    if not os.access(NCSA_AUTH, os.X_OK):
        return f"squid's basic_ncsa_auth helper is missing ({NCSA_AUTH})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SquidProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class Squid:
    """A running squid (see the module docstring). ``start()``/``stop()`` return Deferreds."""

    username = "proxyuser"
    password = "proxy-secret"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="squid-test-"))
        self.open_port = _free_port()
        self.auth_port = _free_port()
        self._process: _SquidProcess | None = None
        self._transport = None

    @property
    def open_url(self) -> str:
        return f"http://127.0.0.1:{self.open_port}"

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.auth_port}"

    def access_log(self) -> list[str]:
        path = self.folder / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def _config(self) -> str:
        f = self.folder
        return f"""
http_port 127.0.0.1:{self.open_port} name=open
http_port 127.0.0.1:{self.auth_port} name=auth
pid_filename none
cache deny all
access_log stdio:{f}/access.log
cache_log {f}/cache.log
cache_store_log none
coredump_dir {f}
logfile_rotate 0
netdb_filename none
pinger_enable off
shutdown_lifetime 0 seconds
# Upstream connections end with each request, so tests see no connection left open.
server_persistent_connections off
dns_nameservers 127.0.0.1
# A public-looking name for loopback servers, resolved by squid alone.
hosts_file {f}/hosts
auth_param basic program {NCSA_AUTH} {f}/htpasswd
auth_param basic children 2 startup=1 idle=1
acl open_port myportname open
acl auth_port myportname auth
acl authenticated proxy_auth REQUIRED
http_access allow open_port
http_access allow auth_port authenticated
http_access deny all
"""

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        """Write the config and htpasswd, start squid, fire once both ports accept."""
        from twisted.internet import reactor

        hashed = yield run_process("openssl", "passwd", "-apr1", self.password, timeout=10)
        if hashed.exit_code != 0:
            raise RuntimeError(f"openssl passwd failed: {hashed.stderr!r}")
        (self.folder / "htpasswd").write_text(f"{self.username}:{hashed.stdout.decode().strip()}\n")
        (self.folder / "squid.conf").write_text(self._config())
        (self.folder / "hosts").write_text(f"127.0.0.1 {PROXY_NAME}\n")
        # Squid drops root privileges to its own user, which must write the logs here.
        self.folder.chmod(0o777)
        (self.folder / "htpasswd").chmod(0o644)
        self._process = _SquidProcess()
        self._transport = reactor.spawnProcess(
            self._process,
            SQUID,
            [SQUID, "-N", "-d", "1", "-f", str(self.folder / "squid.conf")],
            env={"PATH": "/usr/sbin:/usr/bin:/bin"},
        )
        for port in (self.open_port, self.auth_port):
            yield self._wait_listening(port)
        return self

    @defer.inlineCallbacks
    def _wait_listening(self, port: int):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        waited = 0.0
        while True:
            if self._process is None or self._process.ended.called:
                output = b"".join(self._process.output if self._process else [])
                raise RuntimeError(f"squid exited during start-up: {output[-2000:]!r}")
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
            try:
                connected = yield endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            except Exception:
                if waited > START_TIMEOUT:
                    raise RuntimeError(f"squid did not listen on {port} within {START_TIMEOUT}s")
                yield task.deferLater(reactor, 0.05, lambda: None)
                waited += 0.05
                continue
            connected.transport.loseConnection()
            return

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """Terminate squid (kill if it lingers) and remove its folder."""
        from twisted.internet import reactor

        process, self._process = self._process, None
        if process is not None and not process.ended.called:
            self._transport.signalProcess("TERM")
            timer = reactor.callLater(5, self._kill, process)
            yield process.ended
            if timer.active():
                timer.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kill(self, process: _SquidProcess) -> None:
        if not process.ended.called:
            self._transport.signalProcess("KILL")
