"""A private PostgreSQL cluster for tests: ``initdb`` + ``postgres`` on a free loopback port.

The cluster lives in a temporary folder (data, socket and log), runs as the ``postgres`` user
when the tests run as root (PostgreSQL refuses to run as root), trusts local connections,
and is removed at `PostgresCluster.destroy`. Each test gets its own database
(`PostgresCluster.new_database`), so tests never see each other's rows. `stop` and `start`
take the server down and up again under a running service (the outage tests).

The binaries come from PATH or from Debian's ``/usr/lib/postgresql/<version>/bin``;
`postgres_available` says why they cannot be used when they cannot.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import defer

from tests.support.clients import run_process

__all__ = [
    "PostgresCluster",
    "catalog_url",
    "find_postgres_bin",
    "postgres_available",
    "postgres_cluster",
    "postgres_url",
]

PROGRAMS = ("initdb", "pg_ctl", "postgres")
FOLDER_PREFIX = "streamer-pg-"
#: The pid of the test process that owns a cluster folder.
OWNER_FILE = "owner.pid"
#: How long `pg_ctl start`/`stop` may take before the test fails.
START_TIMEOUT = 60


def find_postgres_bin() -> str | None:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's newest."""
    found = shutil.which("initdb")
    candidates = [os.path.dirname(os.path.realpath(found))] if found else []
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=_major_version, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in PROGRAMS):
            return folder
    return None


def _major_version(folder: str) -> int:
    name = os.path.basename(os.path.dirname(folder))
    return int(name) if name.isdigit() else 0


def _run_as() -> list[str]:
    """The command prefix that runs a program as the cluster's owner (root cannot own one)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--"]
    return [shutil.which("su") or "su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"']


def _base_folder() -> str:
    """Where cluster folders go: the temp folder, unless (as root) the postgres user could not
    reach into it (a private TMPDIR), then /tmp."""
    base = tempfile.gettempdir()
    if os.geteuid() != 0:
        return base
    path = os.path.realpath(base)
    while True:
        if not os.stat(path).st_mode & 0o001:  # others may not traverse it
            return "/tmp"
        parent = os.path.dirname(path)
        if parent == path:
            return base
        path = parent


def _reap_orphans(bin_folder: str) -> None:
    """Stop and remove the clusters of test processes that died without tearing theirs down
    (killed by a timeout, say), so servers never pile up on a machine."""
    for folder in glob.glob(os.path.join(_base_folder(), FOLDER_PREFIX + "*")):
        try:
            with open(os.path.join(folder, OWNER_FILE)) as f:
                owner = int(f.read())
            os.kill(owner, 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not ours to judge
        stop = [os.path.join(bin_folder, "pg_ctl"), "-D", os.path.join(folder, "data")]
        subprocess.run(
            [*_run_as(), *stop, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(folder, ignore_errors=True)


def postgres_available() -> str | None:
    """None when a private cluster can be started here, else the reason it cannot."""
    if find_postgres_bin() is None:
        return "PostgreSQL is not installed (initdb, pg_ctl, postgres: not on PATH nor in "
        "/usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to own the cluster"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One running private cluster; see the module docstring."""

    def __init__(self) -> None:
        reason = postgres_available()
        if reason:
            raise RuntimeError(reason)
        self.bin = find_postgres_bin()
        _reap_orphans(self.bin)
        self.folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=_base_folder())
        with open(os.path.join(self.folder, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        self.data = os.path.join(self.folder, "data")
        self.log = os.path.join(self.folder, "server.log")
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._prefix = _run_as()
        self._databases = itertools.count(1)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run_sync(
            "initdb",
            "-D",
            self.data,
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        self._run_sync(*self._ctl_start())

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200 -c shared_buffers=32MB"
        )

    def _ctl_start(self) -> tuple[str, ...]:
        return ("pg_ctl", "-D", self.data, "-l", self.log, "-o", self._options(), "-w", "start")

    def _ctl_stop(self) -> tuple[str, ...]:
        return ("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def _argv(self, program: str, *args: str) -> list[str]:
        return [*self._prefix, os.path.join(self.bin, program), *args]

    def _run_sync(self, program: str, *args: str) -> None:
        result = subprocess.run(
            self._argv(program, *args),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            cwd=self.folder,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}): {result.stdout}{result.stderr}"
                f"{self.server_log()}"
            )

    def server_log(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    # -- urls and databases -------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """A TCP url of *database* (what a user writes in ``[catalog] url``)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; return its url."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY file_copy")
        return self.url(name)

    # -- outages ------------------------------------------------------------------------------

    async def _ctl(self, *args: str) -> None:
        argv = self._argv(*args)
        result = await run_process(argv[0], *argv[1:], timeout=START_TIMEOUT, env=dict(os.environ))
        if result.exit_code != 0:
            raise RuntimeError(f"{args[0]} {args[-1]} failed: {result}{self.server_log()}")

    def stop(self) -> defer.Deferred[None]:
        """Stop the server (fast shutdown: sessions are cut), without blocking the reactor."""
        return defer.ensureDeferred(self._ctl(*self._ctl_stop()))

    def start(self) -> defer.Deferred[None]:
        """Start the server again on the same port; fires once it accepts connections."""
        return defer.ensureDeferred(self._ctl(*self._ctl_start()))

    def _pids(self) -> list[int]:
        """The postmaster and every process it started (the server, whole)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            main = int(f.readline())
        pids = [main]
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat.rpartition(")")[2].split()[1]) == main:
                    pids.append(int(name))
        return pids

    def freeze(self) -> None:
        """SIGSTOP the whole server: connections stay open and nothing answers (a hung host)."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT what `freeze` stopped."""
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def ensure_running(self) -> None:
        """Start the server if a test left it stopped or frozen (blocking; for teardown)."""
        try:
            self.thaw()
        except OSError:
            pass
        status = subprocess.run(
            self._argv("pg_ctl", "-D", self.data, "status"), capture_output=True, cwd=self.folder
        )
        if status.returncode != 0:
            self._run_sync(*self._ctl_start())

    def destroy(self) -> None:
        """Stop the server and remove its folder."""
        # immediate: no shutdown checkpoint, the data is thrown away anyway
        stop = self._argv("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        subprocess.run(stop, capture_output=True, cwd=self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)


# -- pytest fixtures (registered by tests/conftest.py) ----------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private cluster for the whole test session; skips when PostgreSQL is absent."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The url of a new, empty database of the session's cluster (running again afterwards
    if the test stopped it)."""
    yield postgres_cluster.new_database()
    postgres_cluster.ensure_running()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ``[catalog] url`` of each kind: runs the test once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog' / 'catalog.sqlite3'}"
    return request.getfixturevalue("postgres_url")
