"""The real entry points in subprocesses: twistd plugin, graceful SIGTERM, CLI, config errors.

Processes are run with getProcessOutputAndValue / spawnProcess, never blocking the reactor.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from streamer.signing import verify

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
STREAMER = [sys.executable, "-m", "streamer.cli"]
REMOTE = '[[remotes]]\nname = "fx"\nurl = "http://127.0.0.1:1/PULP_MANIFEST"\n'


def env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "STREAMER_CONFIG"} | extra


async def run(argv: list[str], cwd: Path, **extra: str) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        argv[0], argv[1:], env=env(**extra), path=str(cwd)
    )
    return out.decode(), err.decode(), code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_twistd_lists_the_plugin_and_documents_its_options(tmp_path):
    out, _, code = await run([*TWISTD, "--help"], tmp_path)
    assert code == 0
    assert "streamer" in out.split("Commands:")[1]
    out, _, code = await run([*TWISTD, "streamer", "--help"], tmp_path)
    assert code == 0
    assert "--config=" in out and "--listen=" in out and "STREAMER_CONFIG" in out


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_and_stops_cleanly_on_sigterm(tmp_path):
    (tmp_path / "var" / "tmp").mkdir(parents=True)
    (tmp_path / "var" / "tmp" / "part-stale").write_bytes(b"stale")
    config = tmp_path / "streamer.toml"
    config.write_text('[server]\nlisten = "tcp:1:interface=127.0.0.1"\ngrace_period = 2\n' + REMOTE)
    port = free_port()
    listen = f"tcp:{port}:interface=127.0.0.1"
    proto = _Collect()
    argv = [*TWISTD, "-n", "--pidfile=", "streamer", "--config", str(config), "--listen", listen]
    process = reactor.spawnProcess(proto, argv[0], argv, env=env(), path=str(tmp_path))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                response = await treq.get(base + "/healthz", persistent=False)
                if response.code == 200:
                    assert await treq.content(response) == b"ok\n"
                    break
                await treq.content(response)
            except Exception:
                pass
            await deferLater(reactor, 0.02)
        else:
            raise AssertionError(f"never healthy: {proto.output.decode()}")
        metrics = await treq.get(base + "/metrics", persistent=False)
        assert b"streamer_requests_total" in await treq.content(metrics)
        process.signalProcess("TERM")
        code = await proto.ended
    finally:
        if process.pid is not None and not proto.ended.called:
            process.signalProcess("KILL")
    output = proto.output.decode()
    assert code == 0, output
    assert f"storage at {tmp_path / 'var'}, catalog at {tmp_path / 'var' / 'catalog.sqlite3'}" in (
        output
    )
    assert '"GET /healthz" 200' in output
    assert "Traceback" not in output
    assert list((tmp_path / "var" / "tmp").iterdir()) == []


BAD_CONFIGS = [
    ("[server]\nlisten_on = 1\n", "server.listen_on: unknown key"),
    ('[server]\nlisten = "tcp:abc"\n', "server.listen: invalid endpoint 'tcp:abc'"),
    (REMOTE + 'base_path = "metrics"\n', "remotes[0].base_path: /metrics is reserved"),
    (REMOTE + 'policy = "sometimes"\n', "remotes[0].policy: must be one of"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
@pytest_twisted.ensureDeferred
async def test_streamer_cli_config_errors_are_one_line(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    # The file named by STREAMER_CONFIG is used when --config is absent.
    out, err, code = await run([*STREAMER, "sign", "/fx/a"], tmp_path, STREAMER_CONFIG="bad.toml")
    assert code == 2
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err


@pytest.mark.parametrize(("text", "message"), [BAD_CONFIGS[0], BAD_CONFIGS[2]])
@pytest_twisted.ensureDeferred
async def test_twistd_config_errors_are_one_line(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    argv = [*TWISTD, "-n", "--pidfile=", "streamer", "--config", "bad.toml"]
    out, err, code = await run(argv, tmp_path)
    assert code == 2
    assert err.startswith(f"streamer: configuration error: {message}")
    assert err.strip().count("\n") == 0 and "Traceback" not in out + err


@pytest_twisted.ensureDeferred
async def test_twistd_bad_listen_option_is_one_line(tmp_path):
    argv = [*TWISTD, "-n", "--pidfile=", "streamer", "--listen", "tcp:abc"]
    out, err, code = await run(argv, tmp_path)
    assert code != 0
    assert "server.listen: invalid endpoint 'tcp:abc'" in err and "Traceback" not in out + err


@pytest_twisted.ensureDeferred
async def test_sign_prints_a_verifiable_path(tmp_path):
    (tmp_path / "key").write_bytes(b"0123456789abcdef0123456789abcdef\n")
    (tmp_path / "s.toml").write_text('[security]\nsigning_key_file = "key"\n')
    out, err, code = await run(
        [*STREAMER, "--config", "s.toml", "sign", "/fx/a.rpm", "--expires", "120"], tmp_path
    )
    assert code == 0, err
    path, _, query = out.strip().partition("?")
    assert path == "/fx/a.rpm"
    now = reactor.seconds()
    assert verify(b"0123456789abcdef0123456789abcdef", path, query, now) is None
    assert verify(b"0123456789abcdef0123456789abcdef", path, query, now + 121) is not None
    _, err, code = await run([*STREAMER, "sign", "/fx/a.rpm"], tmp_path)
    assert code == 2 and "signing_key_file is not set" in err


@pytest_twisted.ensureDeferred
async def test_verify_reports_and_quarantines_bad_artifacts(tmp_path):
    def store(data: bytes, name: bytes | None = None) -> Path:
        digest = hashlib.sha256(name or data).hexdigest()
        path = tmp_path / "var" / "artifacts" / digest[:2] / digest[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    store(b"good bytes")
    out, err, code = await run([*STREAMER, "verify"], tmp_path)
    assert code == 0, err
    assert "verified 1 artifact(s)" in out and "1 good, 0 bad" in out
    bad = store(b"rotten bytes", name=b"what it should have been")
    out, err, code = await run([*STREAMER, "verify"], tmp_path)
    assert code == 1, err
    assert "1 good, 1 bad" in out and "BAD " in out
    assert not bad.exists()
    assert len(list((tmp_path / "var" / "quarantine").iterdir())) == 1
