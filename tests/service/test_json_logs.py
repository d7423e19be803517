"""JSON logs as the README runs them, ``twistd -n --logger streamer.logs.json_observer
streamer --config FILE`` (and ``access_log_json``): one flat object per line, every line
parsed; and no info-level "Starting factory" line per upstream connection."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest_twisted
from twisted.logger import Logger, eventAsJSON, eventFromJSON, formatEvent, textFileLogObserver
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from streamer.logs import (
    RequestLog,
    json_file_observer,
    json_record,
    pack_access,
    pack_event,
    unpack_access,
    unpack_event,
)
from tests.service.test_twistd import run
from tests.support import faults
from tests.support.clients import run_curl
from tests.support.twistd import STREAMER, start_twistd

BODY = bytes(range(256)) * 40
COMMON = {"time", "level", "logger", "message"}
ACCESS = {"method", "path", "status", "bytes", "duration", "cache", "upstream_status"}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warn", "error", "critical"}


async def synced_repo(tmp_path: Path, upstream, server: str = "") -> Path:
    """A config whose ``fx`` remote lists ``a.bin`` (served), ``missing.bin`` (404 upstream)
    and ``busy.bin`` (503 upstream), synced on_demand (nothing downloaded yet)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.bin").write_bytes(BODY)
    lines = []
    for name, body in (("a.bin", BODY), ("missing.bin", BODY[::-1]), ("busy.bin", BODY[1:])):
        lines.append(f"{name},{hashlib.sha256(body).hexdigest()},{len(body)}")
    (repo / "PULP_MANIFEST").write_text("\n".join(lines) + "\n")
    upstream.register("/repo/busy.bin", faults.Status(503))
    config = tmp_path / "streamer.toml"
    config.write_text(
        f'[server]\ngrace_period = 2\n{server}[storage]\npath = "var"\n'
        f'[[remotes]]\nname = "fx"\nurl = "{upstream.serve_tree("/repo", repo)}PULP_MANIFEST"\n'
        "max_retries = 0\n"
    )
    out, err, code = await run([*STREAMER, "--config", str(config), "sync"], tmp_path)
    assert code == 0, out + err
    return config


async def get_all(base: str, paths: list[str]) -> list[int]:
    statuses = []
    for path in paths:
        code, out, err = await run_curl("-o", "/dev/null", "-w", "%{http_code}", base + path)
        assert code == 0, err
        statuses.append(int(out))
    return statuses


def parse(text: str) -> list[dict]:
    """Every line as one JSON object, each checked for the flat shape."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        keys = set(record)
        assert COMMON <= keys <= COMMON | ACCESS | {"traceback"}, line
        assert TIME.match(record["time"]), line
        assert record["level"] in LEVELS, line
        assert isinstance(record["logger"], str) and record["logger"], line
        assert isinstance(record["message"], str) and record["message"], line
        if record["logger"] == "streamer.access":
            assert keys == COMMON | ACCESS, line
            assert len(line) < 400, line
        else:
            assert not keys & ACCESS, line
        records.append(record)
    return records


#: The rendered access line (whichever process served the request: a helper's events are
#: relayed to the first process as JSON).
ACCESS_MESSAGE = re.compile(r'\S+ "GET /\S+" \d{3} \d+ \d+\.\d{3}s cache=(hit|miss|coalesced|-)')


def check_access(records: list[dict]) -> None:
    access = [r for r in records if r["logger"] == "streamer.access"]
    for record in access:
        assert ACCESS_MESSAGE.fullmatch(record["message"]), record
    by_path = {}
    for record in access:
        by_path.setdefault(record["path"], []).append(record)
    miss = by_path["/fx/a.bin"][0]
    assert (miss["method"], miss["status"], miss["bytes"]) == ("GET", 200, len(BODY))
    assert (miss["cache"], miss["upstream_status"]) == ("miss", 200)
    assert isinstance(miss["duration"], float) and 0 <= miss["duration"] < 30
    assert by_path["/fx/a.bin"][1]["cache"] == "hit"
    missing = by_path["/fx/missing.bin"][0]
    assert (missing["status"], missing["upstream_status"]) == (404, 404)
    busy = by_path["/fx/busy.bin"][0]
    assert (busy["status"], busy["cache"], busy["upstream_status"]) == (502, "miss", 503)
    unknown = by_path["/fx/unknown.bin"][0]
    assert (unknown["status"], unknown["cache"], unknown["upstream_status"]) == (404, "-", None)


PATHS = ["/fx/a.bin", "/fx/a.bin", "/fx/missing.bin", "/fx/busy.bin", "/fx/unknown.bin?sig=s3cret"]


async def serve_paths(tmp_path: Path, config: Path, before: list[str] = ()):
    """Run ``twistd -n BEFORE streamer --config CONFIG``, GET every one of `PATHS` with curl,
    stop it with SIGTERM; the child's output collector."""
    served = start_twistd(tmp_path, ["--config", str(config)], before=before)
    proto, base = served.proto, served.base
    try:
        await served.healthy()
        assert await get_all(base, PATHS) == [200, 200, 404, 502, 404]
    finally:
        code = await served.stop()
    assert code == 0, proto.output.decode()
    return proto


