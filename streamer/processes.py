"""Several server processes on one listening socket: ``[server] processes``.

The first process (the one twistd started) listens, then starts ``processes - 1`` more with
`ProcessGroup`. Each of those is ``twistd -n streamer`` again, with the listening socket as
its descriptor 3 (it adopts it with ``reactor.adoptStreamPort``: the kernel hands each new
connection to whichever process accepts first, so no balancer sits in front) and a pipe as
its descriptor 4, on which it writes its log events as JSON lines (`forwarding_observer`;
`streamer.logs.pack_event`: access lines compactly, a failure with its exception's text).
The first process publishes those events into its own log observers, so every line of the
group's log is written by one process and none is torn. Where twistd's log takes access
lines rendered as its observer would (`streamer.logs.twistd_log`), a helper renders its
own (`LINES_ENV` says text or JSON) and writes them on a second pipe, descriptor 5
(`helper_lines`), every `streamer.logs.ACCESS_DELAY` seconds; the first process writes
whole lines of it with its own (`streamer.logs.RequestLog.relay`): no event, no observer.
A helper that dies is logged and started again; at SIGTERM the first process sends SIGTERM
to every helper (each drains its own requests within ``grace_period``) and waits for them
before it exits. A helper also stops when the first process dies (``PR_SET_PDEATHSIG``), so
none outlives the group.

Every process of a group takes its connections from the shared socket in turn
(`share_accepts`): a new connection wakes one waiting process, not all of them, and a process
takes one connection per wake-up, so a burst of connections is spread over the processes.

The protocol between processes for one download per artifact is in `streamer.claims`.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from streamer.logs import ACCESS_SYSTEM, LineBatch, fd_writer, pack_event, unpack_event

__all__ = [
    "ADOPT_ENV",
    "INDEX_ENV",
    "ProcessGroup",
    "adopted_socket",
    "die_with_parent",
    "forwarding_observer",
    "process_count",
    "share_accepts",
    "metrics_folder",
    "remove_stale_metrics",
    "share_metrics",
]

log = Logger()

#: Set in a helper's environment: the address family of the socket on descriptor 3.
ADOPT_ENV = "STREAMER_ADOPT_FAMILY"
#: Set in a helper's environment: its number in the group (1, 2, ...; the first is 0).
INDEX_ENV = "STREAMER_PROCESS_INDEX"
LISTEN_FD = 3
LOG_FD = 4
#: Seconds before a helper that died is started again: doubled per quick death, capped.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A helper that ran this long before dying is restarted after the first delay again.
STABLE_SECONDS = 60.0
_FAMILIES = {"AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6, "AF_UNIX": socket.AF_UNIX}
_PR_SET_PDEATHSIG = 1
#: Set in a helper's environment when it renders its access lines itself and writes them on
#: descriptor 5 for the first process to write as they are: ``text`` or ``json``.
LINES_ENV = "STREAMER_ACCESS_LINES"
ACCESS_FD = 5


def process_count(configured: int) -> int:
    """The number of server processes for ``[server] processes`` (0: one per CPU)."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


def adopted_socket() -> tuple[int, int] | None:
    """``(descriptor, family)`` when this process is a helper given a listening socket."""
    family = os.environ.get(ADOPT_ENV)
    if family is None:
        return None
    if family not in _FAMILIES:
        raise ValueError(f"{ADOPT_ENV}={family!r}: expected one of {sorted(_FAMILIES)}")
    return LISTEN_FD, _FAMILIES[family]


def process_index() -> int:
    """This process's number in its group: 0 for the first (or only) one."""
    return int(os.environ.get(INDEX_ENV, "0"))


#: The signals that reopen the access log (`StreamerService`): blocked while a helper starts.
REOPEN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGUSR1})


