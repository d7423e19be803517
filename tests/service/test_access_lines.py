"""Access lines written straight to their destination (`streamer.logs.RequestLog.write_lines`):
rendered exactly as the observers would, gathered for `ACCESS_DELAY` and written together, in
pieces a pipe writes atomically where others write too; twistd's log taken only when it is one
file observer that renders them alike; a helper's lines reach the first process whole."""

from __future__ import annotations

import io
import os
import socket
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import (
    FilteringLogObserver,
    LogLevelFilterPredicate,
    LogPublisher,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from streamer.logs import (
    ACCESS_DELAY,
    PIPE_BUF,
    RequestLog,
    _access_event,
    access_line,
    fd_writer,
    json_file_observer,
    render_json,
    render_text,
    twistd_log,
)
from streamer.processes import ACCESS_FD, LINES_ENV, ProcessGroup, _Helper


def fields(path: str = "/fx/a.bin", complete: bool = True) -> dict:
    return {
        "client": "10.0.0.7",
        "method": "GET",
        "path": path,
        "status": 200,
        "bytes": 1234,
        "duration": 0.0123,
        "seconds": "0.012",
        "cache": "miss",
        "upstream_status": 200,
        "complete": complete,
    }


def observed(observer_for, event: dict) -> str:
    out = io.StringIO()
    observer_for(out)(event)
    return out.getvalue()


@pytest.mark.parametrize(
    "fraction", [0.0, 0.0005, 0.0119999999, 0.5, 0.9994999, 0.9995, 0.99999951, 0.9999999]
)
def test_an_access_line_is_rendered_as_the_text_and_json_observers_render_its_event(fraction):
    second = int(time.time())
    for path, complete in (("/fx/a.bin", True), ("/fx/{b}\u00e9\n", False)):
        values = fields(path, complete)
        line = access_line(values)
        # Twice in one second: the second's text is made once, the fraction each time.
        for when in (second + fraction, second + fraction / 2, second + 1 + fraction):
            event = _access_event(values, when)
            system = "streamer.access#info process 2"
            expected = observed(textFileLogObserver, {**event, "log_system": system})
            assert render_text(values, line, when, system) == expected
            assert render_json(values, line, when) == observed(json_file_observer, event)


def test_access_lines_wait_and_are_written_together():
    """The lines of `ACCESS_DELAY` seconds go in one write, in order; with the reactor not
    running (start-up, exit) each is written at once; closing writes what waits."""
    clock = Clock()
    clock.running = True  # type: ignore[attr-defined]
    writes: list[str] = []
    log = RequestLog()
    log.write_lines(writes.append, reactor=clock)
    request = Request(DummyChannel())
    request.method, request.code, request.sentLength = b"GET", 200, 5
    for i in range(50):
        request.path = b"/fx/%d" % i
        log.access(request, 0.001)
    clock.advance(ACCESS_DELAY / 2)
    assert writes == []
    clock.advance(ACCESS_DELAY / 2)
    [batch] = writes
    lines = batch.splitlines()
    assert [line.split('"')[1] for line in lines] == [f"GET /fx/{i}" for i in range(50)]
    assert all(" [streamer.access#info] " in line for line in lines)
    log.access(request, 0.001)
    log.relay("a helper's line\n")
    log.close()
    assert len(writes) == 2 and writes[1].endswith("0.001s cache=-\na helper's line\n")
    clock.running = False  # type: ignore[attr-defined]
    log.access(request, 0.001)
    assert len(writes) == 3


def test_json_access_lines_are_the_json_observers_lines(tmp_path):
    """``access_log_json``: the file holds the lines `json_file_observer` would write."""
    path = tmp_path / "access.log"
    log = RequestLog.open(str(path), json=True, reactor=Clock())
    request = Request(DummyChannel())
    request.method, request.path, request.code, request.sentLength = b"GET", b"/fx/a", 404, 9
    before = time.time()
    log.access(request, 0.25, complete=False)
    log.close()
    [line] = path.read_text().splitlines(keepends=True)
    values = fields("/fx/a", False) | {"client": "192.168.1.1", "status": 404, "bytes": 9}
    values |= {"duration": 0.25, "seconds": "0.250", "cache": "-", "upstream_status": None}
    expected = [
        observed(json_file_observer, _access_event(values, before + i / 1000))
        for i in range(-1, 2000)
    ]
    assert line in expected, (line, expected[1])


def test_lines_for_a_shared_pipe_go_in_pieces_it_writes_atomically():
    """Where others write too and the destination is not a regular file, a batch goes in
    pieces of whole lines of at most PIPE_BUF bytes (a longer line alone); where this
    process is the only writer, in one write."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        text = "".join(f"{i:04d} {'x' * 300}\n" for i in range(30))
        text += "L" * (3 * PIPE_BUF) + "\n" + "".join(f"tail {i}\n" for i in range(5))
        fd_writer(ours.fileno())(text)
        pieces = []
        theirs.setblocking(False)
        while True:
            try:
                pieces.append(theirs.recv(1 << 20))
            except BlockingIOError:
                break
        assert b"".join(pieces).decode() == text
        assert len(pieces) > 3
        assert all(piece.endswith(b"\n") for piece in pieces)
        assert all(len(piece) <= PIPE_BUF or piece.count(b"\n") == 1 for piece in pieces)
        fd_writer(ours.fileno(), shared=False)(text)
        assert theirs.recv(1 << 20).decode() == text
    finally:
        ours.close()
        theirs.close()


def test_a_regular_file_takes_a_batch_in_one_append(tmp_path):
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        path.write_text("before\n")
        text = "".join(f"{i} {'y' * 500}\n" for i in range(40))
        fd_writer(fd)(text)
    finally:
        os.close(fd)
    assert path.read_text() == "before\n" + text


def test_twistds_log_takes_lines_only_from_one_file_observer_rendering_them_alike(tmp_path):
    log_file = LogFile.fromFullPath(str(tmp_path / "twistd.log"), rotateLength=100)
    found = twistd_log(LogPublisher(textFileLogObserver(log_file)))
    assert found is not None
    write, json = found
    assert json is False
    write("one line\n" * 20)  # through the LogFile: it counts the bytes and rotates
    write("next\n")
    assert (tmp_path / "twistd.log.1").read_text() == "one line\n" * 20
    assert (tmp_path / "twistd.log").read_text() == "next\n"
    out = io.StringIO()
    found = twistd_log(LogPublisher(json_file_observer(out)))
    assert found is not None and found[1] is True
    found[0]('{"a": 1}\n')
    assert out.getvalue() == '{"a": 1}\n'
    for publisher in (
        LogPublisher(),
        LogPublisher(textFileLogObserver(io.StringIO()), textFileLogObserver(io.StringIO())),
        LogPublisher(
            FilteringLogObserver(textFileLogObserver(io.StringIO()), [LogLevelFilterPredicate()])
        ),
        LogPublisher(textFileLogObserver(io.StringIO(), timeFormat="%H:%M")),
    ):
        assert twistd_log(publisher) is None


def test_a_helpers_rendered_lines_reach_the_first_process_whole():
    """Lines a helper renders come on descriptor 5 in pieces as the pipe gives them; the
    first process hands on whole lines only, and says in the helpers' environment how to
    render them."""
    received: list[str] = []
    group = ProcessGroup(
        1,
        3,
        "AF_INET",
        ["true"],
        reactor=Clock(),
        stop_timeout=1,
        env={LINES_ENV: "stale"},
        access_lines=received.append,
        access_json=True,
    )
    assert group.env[LINES_ENV] == "json"
    helper = _Helper(group, 1)
    helper.childDataReceived(ACCESS_FD, b"first line\nsecond ")
    helper.childDataReceived(ACCESS_FD, b"line\n\xc3")
    helper.childDataReceived(ACCESS_FD, b"\xa9 third\n")
    assert received == ["first line\n", "second line\n", "\u00e9 third\n"]
    plain = ProcessGroup(
        1, 3, "AF_INET", ["true"], reactor=Clock(), stop_timeout=1, env={LINES_ENV: "text"}
    )
    assert LINES_ENV not in plain.env