@pytest_twisted.ensureDeferred
async def test_twistd_json_logger_writes_one_flat_object_per_line(tmp_path, upstream):
    config = await synced_repo(tmp_path, upstream)
    proto = await serve_paths(tmp_path, config, ["--logger", "streamer.logs.json_observer"])
    records = parse(proto.stdout.decode())
    check_access(records)
    messages = [r["message"] for r in records]
    assert f"configuration from {config}" in messages
    assert "streamer ready" in messages and "streamer stopped" in messages
    warnings = [r for r in records if r["logger"] == "streamer.upstream"]
    assert {r["level"] for r in warnings} == {"warn"}
    assert any("busy.bin: http_error (HTTP 503" in r["message"] for r in warnings), warnings
    assert "s3cret" not in proto.output.decode()


@pytest_twisted.ensureDeferred
async def test_access_log_json_writes_the_same_flat_lines(tmp_path, upstream):
    server = 'access_log = "access.jsonl"\naccess_log_json = true\n'
    config = await synced_repo(tmp_path, upstream, server)
    await serve_paths(tmp_path, config)
    records = parse((tmp_path / "access.jsonl").read_text())
    check_access(records)
    assert {r["logger"] for r in records} == {"streamer.access"}


def test_a_failure_is_one_traceback_string():
    out = io.StringIO()
    log = Logger(namespace="streamer.test", observer=json_file_observer(out))
    try:
        {}["key"]
    except KeyError:
        log.failure("lookup of {what} failed", what="key", extra={"not": "kept"})
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert set(record) == COMMON | {"traceback"}
    assert (record["level"], record["logger"]) == ("critical", "streamer.test")
    assert record["message"] == "lookup of key failed"
    assert record["traceback"].startswith("Traceback") and "KeyError: 'key'" in record["traceback"]


@pytest_twisted.ensureDeferred
async def test_upstream_connection_factories_start_and_stop_at_debug_level(tmp_path, upstream):
    """twistd's default (text) log: a new upstream connection's factory lines are tagged
    ``#debug``, not ``#info``."""
    config = await synced_repo(tmp_path, upstream)
    served = start_twistd(tmp_path, ["--config", str(config)])
    proto, base = served.proto, served.base
    try:
        await served.healthy()
        assert await get_all(base, ["/fx/a.bin"]) == [200]
        upstream.abort_connections()  # the kept-alive upstream connection ends too
        assert await get_all(base, ["/fx/missing.bin"]) == [404]
    finally:
        code = await served.stop()
    output = proto.stdout.decode()
    assert code == 0, output
    factories = [
        line
        for line in output.splitlines()
        if re.search(r"(Starting|Stopping) factory", line) and "Site" not in line
    ]
    assert factories, "a new upstream connection starts a client factory"
    # A helper's lines reach the log through the first process: "#debug process N]".
    assert all(re.search(r"#debug( process \d+)?\]", line) for line in factories), factories


def test_an_access_line_relayed_from_a_helper_process_keeps_its_rendered_message():
    """A helper process's events reach the first one as JSON (`streamer.processes`), which
    keeps field values but drops format specs: the line must not depend on one."""
    events: list[dict] = []
    request = Request(DummyChannel())
    request.method, request.path, request.code, request.sentLength = b"GET", b"/fx/a", 200, 5
    RequestLog(observer=events.append).access(request, 0.1234567)
    [event] = events
    record = json_record(eventFromJSON(eventAsJSON(event)))
    assert ACCESS_MESSAGE.fullmatch(record["message"]), record
    assert record["message"].endswith(' "GET /fx/a" 200 5 0.123s cache=-')
    assert (record["duration"], record["upstream_status"]) == (0.1234567, None)


