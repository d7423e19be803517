"""fetch() from plain code (a child process: pytest-twisted owns this process's reactor) and
from the reactor thread; digests refused before any request."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import pytest_twisted

import downloaders
from downloaders import HttpDownloader, UnsupportedDigestValidationError
from tests.support.clients import run_process
from tests.support.faults import Serve, StallAfterHeaders, Status

BODY = b"fetch me\n" * 1000
ROOT = str(Path(downloaders.__file__).resolve().parents[1])

SCRIPT = """
import json, sys
from downloaders import DownloadError, HttpDownloader
try:
    result = HttpDownloader(sys.argv[1], temp_dir=sys.argv[2], max_retries=0).fetch(timeout=30)
except DownloadError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
else:
    print(json.dumps({"attributes": result.artifact_attributes, "path": result.path}))
"""


TWICE = """
import json, sys, threading
from downloaders import DownloadTimeout, HttpDownloader

def reactor_threads():
    return [t.ident for t in threading.enumerate() if t.name == "downloaders-reactor"]

url, temp_dir, stalled = sys.argv[1:]
first = HttpDownloader(url, temp_dir=temp_dir).fetch(timeout=30)
after_first = reactor_threads()
second = HttpDownloader(url, temp_dir=temp_dir).fetch(timeout=30)
after_second = reactor_threads()
try:
    HttpDownloader(stalled, temp_dir=temp_dir).fetch(timeout=0.5)
except DownloadTimeout as error:
    timeout = str(error)
print(json.dumps({
    "paths": [first.path, second.path],
    "sha256": [first.artifact_attributes["sha256"], second.artifact_attributes["sha256"]],
    "threads": [after_first, after_second, reactor_threads()],
    "timeout": timeout,
}))
"""


def fetch_in_child(url: str, temp_dir: Path, *more: str, script: str = SCRIPT):
    env = {"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"}
    return run_process(sys.executable, "-c", script, url, str(temp_dir), *more, env=env, timeout=60)


@pytest_twisted.inlineCallbacks
def test_fetch_from_a_plain_thread(upstream, tmp_path: Path):
    url = upstream.register("/a", Serve(BODY))
    code, out, err = yield fetch_in_child(url, tmp_path)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["attributes"] == {
        "size": len(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(),
    }
    assert Path(answer["path"]).read_bytes() == BODY


@pytest_twisted.inlineCallbacks
def test_second_fetch_reuses_the_reactor_thread_and_timeout_names_the_url(upstream, tmp_path):
    url = upstream.register("/a", Serve(BODY))
    stalled = upstream.register("/stalled", StallAfterHeaders())
    code, out, err = yield fetch_in_child(url, tmp_path, stalled, script=TWICE)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["sha256"] == [hashlib.sha256(BODY).hexdigest()] * 2
    assert [Path(p).read_bytes() for p in answer["paths"]] == [BODY, BODY]
    first, second, third = answer["threads"]
    assert len(first) == 1 and first == second == third  # one reactor thread, started once
    assert answer["timeout"] == f"fetch timeout after 0.5s ({stalled})"
    assert len(upstream.requests("/a")) == 2


@pytest_twisted.inlineCallbacks
def test_fetch_raises_the_download_error(upstream, tmp_path: Path):
    url = upstream.register("/gone", Status(404))
    code, out, err = yield fetch_in_child(url, tmp_path)
    assert code == 0, err
    assert json.loads(out) == {"error": "NotFound", "message": f"HTTP 404 Not Found ({url})"}


def test_fetch_from_the_reactor_thread_is_refused(upstream):
    # pytest-twisted runs test bodies in the reactor thread's greenlet: the reactor thread.
    url = upstream.register("/a", Serve(BODY))
    with pytest.raises(RuntimeError, match="cannot be called from the reactor thread"):
        HttpDownloader(url).fetch()
    assert upstream.requests("/a") == []


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "foo"])
def test_unsupported_digest_refused_before_any_request(upstream, algorithm):
    url = upstream.register("/a", Serve(BODY))
    with pytest.raises(UnsupportedDigestValidationError) as caught:
        HttpDownloader(url, expected_digests={algorithm: "00"})
    assert caught.value.algorithm == algorithm
    message = str(caught.value)
    assert message.startswith(f"unsupported or untrusted digest algorithm {algorithm!r}")
    assert message.endswith(f"({url})")
    assert upstream.requests("/a") == []


STOPPED = """
import sys
from twisted.internet import reactor
from downloaders import HttpDownloader
reactor.callWhenRunning(reactor.stop)
reactor.run()
try:
    HttpDownloader(sys.argv[1], temp_dir=sys.argv[2]).fetch(timeout=30)
except RuntimeError as error:
    print(error)
"""


@pytest_twisted.inlineCallbacks
def test_fetch_after_the_reactor_stopped_is_a_clear_error(upstream, tmp_path: Path):
    url = upstream.register("/a", Serve(BODY))
    code, out, err = yield fetch_in_child(url, tmp_path, script=STOPPED)
    assert code == 0, err
    assert b"already run and stopped" in out
    assert upstream.requests("/a") == []
