"""StreamerService in this process: ops endpoints, metrics, access logs, graceful drain."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest_twisted
import treq
import treq.client
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from streamer.config import load_config
from streamer.metrics import CONTENT_TYPE
from streamer.service import StreamerService
from streamer.signing import sign_path
from tests.service.support import EchoContent, service_config
from tests.support.polling import until


def start(config, **kwargs) -> tuple[StreamerService, EchoContent, str]:
    built: list[EchoContent] = []

    def factory(**kw):
        built.append(EchoContent(**kw))
        return built[0]

    service = StreamerService(config, content_factory=factory, **kwargs)
    service.startService()
    return service, built[0], f"http://127.0.0.1:{service.address.port}"


@pytest_twisted.ensureDeferred
async def test_ops_endpoints_metrics_and_content_contract(tmp_path):
    (tmp_path / "var" / "tmp").mkdir(parents=True)
    stale = tmp_path / "var" / "tmp" / "part-left-by-a-crash"
    stale.write_bytes(b"x" * 100)
    service, content, base = start(service_config(tmp_path))
    try:
        assert not stale.exists()  # stale temp files removed at start
        # The content resource is built with the documented keyword arguments.
        assert set(content.kwargs) == {
            "catalog",
            "storage",
            "remotes",
            "config",
            "metrics",
            "reactor",
        }
        assert content.kwargs["storage"] is service.storage
        await until(lambda: service.ready)

        health = await treq.get(base + "/healthz")
        assert health.code == 200
        assert await treq.content(health) == b"ok\n"

        for _ in range(3):
            response = await treq.get(base + "/fx/a.txt")
            assert await treq.content(response) == b"content of /fx/a.txt"
        # The content resource receives the whole path, including the first segment.
        assert content.seen[-1][0] == b"/fx/a.txt"

        response = await treq.get(base + "/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == [CONTENT_TYPE]
        text = (await treq.content(response)).decode()
        assert 'streamer_requests_total{method="GET",status="200"}' in text
        # No *_created series (noise for dashboards); temp bytes measured at scrape time.
        assert "_created" not in text
        assert "streamer_temp_bytes 0.0" in text
        temp = service.storage.new_temp_file()
        temp.write(b"x" * 1234)
        temp.close()
        scraped = await treq.content(await treq.get(base + "/metrics"))
        assert b"streamer_temp_bytes 1234.0" in scraped
        m = service.metrics
        assert m.value("streamer_cache_hits_total") == 3
        assert m.value("streamer_served_bytes_total", {"source": "store"}) == 3 * len(
            b"content of /fx/a.txt"
        )
        assert m.value("streamer_requests_total", {"method": "GET", "status": "200"}) >= 4
        assert m.value("streamer_cache_misses_total") == 0
    finally:
        await service.stopService()
    assert content.closed


@pytest_twisted.ensureDeferred
async def test_json_access_log_without_signature_or_secret(tmp_path):
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(b"s" * 32)
    log_file = tmp_path / "access.jsonl"
    config = service_config(
        tmp_path,
        '[security]\nsigning_key_file = "signing.key"\n'
        '[[remotes]]\nname = "fx"\nurl = "http://127.0.0.1:1/PULP_MANIFEST"\n'
        'username = "user"\npassword = "hunter2-secret"\n',
    )
    config = attrs.evolve(
        config, server=attrs.evolve(config.server, access_log=str(log_file), access_log_json=True)
    )
    service, content, base = start(config)
    try:
        await until(lambda: service.ready)
        signed = sign_path(b"s" * 32, "/fx/a.txt", int(reactor.seconds()) + 60)
        ok = await treq.get(base + signed)
        assert await treq.content(ok) == b"content of /fx/a.txt"
        denied = await treq.get(base + "/fx/a.txt")
        assert denied.code == 403
        await treq.content(denied)
        # Ops endpoints are not signed.
        assert (await treq.get(base + "/healthz")).code == 200
    finally:
        await service.stopService()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    access = [e for e in lines if e["logger"] == "streamer.access"]
    assert [(e["path"], e["status"], e["cache"]) for e in access] == [
        ("/fx/a.txt", 200, "hit"),
        ("/fx/a.txt", 403, "-"),
        ("/healthz", 200, "-"),
    ]
    assert access[0]["method"] == "GET" and access[0]["bytes"] == len(b"content of /fx/a.txt")
    # Flat JSON lines carry no "complete" field: a lost connection says so in the message.
    assert access[0]["duration"] >= 0 and "(connection lost)" not in access[0]["message"]
    raw = log_file.read_text()
    assert "signature" not in raw and "hunter2-secret" not in raw


@pytest_twisted.ensureDeferred
async def test_upstream_failures_are_logged_redacted_and_counted(tmp_path):
    log_file = tmp_path / "access.log"
    from streamer.logs import RequestLog
    from streamer.metrics import Metrics

    metrics = Metrics()
    log = RequestLog.open(str(log_file))
    log.upstream_failure(
        "https://user:hunter2-secret@127.0.0.1:8443/repo/a.rpm?token=t0ps3cret",
        "timeout",
        "no bytes for 60s",
        metrics,
    )
    log.close()
    text = log_file.read_text()
    # Userinfo and query are masked (downloaders.urls.redact_url), not dropped.
    expected = (
        "upstream failure: https://***@127.0.0.1:8443/repo/a.rpm?***: timeout (no bytes for 60s)"
    )
    assert expected in text
    assert "hunter2" not in text and "t0ps3cret" not in text
    assert metrics.value("streamer_upstream_failures_total", {"reason": "timeout"}) == 1


def test_several_processes_write_their_figures_once_per_flush_interval(tmp_path):
    """With several processes every metric update is a locked write to a shared file: the
    requests of `FLUSH_INTERVAL` seconds (many reactor turns) are summed and written once (a
    gauge that went up and down writes nothing); a scrape or a reading flushes first."""
    from twisted.internet.task import Clock

    from streamer.metrics import FLUSH_INTERVAL, Metrics

    clock = Clock()
    metrics = Metrics(shared_dir=str(tmp_path), reactor=clock)
    hits = ("streamer_cache_hits_total", {})
    for _ in range(3):
        metrics.request_started()
        metrics.request_done("GET", 200, 100, "hit", 0.01)
        clock.advance(0)  # the end of a reactor turn writes nothing
    metrics.request_started()
    assert metrics.registry.get_sample_value(*hits) == 0  # nothing written yet
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(FLUSH_INTERVAL * 0.9)
    assert metrics.registry.get_sample_value(*hits) == 0
    clock.advance(FLUSH_INTERVAL * 0.1)
    assert metrics.registry.get_sample_value(*hits) == 3
    sample = metrics.registry.get_sample_value
    assert sample("streamer_requests_total", {"method": "GET", "status": "200"}) == 3
    assert sample("streamer_served_bytes_total", {"source": "store"}) == 300
    assert sample("streamer_request_duration_seconds_count", {}) == 3
    assert sample("streamer_requests_in_flight", {}) == 1
    metrics.request_done("GET", 404, 0, None, 0.01)
    assert metrics.value("streamer_requests_in_flight") == 0  # flushed before reading
    assert not clock.getDelayedCalls()
    # One process (no shared folder): reading the registry writes what waits first.
    single = Metrics(reactor=clock)
    single.request_done("GET", 200, 1, "hit", 0.01)
    assert single.registry.get_sample_value(*hits) == 1


def test_one_process_writes_its_figures_when_they_are_read(monkeypatch):
    """In one process a request's updates wait in memory (no prometheus call, nothing
    scheduled) until the registry is collected (``/metrics``, `Metrics.value`, any exporter
    of the registry), or until `FLUSH_DURATIONS` requests wait."""
    from prometheus_client.values import MutexValue
    from twisted.internet.task import Clock

    from streamer.metrics import FLUSH_DURATIONS, Metrics

    written: list[float] = []
    inc = MutexValue.inc
    monkeypatch.setattr(
        MutexValue, "inc", lambda self, amount: written.append(amount) or inc(self, amount)
    )
    clock = Clock()
    metrics = Metrics(reactor=clock)
    for _ in range(3):
        metrics.request_started()
        metrics.download_started()
        metrics.request_done("GET", 200, 100, "miss", 0.01)
        metrics.download_finished()
    assert written == [] and not clock.getDelayedCalls()
    sample = metrics.registry.get_sample_value
    assert sample("streamer_cache_misses_total", {}) == 3
    assert sample("streamer_served_bytes_total", {"source": "upstream"}) == 300
    assert sample("streamer_request_duration_seconds_count", {}) == 3
    assert sample("streamer_downloads_total", {}) == 3
    assert sample("streamer_downloads_in_flight", {}) == 0
    assert sample("streamer_requests_in_flight", {}) == 0
    assert b'streamer_requests_total{method="GET",status="200"} 3.0' in metrics.render()
    written.clear()
    for _ in range(FLUSH_DURATIONS):
        metrics.request_done("GET", 200, 1, "hit", 0.01)
    assert written  # no reader: written once that many wait
    assert metrics.value("streamer_cache_hits_total") == FLUSH_DURATIONS


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_in_flight_requests(tmp_path):
    service, content, base = start(service_config(tmp_path))
    await until(lambda: service.ready)
    pending = treq.get(base + "/fx/slow")
    await until(lambda: content.pending)
    stopped: Deferred = Deferred.fromCoroutine(_stop(service))
    await deferLater(reactor, 0.1)
    assert not stopped.called  # still waiting for the in-flight response
    assert service.site.draining
    request = content.pending.pop()
    request.write(b"last-chunk")
    request.finish()
    response = await pending
    assert response.code == 200
    assert await treq.content(response) == b"first-chunk;last-chunk"
    await stopped
    assert service.metrics.value("streamer_cache_misses_total") == 1
    assert service.metrics.value("streamer_requests_in_flight") == 0


async def _stop(service: StreamerService) -> None:
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_grace_period_expiry_aborts_and_removes_temp_files(tmp_path):
    config = service_config(tmp_path)
    config = attrs.evolve(config, server=attrs.evolve(config.server, grace_period=0.2))
    service, content, base = start(config)
    await until(lambda: service.ready)
    pending = treq.get(base + "/fx/slow")
    await until(lambda: content.pending)
    temp = service.storage.new_temp_file()  # what an interrupted download leaves behind
    temp.write(b"partial")
    temp.close()
    started = reactor.seconds()
    await service.stopService()
    assert 0.2 <= reactor.seconds() - started < 3
    response = await pending
    try:
        await treq.content(response)
    except Exception:
        pass
    else:
        raise AssertionError("the aborted response completed")
    assert list((tmp_path / "var" / "tmp").iterdir()) == []
    assert not service.site.in_flight


class RawClient(Protocol):
    """A bare TCP client: what it received, and a Deferred firing when the server closed."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.data)

    def get(self, *paths: str) -> None:
        """Send one GET per path at once (pipelined), HTTP/1.1 keep-alive."""
        self.transport.write(
            b"".join(
                b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode() for path in paths
            )
        )


