"""The real entry points in subprocesses: twistd plugin, graceful SIGTERM, CLI, config errors.

Processes are run with getProcessOutputAndValue / spawnProcess, never blocking the reactor.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from streamer.signing import verify
from tests.support.twistd import STREAMER, TWISTD, child_env, start_twistd

REMOTE = '[[remotes]]\nname = "fx"\nurl = "http://127.0.0.1:1/PULP_MANIFEST"\n'


async def run(argv: list[str], cwd: Path, **extra: str) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        argv[0], argv[1:], env=child_env(**extra), path=str(cwd)
    )
    return out.decode(), err.decode(), code


@pytest_twisted.ensureDeferred
async def test_twistd_lists_the_plugin_and_documents_its_options(tmp_path):
    out, _, code = await run([*TWISTD, "--help"], tmp_path)
    assert code == 0
    assert "streamer" in out.split("Commands:")[1]
    out, _, code = await run([*TWISTD, "streamer", "--help"], tmp_path)
    assert code == 0
    assert "--config=" in out and "--listen=" in out and "STREAMER_CONFIG" in out


@pytest_twisted.ensureDeferred
async def test_twistd_serves_and_stops_cleanly_on_sigterm(tmp_path):
    (tmp_path / "var" / "tmp").mkdir(parents=True)
    (tmp_path / "var" / "tmp" / "part-stale").write_bytes(b"stale")
    config = tmp_path / "streamer.toml"
    config.write_text('[server]\nlisten = "tcp:1:interface=127.0.0.1"\ngrace_period = 2\n' + REMOTE)
    # No --config: STREAMER_CONFIG names the file (relative to the working folder).
    served = start_twistd(tmp_path, STREAMER_CONFIG="streamer.toml")
    try:
        await served.healthy()
        metrics = await treq.get(served.base + "/metrics", persistent=False)
        assert b"streamer_requests_total" in await treq.content(metrics)
    finally:
        code = await served.stop()
    output = served.output
    assert code == 0, output
    assert f"configuration from {config}" in output
    assert f"storage at {tmp_path / 'var'}, catalog at {tmp_path / 'var' / 'catalog.sqlite3'}" in (
        output
    )
    assert '"GET /healthz" 200' in output
    assert "Traceback" not in output
    assert list((tmp_path / "var" / "tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_twistd_without_configuration_uses_embedded_defaults_and_json_logs(tmp_path):
    served = start_twistd(tmp_path, before=["--logger", "streamer.logs.json_observer"])
    try:
        await served.healthy()
        missing = await treq.get(served.base + "/nowhere/a.rpm?signature=s3cret", persistent=False)
        assert missing.code == 404
        await treq.content(missing)
    finally:
        code = await served.stop()
    assert code == 0, served.output
    # One flat object a line (tests/service/test_json_logs.py checks the shape in full).
    events = [json.loads(line) for line in served.proto.stdout.decode().splitlines()]
    messages = [e["message"] for e in events]
    assert (
        "no configuration file (--config or $STREAMER_CONFIG): using the embedded defaults"
        in messages
    )
    var = tmp_path / "var"
    assert f"storage at {var}, catalog at {var / 'catalog.sqlite3'}" in messages
    assert (tmp_path / "var" / "catalog.sqlite3").exists()
    access = {e["path"]: e for e in events if e["logger"] == "streamer.access"}
    assert access["/healthz"]["status"] == 200 and access["/healthz"]["cache"] == "-"
    lost = access["/nowhere/a.rpm"]
    assert (lost["method"], lost["status"]) == ("GET", 404)
    assert lost["bytes"] > 0 and lost["duration"] >= 0
    assert "s3cret" not in served.output


@pytest_twisted.ensureDeferred
async def test_twistd_exits_non_zero_when_the_catalog_will_not_open(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "catalog.sqlite3").write_bytes(b"not a database at all\n" * 100)
    served = start_twistd(tmp_path)
    code = await served.exited(15)
    output = served.output
    assert code == 1, output
    assert "cannot open the catalog: " in output and "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_twistd_exits_non_zero_when_the_endpoint_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [
            *TWISTD,
            "-n",
            "--pidfile=",
            "streamer",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ]
        out, err, code = await run(argv, tmp_path)
    assert code == 1, out + err
    # Under -n twistd logs standard error to standard output: one line, then exit 1.
    (line,) = [line for line in (out + err).splitlines() if "cannot listen" in line]
    assert f"streamer: cannot listen on 'tcp:{port}:interface=127.0.0.1': " in line
    assert "Address already in use" in line
    assert "Traceback" not in out + err


BAD_CONFIGS = [
    ("[server]\nlisten_on = 1\n", "server.listen_on: unknown key"),
    ('[server]\nlisten = "tcp:abc"\n', "server.listen: invalid endpoint 'tcp:abc'"),
    (REMOTE + 'base_path = "metrics"\n', "remotes[0].base_path: /metrics is reserved"),
    (REMOTE + 'policy = "sometimes"\n', "remotes[0].policy: must be one of"),
    (
        '[catalog]\nurl = "postgresql://u:pw@db:54x/c"\n',
        "catalog.url: catalog url postgresql://u@db",
    ),
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
    # A full URL: the same signature, printed as a full URL.
    out, err, code = await run(
        [*STREAMER, "--config", "s.toml", "sign", "https://cdn.example/fx/a.rpm"], tmp_path
    )
    assert code == 0, err
    url, _, query = out.strip().partition("?")
    assert url == "https://cdn.example/fx/a.rpm"
    assert verify(b"0123456789abcdef0123456789abcdef", "/fx/a.rpm", query, now) is None
    _, err, code = await run(
        [*STREAMER, "--config", "s.toml", "sign", "/fx/a.rpm", "--expires", "0"], tmp_path
    )
    assert code == 2 and err == "streamer: --expires: must be > 0 seconds, not 0\n"
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

    out, err, code = await run([*STREAMER, "verify"], tmp_path)
    assert (code, out) == (0, f"verified 0 artifact(s) in {tmp_path / 'var'}: no store there yet\n")
    assert not (tmp_path / "var").exists()  # verifying creates nothing
    store(b"good bytes")
    out, err, code = await run([*STREAMER, "verify"], tmp_path)
    assert code == 0, err
    assert out == f"verified 1 artifact(s) in {tmp_path / 'var'}: 1 good, 0 bad\n"
    bad = store(b"rotten bytes", name=b"what it should have been")
    out, err, code = await run([*STREAMER, "verify"], tmp_path)
    assert code == 1, err
    digest = hashlib.sha256(b"what it should have been").hexdigest()
    bad_line, summary = out.splitlines()
    assert bad_line.startswith(
        f"BAD {digest}: content hashes to {hashlib.sha256(b'rotten bytes').hexdigest()}; "
        f"moved to {tmp_path / 'var' / 'quarantine'}"
    )
    assert summary == f"verified 2 artifact(s) in {tmp_path / 'var'}: 1 good, 1 bad"
    assert not bad.exists()
    assert len(list((tmp_path / "var" / "quarantine").iterdir())) == 1