def unblock_reopen_signals() -> None:
    """Deliver the `REOPEN_SIGNALS` a helper received while it started (once its handlers
    are installed): they came blocked from the first process (`ProcessGroup._spawn`)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, REOPEN_SIGNALS)


def share_accepts(port: Any, reactor: Any) -> bool:
    """Make the listening *port* (a ``tcp.Port``, or a ``unix.Port``), which the processes of
    a group share, wake one of them per new connection and hand each wake-up one connection.

    By default every process waiting on the socket wakes for each new connection (epoll
    without ``EPOLLEXCLUSIVE``): all but one find nothing to accept, and the wasted wake-ups
    take CPU from the one that serves. And a process that wakes accepts in a loop (Twisted's
    ``numberAccepts``, up to 100 and growing) every connection waiting, so a burst (a client's
    ten parallel connections) could all go to one process while another idles. Here the port
    is registered with ``EPOLLEXCLUSIVE`` (each connection wakes one waiting process; a busy
    one is passed over), again at every ``startReading`` (after the pause of a helper whose
    catalog is not open yet), and accepts one connection per ``doRead``: the rest wake the
    other processes, or this one again at its next turn. Of the processes waiting, the one
    that registered first is woken: a lone client's requests go to one process while it is
    idle (its caches warm, the artifact it just stored found there), to another while it is
    busy.

    False, leaving the port as it was, where the reactor does not use epoll or the kernel has
    no ``EPOLLEXCLUSIVE`` (Linux before 4.5): each process still accepts in a loop.
    """
    poller = getattr(reactor, "_poller", None)
    exclusive = getattr(select, "EPOLLEXCLUSIVE", None)
    if exclusive is None or not isinstance(poller, select.epoll):
        return False
    start_reading, do_read = port.startReading, port.doRead

    def register_exclusively() -> None:
        fd = port.fileno()
        if fd == -1 or fd not in reactor._reads:
            return
        # EPOLLEXCLUSIVE is only taken when a descriptor is added (EPOLL_CTL_MOD refuses it):
        # replace the reactor's registration; the reactor's own books stay as they are.
        poller.unregister(fd)
        try:
            poller.register(fd, select.EPOLLIN | exclusive)
        except OSError:  # a kernel without it
            poller.register(fd, select.EPOLLIN)

    def startReading() -> None:
        start_reading()
        register_exclusively()

    def doRead() -> Any:
        port.numberAccepts = 1
        return do_read()

    port.startReading = startReading
    port.doRead = doRead
    register_exclusively()
    return True


def share_metrics() -> str | None:
    """In the first process of a group, before prometheus-client is imported: a fresh folder
    for its multiprocess mode, named in ``PROMETHEUS_MULTIPROC_DIR`` (which the helpers
    inherit) and removed when this process exits (or by the next group to start, if this
    process was killed: `metrics_folder`). None if the library is already imported
    (each process then reports its own figures) or the variable is already set."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if "prometheus_client" in sys.modules:
        log.warn("prometheus_client was imported early: /metrics shows one process only")
        return None
    folder = metrics_folder()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, True)
    return folder


#: The metrics folders of groups (`metrics_folder`), in the system's temp folder.
METRICS_PREFIX = "streamer-metrics-"
#: The file in a metrics folder its first process holds an ``flock`` on while it runs.
METRICS_OWNER = "owner.lock"
_metrics_owner: list[int] = []  # the descriptor holding this process's lock, kept open


