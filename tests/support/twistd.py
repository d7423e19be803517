"""The streamer as a real ``twistd -n streamer`` child process, for tests that drive it from
outside (signals, exit codes, logs, the console commands beside it).

The in-process service is `tests.support.service.ServiceEnv` (``make_service``); this is the
other way to start it, and the only one for what needs a process of its own. `start_twistd`
spawns it on a free port and returns at once (a test of a failing start waits on ``ended``);
`twistd` is the context manager for the usual case: healthy before the body runs, stopped with
SIGTERM after it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.support.clients import PROXY_VARIABLES, free_port, run_curl
from tests.support.polling import until

__all__ = ["STREAMER", "TWISTD", "Collect", "Twistd", "child_env", "start_twistd", "twistd"]

#: ``twistd`` of this interpreter (the console script may belong to another one).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
#: The ``streamer`` console command of this interpreter.
STREAMER = [sys.executable, "-m", "streamer.cli"]


def child_env(**extra: str) -> dict[str, str]:
    """This environment without STREAMER_CONFIG and proxy settings, plus *extra*."""
    kept = {
        name: value
        for name, value in os.environ.items()
        if name != "STREAMER_CONFIG" and name.lower() not in PROXY_VARIABLES
    }
    return kept | extra


class Collect(ProcessProtocol):
    """A child's output (both streams together in ``output``, standard output alone in
    ``stdout``); ``ended`` fires with its exit code."""

    def __init__(self) -> None:
        self.output = b""
        self.stdout = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@attrs.define
class Twistd:
    """A running ``twistd -n streamer`` child; ``base`` is its http://127.0.0.1:PORT."""

    process: object
    proto: Collect
    base: str

    @property
    def output(self) -> str:
        return self.proto.output.decode(errors="replace")

    async def healthy(self, timeout: float = 15.0) -> None:
        """Return once /healthz answers 200 ``ok``; fail with the child's output if it never
        does or exits first."""

        async def answered() -> object:
            if self.proto.ended.called:
                return "exited"
            response = await treq.get(self.base + "/healthz", persistent=False)
            body = await treq.content(response)
            return response.code == 200 and body == b"ok\n"

        state = await until(
            answered,
            timeout,
            what="twistd healthy",
            output=lambda: self.proto.output,
            errors=(Exception,),  # not listening yet
        )
        if state == "exited":
            raise AssertionError(f"twistd exited before it was healthy: {self.output[-3000:]}")

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (unless it ended), then the exit code; SIGKILL after *timeout*."""
        if not self.proto.ended.called:
            self.process.signalProcess("TERM")
        return await self.exited(timeout)

    async def exited(self, timeout: float = 20.0) -> int | None:
        """The exit code once the child ends by itself (SIGKILL after *timeout*)."""
        timer = reactor.callLater(timeout, self._kill)
        code = await self.proto.ended
        if timer.active():
            timer.cancel()
        return code

    def _kill(self) -> None:
        if not self.proto.ended.called:
            self.proto.output += b"\n[test: killed after the timeout]\n"
            self.process.signalProcess("KILL")

    async def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics by name."""
        response = await treq.get(self.base + "/metrics", persistent=False)
        text = (await treq.content(response)).decode()
        assert response.code == 200
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }

    async def metrics_when(
        self, ready: Callable[[dict[str, float]], object], timeout: float = 5.0
    ) -> dict[str, float]:
        """`metrics` once *ready* holds for them: each process writes its figures for all to
        read at most `streamer.metrics.FLUSH_INTERVAL` seconds after a request."""

        async def check() -> dict[str, float] | None:
            found = await self.metrics()
            return found if ready(found) else None

        return await until(check, timeout, what="metrics")

    def curl(self, path: str, *args: str) -> Deferred[tuple[int, bytes, bytes]]:
        """``curl -sS ARGS BASE+PATH``, started now: fires with (exit code, stdout, stderr)."""
        return run_curl(*args, self.base + path, timeout=15).addCallback(tuple)


def start_twistd(
    cwd: Path,
    args: Sequence[str] = (),
    *,
    before: Sequence[str] = (),
    prefix: Sequence[str] = (),
    port: int | None = None,
    **extra: str,
) -> Twistd:
    """Start ``PREFIX twistd -n --pidfile= BEFORE streamer ARGS --listen <free port>`` in
    *cwd*, with *extra* in its environment (*prefix*: a wrapper command such as ``prlimit
    --nofile=N``, its full path first; *port*: that port instead, one the configuration
    names). Returns at once."""
    port = port or free_port()
    argv = [*prefix, *TWISTD, "-n", "--pidfile=", *before, "streamer", *args]
    argv += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    proto = Collect()
    process = reactor.spawnProcess(proto, argv[0], argv, env=child_env(**extra), path=str(cwd))
    return Twistd(process, proto, f"http://127.0.0.1:{port}")


@asynccontextmanager
async def twistd(config: Path, port: int | None = None) -> AsyncIterator[Twistd]:
    """``twistd -n --pidfile= streamer --config CONFIG --listen tcp:PORT:interface=127.0.0.1``
    in CONFIG's folder (on *port*, or a free one), healthy before the body runs, stopped
    (SIGTERM) after it."""
    served = start_twistd(config.parent, ["--config", str(config)], port=port)
    try:
        await served.healthy()
        yield served
    finally:
        await served.stop()