async def raw_client(service: StreamerService) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", service.address.port)
    return await connectProtocol(endpoint, RawClient())


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse a stream of HTTP/1.1 responses (Content-Length or chunked framing)."""
    parsed = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        body = b""
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, data = data[:size], data[size:]
        else:
            assert headers["transfer-encoding"] == "chunked"
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
        parsed.append((int(status_line.split()[1]), headers, body))
    return parsed


@pytest_twisted.ensureDeferred
async def test_keep_alive_and_pipelined_requests_during_drain_get_503_and_close(tmp_path):
    service, content, base = start(service_config(tmp_path))
    await until(lambda: service.ready)
    idle, keep, busy = (
        await raw_client(service),
        await raw_client(service),
        await raw_client(service),
    )
    idle.get("/fx/idle.txt")
    keep.get("/fx/keep.txt")
    await until(lambda: b"content of /fx/idle.txt" in idle.data)
    await until(lambda: b"content of /fx/keep.txt" in keep.data)
    # One response in flight with a second request pipelined behind it.
    busy.get("/fx/slow", "/fx/pipelined.txt")
    await until(lambda: content.pending)

    stopped: Deferred = Deferred.fromCoroutine(_stop(service))
    await until(lambda: service.site.draining)
    # A kept-alive connection asking again during the drain: 503, told and actually closed.
    keep.get("/fx/late.txt")
    (first, late) = responses(await keep.closed)
    assert first[0] == 200
    assert late[0] == 503 and late[1]["connection"] == "close"
    assert late[2] == b"shutting down\n"
    assert not stopped.called

    request = content.pending.pop()
    request.write(b"last-chunk")
    request.finish()
    (slow, pipelined) = responses(await busy.closed)
    assert slow[0] == 200 and slow[2] == b"first-chunk;last-chunk"
    assert pipelined[0] == 503 and pipelined[1]["connection"] == "close"
    await stopped
    # The idle keep-alive connection is closed once the drain is over.
    assert responses(await idle.closed)[0][0] == 200
    assert [uri for uri, _ in content.seen] == [b"/fx/idle.txt", b"/fx/keep.txt", b"/fx/slow"]
    assert service.metrics.value("streamer_requests_total", {"method": "GET", "status": "503"}) == 2


@pytest_twisted.ensureDeferred
async def test_ssl_listen_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    folder = tmp_path / "etc"
    folder.mkdir()
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    monkeypatch.chdir(tmp_path)  # not the config's folder: "key.pem" is not here
    config_file = folder / "streamer.toml"
    config_file.write_text(
        "[server]\n"
        'listen = "ssl:0:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1"\n'
        '[storage]\npath = "var"\n'
    )
    config = load_config(config_file, environ={})
    assert f"privateKey={folder / 'key.pem'}" in config.server.listen
    service, content, _ = start(config)
    try:
        await until(lambda: service.ready)
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        base = f"https://127.0.0.1:{service.address.port}"
        response = await client.get(base + "/healthz")
        assert response.code == 200 and await treq.content(response) == b"ok\n"
        response = await client.get(base + "/fx/a.txt")
        assert await treq.content(response) == b"content of /fx/a.txt"
    finally:
        await service.stopService()
    assert (tmp_path / "etc" / "var" / "tmp").is_dir()


@pytest_twisted.ensureDeferred
async def test_a_catalog_that_will_not_open_keeps_the_service_unready(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "catalog.sqlite3").write_bytes(b"this is not a database" * 100)
    service, content, base = start(service_config(tmp_path))
    try:
        await until(lambda: service.failure is not None)
        assert service.failure.startswith("cannot open the catalog: ")
        assert not service.ready
        for path in ("/healthz", "/fx/a.txt"):
            response = await treq.get(base + path)
            assert response.code == 503, path
            await treq.content(response)
        assert content.seen == []
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_listening_socket_queues_a_burst_of_connections(tmp_path):
    """The listen backlog is 511 (``ss`` shows it as the listening socket's Send-Q), not
    Twisted's 50; a ``backlog=`` in ``listen`` is kept as given."""
    import subprocess

    for listen, expected in (("tcp:0:interface=127.0.0.1", 511), ("tcp:0:backlog=7", 7)):
        service_config(tmp_path)
        config = load_config(
            tmp_path / "streamer.toml", environ={}, overrides={"server.listen": listen}
        )
        service, _, _ = start(config)
        try:
            port = service.address.port
            shown = subprocess.run(
                ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
            ).stdout.split()
            assert shown[0] == "LISTEN" and int(shown[2]) == expected, shown
        finally:
            await _stop(service)


@pytest_twisted.ensureDeferred
async def test_a_request_sent_with_its_connection_is_answered_in_the_turn_that_accepts_it(
    tmp_path,
):
    """A client's request waiting when its connection is accepted is read (and here
    answered) within the listening port's ``doRead``, not at the reactor's next turn; a
    connection that has sent nothing yet is answered when its request comes."""
    import socket

    from twisted.internet import threads

    service, content, _ = start(service_config(tmp_path))
    accepting: list[bool] = []
    accepts: list[None] = []
    answered_while_accepting: list[bool] = []
    port: Any = service.port
    do_read, render = port.doRead, content.render_GET

    def recording_accept() -> Any:
        accepting.append(True)
        try:
            return do_read()
        finally:
            accepting.pop()
            accepts.append(None)

    def recording_render(request: Any) -> Any:
        answered_while_accepting.append(bool(accepting))
        return render(request)

    port.doRead = recording_accept
    content.render_GET = recording_render
    request = b"GET /fx/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def read_all(sock: socket.socket) -> bytes:
        with sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    try:
        await until(lambda: service.ready)
        address = ("127.0.0.1", service.address.port)
        sent_at_once = socket.create_connection(address, timeout=10)
        sent_at_once.sendall(request)  # (the reactor has not run since: it waits for accept)
        answer = await threads.deferToThread(read_all, sent_at_once)
        assert answer.endswith(b"content of /fx/a.txt"), answer
        sent_later = socket.create_connection(address, timeout=10)
        await until(lambda: len(accepts) == 2)  # accepted, with nothing to read yet
        sent_later.sendall(request)
        answer = await threads.deferToThread(read_all, sent_later)
        assert answer.endswith(b"content of /fx/a.txt"), answer
        assert answered_while_accepting == [True, False]
    finally:
        await _stop(service)


def test_a_ready_service_process_keeps_its_start_up_objects_out_of_the_collectors_sight(
    tmp_path,
):
    """Each process of ``twistd streamer`` (standalone: the first and every helper), once
    ready, has what its start-up made frozen out of the cyclic collector's sight and the
    first threshold at `GC_THRESHOLD`, as a console command has; before that, and in a
    service embedded in another program, the collector is left as it was."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from streamer.collector import GC_THRESHOLD

    service_config(tmp_path)
    program = (
        "import gc, sys\n"
        "from twisted.internet import reactor\n"
        "from streamer.config import load_config\n"
        "from streamer.service import StreamerService\n"
        "config = load_config(sys.argv[1], environ={})\n"
        "service = StreamerService(config, standalone=sys.argv[2] == 'standalone')\n"
        "before = (gc.get_freeze_count(), gc.get_threshold()[0])\n"
        "def ready():\n"
        "    if not (service.ready or service.failure):\n"
        "        return reactor.callLater(0.01, ready)\n"
        "    print(service.ready, *before, gc.get_freeze_count() > 10000, gc.get_threshold()[0])\n"
        "    reactor.stop()\n"
        "service.startService()\n"
        "reactor.callWhenRunning(ready)\n"
        "reactor.run()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "STREAMER_CONFIG"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    seen = {}
    for how in ("standalone", "embedded"):
        out = subprocess.run(
            [sys.executable, "-c", program, str(tmp_path / "streamer.toml"), how],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        seen[how] = out.stdout.split()
    assert seen == {
        "standalone": ["True", "0", "700", "True", str(GC_THRESHOLD)],
        "embedded": ["True", "0", "700", "False", "700"],
    }, out.stderr


def test_a_scrape_waits_for_what_another_live_process_counted_before_it(tmp_path):
    """With several processes each writes its figures up to `FLUSH_INTERVAL` after a request,
    or later when it is kept off a core: a scrape answered before could miss another process's
    last requests (the README's `curl /metrics` right after its two requests then showed no
    hit or miss). ``/metrics`` answers once no other live process has figures waiting from
    before it (looked at every `SCRAPE_POLL` s), `SCRAPE_WAIT` s at most; at once when none
    does (one process: always); HEAD alike, without the body; a killed process's marker is
    not waited for; a client gone leaves nothing scheduled."""
    import os
    import struct
    import time

    from twisted.internet.task import Clock
    from twisted.web.server import NOT_DONE_YET
    from twisted.web.test.requesthelper import DummyRequest

    from streamer.metrics import SCRAPE_POLL, SCRAPE_WAIT, Metrics
    from streamer.ops import MetricsResource

    clock = Clock()
    metrics = Metrics(shared_dir=str(tmp_path), reactor=clock)
    resource = MetricsResource(metrics, clock)
    # Another process of the group, whose reactor does not run while this test says so.
    other = Metrics(shared_dir=str(tmp_path), reactor=Clock())

    def scrapes(*methods: bytes) -> list[DummyRequest]:
        requests = []
        for method in methods:
            request = DummyRequest([b""])
            request.method = method
            assert resource.render(request) == NOT_DONE_YET
            requests.append(request)
        return requests

    def answered(request: DummyRequest) -> bool:
        return request.finished == 1

    # Nothing waits anywhere, or only in this process (written first): answered at once.
    metrics.request_started()
    metrics.request_done("GET", 200, 100, "hit", 0.01)
    assert isinstance(resource.render(DummyRequest([b""])), bytes)
    other.request_started()
    other.request_done("GET", 200, 100, "hit", 0.01)
    get, head, gone = scrapes(b"GET", b"HEAD", b"GET")
    gone.processingFailed(Exception("the client left"))  # fires notifyFinish's errback
    clock.advance(SCRAPE_POLL * 50)  # the other process is stopped: its figures still wait
    assert not answered(get) and not get.written and not answered(head)
    other.flush()  # (its reactor, late): what it counted before the scrapes is written
    other.request_done("GET", 200, 100, "hit", 0.01)  # counted after the scrapes: not awaited
    clock.advance(SCRAPE_POLL)
    assert answered(get) and answered(head) and not answered(gone)
    assert get.written == [metrics.render()] and head.responseHeaders.hasHeader(b"content-length")
    assert not clock.getDelayedCalls()  # (the left client's poll cancelled)
    # A process that never writes (its reactor stuck): the scrape answers after SCRAPE_WAIT.
    other.flush()
    other.request_done("GET", 200, 100, "hit", 0.01)
    (late,) = scrapes(b"GET")
    clock.advance(SCRAPE_WAIT - SCRAPE_POLL)
    assert not answered(late)
    clock.advance(SCRAPE_POLL * 2)
    assert answered(late) and not clock.getDelayedCalls()
    # A process killed with figures waiting (its marker's lock free) holds no scrape back, and
    # its marker goes with its live gauges when the first process learns it ended.
    killed = tmp_path / "pending-4242-0"
    killed.write_bytes(struct.pack("d", time.monotonic() - 1))
    other.flush()
    assert isinstance(resource.render(DummyRequest([b""])), bytes)
    metrics.process_ended(4242)
    assert not killed.exists() and len([n for n in os.listdir(tmp_path) if "pending" in n]) == 2
    # One process: answered at once, whatever waits.
    other.request_done("GET", 200, 100, "hit", 0.01)
    single = Metrics(reactor=clock)
    single.request_done("GET", 200, 1, "hit", 0.01)
    assert isinstance(MetricsResource(single, clock).render(DummyRequest([b""])), bytes)