def test_a_helper_relays_an_access_line_compactly_and_the_first_process_renders_it_alike():
    """A helper sends each access event as a short JSON array, not Twisted's JSON of the whole
    event (which costs several times more per request); the first process rebuilds an event
    that every observer renders as it would the helper's own: same line, same fields."""
    events: list[dict] = []
    request = Request(DummyChannel())
    request.method, request.path, request.code, request.sentLength = b"GET", b'/fx/{a}"', 200, 5
    request.cache_status, request.upstream_status = "miss", 200
    RequestLog(observer=events.append).access(request, 0.25, complete=False)
    [event] = events
    packed = pack_access(event)
    assert packed is not None and packed.startswith("[") and "\n" not in packed
    assert len(packed) < len(eventAsJSON(event)) / 2
    relayed = unpack_access(packed)
    assert json_record(relayed) == json_record(event)
    assert json_record(relayed)["message"].endswith(
        ' "GET /fx/{a}"" 200 5 0.250s cache=miss (connection lost)'
    )
    text = io.StringIO()
    textFileLogObserver(text)(relayed)
    assert text.getvalue().endswith(
        '[streamer.access#info] 192.168.1.1 "GET /fx/{a}"" 200 5 0.250s cache=miss '
        "(connection lost)\n"
    ), text.getvalue()
    # Any other event keeps Twisted's encoding.
    assert pack_access({"log_format": "x", "log_namespace": "streamer.service"}) is None


def test_a_failure_relayed_from_a_helper_process_keeps_its_exception_and_traceback():
    """A helper's failure reaches the first process (`pack_event`, `unpack_event`: the lines
    on the pipe) with its exception's type, message and traceback, written by the text and
    JSON observers exactly as the helper would write it (Twisted's JSON alone turned the
    exception into ``{'unpersistable': True}``)."""
    events: list[dict] = []

    def commit(path: str) -> None:
        raise OSError(28, "No space left on device", path)

    try:
        commit("artifacts/ab/cd")
    except OSError:
        Logger(namespace="streamer.store", observer=events.append).failure("commit failed")
    [event] = events
    line = pack_event(event)
    assert "\n" not in line
    relayed = unpack_event(line)

    def text(event: dict) -> str:
        out = io.StringIO()
        textFileLogObserver(out)(event)
        return out.getvalue()

    written = text(relayed)
    assert written == text(event)
    assert "builtins.OSError: [Errno 28] No space left on device: 'artifacts/ab/cd'" in written
    assert 'in commit\n\t    raise OSError(28, "No space left on device", path)' in written
    assert json_record(relayed) == json_record(event)
    assert json_record(relayed)["traceback"].startswith("Traceback (most recent call last):")
    failure = relayed["log_failure"]
    assert failure.check(OSError) and not failure.check(ValueError)
    assert failure.getErrorMessage() == "[Errno 28] No space left on device: 'artifacts/ab/cd'"
    # The helper's own failure is left as it was (the relay sends a copy).
    assert isinstance(event["log_failure"].value, OSError)


def test_an_access_event_needs_no_field_lookup_to_be_rendered():
    """Its format is its line (braces doubled) and its system is set: a text observer neither
    looks a field up nor works the system out from namespace and level, at every line."""
    events: list[dict] = []
    request = Request(DummyChannel())
    request.method, request.path, request.code, request.sentLength = b"GET", b"/fx/{a}}", 200, 5
    RequestLog(observer=events.append).access(request, 0.25)
    [event] = events
    assert event["log_format"] == event["line"].replace("{", "{{").replace("}", "}}")
    assert event["log_system"] == "streamer.access#info"
    assert formatEvent(event) == event["line"]
    assert event["line"].endswith(' "GET /fx/{a}}" 200 5 0.250s cache=-')
    text = io.StringIO()
    textFileLogObserver(text)(event)
    assert text.getvalue().endswith(f"[streamer.access#info] {event['line']}\n")
