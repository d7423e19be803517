"""Real clients for tests, run without blocking the reactor: curl, wget, aria2c as child
processes, and a raw TCP client that sends arbitrary bytes (hostile-client tests)."""

from __future__ import annotations

import os
import shutil
import socket
from typing import NamedTuple

import attrs
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

__all__ = [
    "ProcessResult",
    "RawResult",
    "exit_code",
    "free_port",
    "raw_http",
    "run_aria2c",
    "run_curl",
    "run_process",
    "run_wget",
]

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


class ProcessResult(NamedTuple):
    """What a finished child process left: unpacks as ``(exit_code, stdout, stderr)``.
    ``exit_code`` is negative (``-signal``) when the process was killed."""

    exit_code: int
    stdout: bytes
    stderr: bytes


def _clean_env() -> dict[str, str]:
    """The environment without proxy settings, so clients talk to 127.0.0.1 directly."""
    return {
        name: value for name, value in os.environ.items() if name.lower() not in PROXY_VARIABLES
    }


class _Collector(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred[ProcessResult]) -> None:
        self._done = done
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self.timer: IDelayedCall | None = None

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def kill(self) -> None:
        self._err.append(b"\n[run_process: killed after the timeout]\n")
        self.transport.signalProcess("KILL")

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        code = exit_code(reason)
        self._done.callback(ProcessResult(code, b"".join(self._out), b"".join(self._err)))


def exit_code(reason: Failure) -> int:
    """A process's exit status from its ``processEnded`` reason: minus the signal's number
    when a signal ended it, -1 for anything else unexpected."""
    value = reason.value
    if isinstance(value, ProcessTerminated):
        return value.exitCode if value.exitCode is not None else -(value.signal or 0)
    return 0 if isinstance(value, ProcessDone) else -1


def run_process(
    executable: str,
    *args: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> defer.Deferred[ProcessResult]:
    """Run ``executable`` (looked up on PATH) with ``args`` (in folder *cwd*, if given); fires
    with its ProcessResult.

    The child is killed after ``timeout`` seconds (exit code -9) so a hung client never hangs
    the test run. Proxy environment variables are removed.
    """
    from twisted.internet import reactor

    path = shutil.which(executable)
    if path is None:
        return defer.fail(FileNotFoundError(f"{executable} is not installed"))
    done: defer.Deferred[ProcessResult] = defer.Deferred()
    collector = _Collector(done)
    reactor.spawnProcess(collector, path, [path, *args], env=env or _clean_env(), path=cwd)
    collector.timer = reactor.callLater(timeout, collector.kill)
    return done


def run_curl(*args: str, timeout: float = 30.0) -> defer.Deferred[ProcessResult]:
    """``curl -sS --noproxy '*' ARGS``: fires with (exit_code, stdout, stderr)."""
    return run_process("curl", "-sS", "--noproxy", "*", *args, timeout=timeout)


def run_wget(*args: str, timeout: float = 30.0) -> defer.Deferred[ProcessResult]:
    """``wget --no-proxy --tries=1 ARGS``: fires with (exit_code, stdout, stderr)."""
    return run_process("wget", "--no-proxy", "--tries=1", *args, timeout=timeout)


def run_aria2c(*args: str, timeout: float = 30.0) -> defer.Deferred[ProcessResult]:
    """``aria2c --no-conf --max-tries=1 ARGS``: fires with (exit_code, stdout, stderr)."""
    return run_process(
        "aria2c", "--no-conf", "--max-tries=1", "--all-proxy=", *args, timeout=timeout
    )


@attrs.frozen
class RawResult:
    """What a raw TCP client saw: all bytes received, and how the connection ended.

    ``clean`` is True for an orderly close (FIN) by the server, False for a reset or other
    error; ``timed_out`` is True when the client gave up and closed first.
    """

    data: bytes
    clean: bool
    timed_out: bool
    reason: str


class _RawClient(protocol.Protocol):
    def __init__(
        self, request: bytes, done: defer.Deferred[RawResult], timeout: float, drip: float = 0.0
    ) -> None:
        self._request = request
        self._done = done
        self._timeout = timeout
        self._drip = drip
        self._chunks: list[bytes] = []
        self._timed_out = False
        self._timer: IDelayedCall | None = None
        self._drip_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        from twisted.internet import reactor

        self._timer = reactor.callLater(self._timeout, self._give_up)
        if self._drip > 0:
            self._send_one_byte()
        elif self._request:
            self.transport.write(self._request)

    def _send_one_byte(self) -> None:
        from twisted.internet import reactor

        self._drip_call = None
        if self._request:
            byte, self._request = self._request[:1], self._request[1:]
            self.transport.write(byte)
            self._drip_call = reactor.callLater(self._drip, self._send_one_byte)

    def _give_up(self) -> None:
        self._timed_out = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        for call in (self._timer, self._drip_call):
            if call is not None and call.active():
                call.cancel()
        clean = reason.check(ConnectionDone) is not None and not self._timed_out
        self._done.callback(
            RawResult(
                b"".join(self._chunks),
                clean=clean,
                timed_out=self._timed_out,
                reason=type(reason.value).__name__,
            )
        )


def raw_http(
    host: str,
    port: int,
    request: bytes,
    timeout: float = 10.0,
    drip: float = 0.0,
    tls: bool = False,
) -> defer.Deferred[RawResult]:
    """Connect over TCP, send ``request`` verbatim (malformed or pipelined requests welcome),
    and collect everything until the server closes or ``timeout`` passes. With *drip*
    (seconds), the request is sent one byte at a time, one every *drip* seconds (slowloris).
    With *tls*, over TLS without checking the server's certificate."""
    from twisted.internet import reactor

    done: defer.Deferred[RawResult] = defer.Deferred()
    factory = protocol.ClientFactory()
    factory.noisy = False
    factory.protocol = lambda: _RawClient(request, done, timeout, drip)

    def failed(_connector: object, reason: Failure) -> None:
        done.errback(reason)

    factory.clientConnectionFailed = failed
    if tls:
        from twisted.internet.ssl import CertificateOptions

        reactor.connectSSL(host, port, factory, CertificateOptions(verify=False), timeout=timeout)
    else:
        reactor.connectTCP(host, port, factory, timeout=timeout)
    return done


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for processes that need a fixed
    port; in-process servers should listen on port 0 instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