def metrics_folder(root: str | None = None) -> str:
    """A new metrics folder under *root* (default: the system's temp folder), locked by this
    process for as long as it runs, after removing the folders of groups whose first process
    died without its exit handler (SIGKILL, a crash): their lock is free. A folder is only
    visible under its final name once locked (made under a dotted name, then renamed), so a
    group starting meanwhile never takes a folder being made for a stale one; a folder
    without the lock file (an older version's) is left alone."""
    root = root or tempfile.gettempdir()
    remove_stale_metrics(root)
    making = tempfile.mkdtemp(prefix="." + METRICS_PREFIX, dir=root)
    fd = os.open(os.path.join(making, METRICS_OWNER), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _metrics_owner.append(fd)
    folder = os.path.join(root, os.path.basename(making)[1:])
    os.rename(making, folder)
    return folder


def remove_stale_metrics(root: str) -> int:
    """Remove the metrics folders under *root* whose owner lock nobody holds; return how many."""
    removed = 0
    try:
        names = [name for name in os.listdir(root) if name.startswith(METRICS_PREFIX)]
    except OSError:
        return 0
    for name in names:
        folder = os.path.join(root, name)
        try:
            fd = os.open(
                os.path.join(folder, METRICS_OWNER), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
            )
        except OSError:
            continue  # no lock file (not ours to judge) or not a folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its group is running
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def die_with_parent() -> None:
    """Ask Linux to send this helper SIGTERM when the first process dies (a no-op elsewhere),
    and stop at once if that already happened."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), signal.SIGTERM)


@implementer(ILogObserver)
class _Forwarder:
    """Writes log events as JSON lines to the first process (descriptor 4), the lines of one
    reactor turn in one ``write`` (`streamer.logs.LineBatch`), so a busy helper wakes the
    first process once per turn, not once per line."""

    def __init__(self, fd: int, reactor: Any = None) -> None:
        self._batch = LineBatch(fd_writer(fd, shared=False), reactor)
        self.flush = self._batch.flush

    def __call__(self, event: dict[str, Any]) -> None:
        self._batch.add(pack_event(event) + "\n")


def forwarding_observer() -> ILogObserver:
    """twistd ``--logger`` of a helper process: its events go to the first process."""
    return _Forwarder(LOG_FD)


def helper_lines() -> tuple[Callable[[str], None], bool, str] | None:
    """In a helper whose first process takes rendered access lines (`LINES_ENV`): how to
    send them (descriptor 5), whether as JSON, and the system a text line names (``...
    process N``); else None."""
    kind = os.environ.get(LINES_ENV)
    if kind not in ("text", "json") or adopted_socket() is None:
        return None
    system = f"{ACCESS_SYSTEM} process {process_index()}"
    return fd_writer(ACCESS_FD, shared=False), kind == "json", system


class _Helper(protocol.ProcessProtocol):
    """One helper process: relays its log events and tells the group when it ends."""

    def __init__(self, group: ProcessGroup, index: int) -> None:
        self.group = group
        self.index = index
        self.started_at = group.reactor.seconds()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""
        self._lines = b""

    #: Its pid, kept after it exited (the transport forgets it).
    pid: int | None = None

    def makeConnection(self, transport: Any) -> None:
        self.pid = getattr(transport, "pid", None)
        super().makeConnection(transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == ACCESS_FD:
            data = self._lines + data
            end = data.rfind(b"\n") + 1
            self._lines = data[end:]
            if end and self.group.access_lines is not None:
                self.group.access_lines(data[:end].decode("utf-8", "replace"))
            return
        if childFD != LOG_FD:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._publish(line)

    def _publish(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
            event = unpack_event(text)
        except ValueError:
            event = {"log_format": "{line}", "line": line.decode("utf-8", "replace")}
            event.update(log_level=None, log_namespace="streamer.processes", log_time=None)
        event["process"] = self.index
        namespace = event.get("log_namespace") or "-"
        level = event.get("log_level")
        level_name = getattr(level, "name", "info")
        event["log_system"] = f"{namespace}#{level_name} process {self.index}"
        if event.get("log_time") is None:
            event["log_time"] = self.group.reactor.seconds()
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        if self._lines:
            self.childDataReceived(ACCESS_FD, b"\n")
        if self._partial:
            self._publish(self._partial)
            self._partial = b""
        self.group.ended(self, reason)
        self.ended.callback(None)


class ProcessGroup(Service):
    """Starts, restarts and stops the helper processes that share the listening socket.

    :param helpers: how many helpers (the first process serves too).
    :param fd: the listening socket's descriptor, given to each helper as descriptor 3.
    :param family: ``"AF_INET"``, ``"AF_INET6"`` or ``"AF_UNIX"``.
    :param argv: the helper's command line (``python -m twisted ... streamer ...``).
    :param on_ended: called with the pid of each helper that ended (metrics clean-up).
    :param access_lines: where the helpers' access lines go when they render them
        themselves (as JSON with *access_json*): called with whole lines as they arrive.
        Without it, they are events relayed as any other.
    """

    def __init__(
        self,
        helpers: int,
        fd: int,
        family: str,
        argv: Sequence[str],
        *,
        reactor: Any,
        stop_timeout: float,
        env: dict[str, str] | None = None,
        on_ended: Callable[[int], None] | None = None,
        access_lines: Callable[[str], None] | None = None,
        access_json: bool = False,
    ) -> None:
        self.count = helpers
        self.fd = fd
        self.family = family
        self.argv = list(argv)
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.env = dict(os.environ if env is None else env)
        self.on_ended = on_ended
        self.access_lines = access_lines
        self.env.pop(LINES_ENV, None)
        if access_lines is not None:
            self.env[LINES_ENV] = "json" if access_json else "text"
        self.helpers: dict[int, _Helper] = {}
        self.restarts = 0
        self._deaths: dict[int, int] = {}
        self._pending: dict[int, Any] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count + 1):
            self._spawn(index)
        log.info("{n} helper process(es) share the listening socket", n=self.count)

    def pids(self) -> list[int]:
        """The pids of the helpers running now."""
        return [pid for helper in self.helpers.values() if (pid := helper.pid) is not None]

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self._stopping:
            return
        env = {**self.env, ADOPT_ENV: self.family, INDEX_ENV: str(index)}
        helper = _Helper(self, index)
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, LISTEN_FD: self.fd, LOG_FD: "r"}
        if self.access_lines is not None:
            fds[ACCESS_FD] = "r"
        # The helper starts with the reopen signals blocked (a signal mask outlives exec):
        # one sent while it starts waits until its handlers are in (`unblock_reopen_signals`)
        # instead of ending it by their default action.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, REOPEN_SIGNALS)
        try:
            self.reactor.spawnProcess(
                helper,
                self.argv[0],
                self.argv,
                env=env,
                path=os.getcwd(),
                childFDs=fds,
            )
        except OSError as exc:
            log.error("cannot start helper process {index}: {exc}", index=index, exc=exc)
            self._schedule(index)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        self.helpers[index] = helper

    def ended(self, helper: _Helper, reason: Failure) -> None:
        """A helper exited: forget it and, unless the group is stopping, start another."""
        if self.helpers.get(helper.index) is helper:
            del self.helpers[helper.index]
        pid = helper.pid
        if self.on_ended is not None and pid is not None:
            self.on_ended(pid)
        if self._stopping:
            return
        status = _describe_exit(reason)
        log.error(
            "helper process {index} (pid {pid}) {status}; starting it again",
            index=helper.index,
            pid=pid,
            status=status,
        )
        if self.reactor.seconds() - helper.started_at >= STABLE_SECONDS:
            self._deaths[helper.index] = 0
        self._schedule(helper.index)

    def _schedule(self, index: int) -> None:
        deaths = self._deaths.get(index, 0)
        self._deaths[index] = deaths + 1
        delay = RESTART_DELAYS[min(deaths, len(RESTART_DELAYS) - 1)]
        self.restarts += 1
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """SIGTERM every helper; SIGKILL those still running after *stop_timeout*."""
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        running = list(self.helpers.values())
        for helper in running:
            _signal(helper, "TERM")
        if running:
            timer = self.reactor.callLater(self.stop_timeout, self._kill_all)
            yield defer.DeferredList([helper.ended for helper in running])
            if timer.active():
                timer.cancel()
        super().stopService()

    def signal_helpers(self, signum: int) -> None:
        """Send signal *signum* (``signal.SIGHUP``) to every running helper."""
        for helper in list(self.helpers.values()):
            _signal(helper, signum)

    def _kill_all(self) -> None:
        for helper in list(self.helpers.values()):
            log.warn("helper process {index} did not stop: killing it", index=helper.index)
            _signal(helper, "KILL")


def _signal(helper: _Helper, name: str | int) -> None:
    if helper.transport is None:  # not started yet, or already gone
        return
    try:
        helper.transport.signalProcess(name)
    except (error.ProcessExitedAlready, AttributeError, OSError):
        pass


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"


def helper_argv(config_source: str | None) -> list[str]:
    """The command line of a helper: this interpreter running twistd with the streamer
    plugin, no pid file, and its log events sent to the first process."""
    argv = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "--logger=streamer.processes.forwarding_observer",
        "streamer",
    ]
    if config_source:
        argv += ["--config", os.path.abspath(config_source)]
    return argv
