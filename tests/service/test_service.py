"""StreamerService in this process: ops endpoints, metrics, access logs, graceful drain."""

from __future__ import annotations

import json

import attrs
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from streamer.metrics import CONTENT_TYPE
from streamer.service import StreamerService
from streamer.signing import sign_path
from tests.service.support import EchoContent, service_config


def start(config, **kwargs) -> tuple[StreamerService, EchoContent, str]:
    built: list[EchoContent] = []

    def factory(**kw):
        built.append(EchoContent(**kw))
        return built[0]

    service = StreamerService(config, content_factory=factory, **kwargs)
    service.startService()
    return service, built[0], f"http://127.0.0.1:{service.address.port}"


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached")


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
    access = [e for e in lines if e["log_namespace"] == "streamer.access"]
    assert [(e["path"], e["status"], e["cache"]) for e in access] == [
        ("/fx/a.txt", 200, "hit"),
        ("/fx/a.txt", 403, "-"),
        ("/healthz", 200, "-"),
    ]
    assert access[0]["method"] == "GET" and access[0]["bytes"] == len(b"content of /fx/a.txt")
    assert access[0]["duration"] >= 0 and access[0]["complete"] is True
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
    assert "upstream failure: https://127.0.0.1:8443/repo/a.rpm: timeout (no bytes for 60s)" in text
    assert "hunter2" not in text and "t0ps3cret" not in text
    assert metrics.value("streamer_upstream_failures_total", {"reason": "timeout"}) == 1


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
