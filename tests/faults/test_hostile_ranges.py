"""Range requests against the whole service (in-process `StreamerService`, real sockets, curl).

Ranges on cold content never complete before the whole artifact was validated: the bytes of
the range flow as they arrive, but the last byte of the answer waits for the size and digest
check, and a bad artifact (wrong bytes of the right size) ends every range answer in an aborted
connection, with nothing stored. Many ranges, as zchunk asks for, are merged and answered in
one multipart response; range amplification still gets the whole file.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import random
import shutil

import pytest
import pytest_twisted

from store import CatalogEntry
from streamer.inflight import MEMORY_BODY
from tests.faults.test_hostile_clients import assert_serving, request, status_of
from tests.support import faults
from tests.support.clients import RawResult, raw_http, run_curl, run_process
from tests.support.polling import holds_within
from tests.support.service import ServiceEnv

# More than the streamer holds in memory until validated: these bytes stream as they arrive
# (WrongBytes flips the middle byte).
BODY = bytes(range(256)) * (MEMORY_BODY // 256 + 16)
SIZE = len(BODY)

#: Range header values and the content bytes (in order) each selects.
CASES = {
    "single": ("0-99", [BODY[:100]]),
    "suffix": ("-100", [BODY[-100:]]),
    "multipart": ("0-99,1000-1099", [BODY[:100], BODY[1000:1100]]),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP response."""
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status_of(data), headers, body


def parts_of(content_type: bytes, body: bytes) -> list[tuple[str, bytes]]:
    """``(Content-Range, payload)`` of each part of a multipart/byteranges body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type + b"\r\n\r\n" + body
    )
    return [(p["Content-Range"], p.get_payload(decode=True)) for p in message.iter_parts()]


async def ranged_get(env: ServiceEnv, path: str, ranges: str) -> RawResult:
    header = "Range: bytes=" + ranges
    return await raw_http("127.0.0.1", env.port, request(f"/fixtures/{path}", header), 10)


async def cold_pair(make_service, upstream, policy: str, behaviour: faults.Behaviour):
    """A service whose lazy ``raw.bin`` and ``curl.bin`` (one per client, as a failure puts
    its source on a cooldown) are answered by *behaviour* upstream."""
    env = await make_service(policy=policy)
    for name in ("raw.bin", "curl.bin"):
        url = upstream.register(f"/{name}", behaviour)
        await env.add(name, BODY, stored=False, url=url)
    return env


# --- item: ranges on cold content are not complete before the artifact is validated ------------


@pytest.mark.parametrize("policy", ["on_demand", "streamed"])
@pytest.mark.parametrize("case", CASES)
@pytest_twisted.ensureDeferred
async def test_range_of_a_bad_cold_artifact_ends_in_an_abort(make_service, upstream, case, policy):
    ranges, expected = CASES[case]
    # The fault upstream sends bytes of the right size whose middle byte is wrong (slowly, so
    # the client reads what it got before the abort): every range here selects only right
    # bytes, yet the artifact is bad.
    wrong = faults.Trickle(faults.WrongBytes(BODY).served, 4 * SIZE, interval=0.02)
    env = await cold_pair(make_service, upstream, policy, wrong)

    result = await ranged_get(env, "raw.bin", ranges)
    assert not result.timed_out
    assert not result.clean, "the connection must be aborted, not closed cleanly"
    # A 206 with everything up to the last byte of the last range (never that byte, nor a
    # trailer); a suffix range's bytes come with the artifact's end, so the reset that
    # follows at once may overtake them.
    if case != "suffix" or result.data:
        status, headers, body = split_response(result.data)
        assert status == 206
        assert len(body) < int(headers[b"content-length"])
        assert body.endswith(expected[-1][:-1])

    code, out, err = await run_curl("-r", ranges, env.url("fixtures/curl.bin"))
    assert code in (18, 56), (code, err)  # partial file / connection reset
    assert expected[-1] not in out, "the last range must never arrive complete"

    assert await holds_within(lambda: not env.lazy.in_flight and env.temp_files() == [])
    assert not env.storage.has(sha256(BODY))
    assert not any(e.stored for e in await env.catalog.lookup("fixtures/raw.bin"))
    await assert_serving(env)


@pytest.mark.parametrize("policy", ["on_demand", "streamed"])
@pytest.mark.parametrize("case", CASES)
@pytest_twisted.ensureDeferred
async def test_range_of_a_good_cold_artifact_is_a_whole_206(make_service, upstream, case, policy):
    ranges, expected = CASES[case]
    env = await cold_pair(make_service, upstream, policy, faults.Serve(BODY))

    result = await ranged_get(env, "raw.bin", ranges)
    status, headers, body = split_response(result.data)
    assert status == 206 and result.clean and len(body) == int(headers[b"content-length"])
    if len(expected) == 1:
        assert body == expected[0]
    else:
        assert [p for _, p in parts_of(headers[b"content-type"], body)] == expected

    code, out, err = await run_curl("-f", "-r", ranges, env.url("fixtures/curl.bin"))
    assert code == 0, err
    assert len(out) == len(body) and all(part in out for part in expected)

    # The range client kept the download going to the end: on_demand stores it.
    stored = policy == "on_demand"
    assert await holds_within(lambda: env.storage.has(sha256(BODY)) == stored)
    assert await holds_within(lambda: not env.lazy.in_flight and env.temp_files() == [])
    await assert_serving(env)


@pytest_twisted.ensureDeferred
async def test_one_byte_range_of_a_bad_source_fails_over(make_service, upstream):
    """A range whose only byte is its last one sends nothing before validation, so a bad
    first source can still be replaced by the next one without the client noticing."""
    env = await make_service()
    bad = upstream.register("/bad.bin", faults.WrongBytes(BODY))
    good = upstream.register("/good.bin", faults.Serve(BODY))
    await env.add("one.bin", BODY, stored=False, url=bad)
    entry = (await env.catalog.lookup("fixtures/one.bin"))[0]
    second = CatalogEntry(entry.path, "fixtures", good, SIZE, entry.digests, position=1)
    await env.catalog.replace_remote("fixtures", [entry, second])

    result = await ranged_get(env, "one.bin", "0-0")
    status, headers, body = split_response(result.data)
    assert status == 206 and result.clean and body == BODY[:1]
    assert headers[b"content-range"] == b"bytes 0-0/%d" % SIZE
    assert [len(upstream.requests(p)) for p in ("/bad.bin", "/good.bin")] == [1, 1]
    assert await holds_within(lambda: env.storage.has(sha256(BODY)))
    await assert_serving(env)


# --- item: many ranges are merged, then limited (not by their raw count) ---------------------

#: 150 small disjoint ranges, as zchunk's downloader asks for the chunks it lacks.
ZCHUNK_LIKE = [(i * 400, i * 400 + 99) for i in range(150)]


def requests_answered(env: ServiceEnv, status: int) -> int:
    """GET requests the service answered with *status* so far (its own metrics)."""
    labels = {"method": "GET", "status": str(status)}
    return int(env.service.metrics.value("streamer_requests_total", labels))


async def ranges_target(make_service, upstream, stored: bool) -> ServiceEnv:
    env = await make_service()
    url = upstream.register("/many.bin", faults.Serve(BODY))
    await env.add("many.bin", BODY, stored=stored, url=url)
    return env


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_150_small_ranges_get_one_multipart_answer(make_service, upstream, stored):
    env = await ranges_target(make_service, upstream, stored)
    spec = ",".join(f"{first}-{last}" for first, last in ZCHUNK_LIKE)
    result = await ranged_get(env, "many.bin", spec)
    status, headers, body = split_response(result.data)
    assert status == 206 and len(body) == int(headers[b"content-length"])
    parts = parts_of(headers[b"content-type"], body)
    assert parts == [(f"bytes {a}-{b}/{SIZE}", BODY[a : b + 1]) for a, b in ZCHUNK_LIKE]
    # The client's order is kept, and touching ranges are merged, whatever their order.
    result = await ranged_get(env, "many.bin", "2000-2099,0-99,100-199,1950-1999")
    status, headers, body = split_response(result.data)
    assert status == 206
    assert parts_of(headers[b"content-type"], body) == [
        (f"bytes 1950-2099/{SIZE}", BODY[1950:2100]),
        (f"bytes 0-199/{SIZE}", BODY[:200]),
    ]
    assert len(upstream.requests("/many.bin")) == (0 if stored else 1)
    await assert_serving(env)


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_150_overlapping_ranges_covering_the_file_are_merged(make_service, upstream, stored):
    env = await ranges_target(make_service, upstream, stored)
    step = (SIZE - 1000) // 149  # overlapping 1000-byte spans, the last one to the end
    spans = [f"{i * step}-{i * step + 999}" for i in range(149)] + [f"{149 * step}-"]
    random.Random(11).shuffle(spans)
    result = await ranged_get(env, "many.bin", ",".join(spans))
    status, headers, body = split_response(result.data)
    assert status == 206 and headers[b"content-range"] == b"bytes 0-%d/%d" % (SIZE - 1, SIZE)
    assert body == BODY
    await assert_serving(env)


@pytest.mark.parametrize(
    "spec",
    [
        ",".join(f"{i * 2}-{i * 2}" for i in range(1200)),
        ",".join(f"{i * 90}-{i * 90}" for i in range(700)),
        ",".join(f"{i * 1000}-{i * 1000 + 9}" for i in reversed(range(30))),
    ],
    ids=["1200-one-byte-parts", "framing-larger-than-the-file", "30-parts-descending"],
)
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_range_amplification_gets_the_whole_file(make_service, upstream, stored, spec):
    """Too many parts after merging, a multipart body longer than the file, or many parts out
    of order: the Range header is ignored and the answer is the whole file (200), as before."""
    env = await ranges_target(make_service, upstream, stored)
    result = await ranged_get(env, "many.bin", spec)
    status, headers, body = split_response(result.data)
    assert status == 200 and body == BODY
    assert b"content-range" not in headers
    await assert_serving(env)


ZCKDL = shutil.which("zckdl")


@pytest.mark.skipif(ZCKDL is None or shutil.which("zck") is None, reason="zchunk not installed")
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_zckdl_fetches_150_missing_chunks_in_one_request(
    make_service, upstream, tmp_path, stored
):
    """zchunk's own downloader: from an old version, 150 changed chunks of the new one come in
    one multipart answer (after two for the header), never as the whole file."""
    rng = random.Random(2)

    def record(i: int) -> str:
        return f"<package n={i}>" + "".join(rng.choices("abcdefghij", k=1000)) + "\n"

    records = [record(i) for i in range(400)]
    (tmp_path / "old.xml").write_text("".join(records))
    for i in range(0, 300, 2):  # 150 changed chunks, none adjacent
        records[i] = record(i)
    (tmp_path / "new.xml").write_text("".join(records))
    for name in ("old.xml", "new.xml"):
        code, _, err = await run_process("zck", "-s", "<package", name, cwd=str(tmp_path))
        assert code == 0, err
    new = (tmp_path / "new.xml.zck").read_bytes()
    out = tmp_path / "client"
    out.mkdir()
    (out / "seed.zck").write_bytes((tmp_path / "old.xml.zck").read_bytes())

    env = await make_service()
    url = upstream.register("/repodata/primary.xml.zck", faults.Serve(new))
    await env.add("repodata/primary.xml.zck", new, stored=stored, url=url)
    code, stdout, stderr = await run_process(
        "zckdl",
        "--fail-no-ranges",
        "-s",
        "seed.zck",
        env.url("fixtures/repodata/primary.xml.zck"),
        cwd=str(out),
    )
    assert code == 0, stdout + stderr
    assert (out / "primary.xml.zck").read_bytes() == new
    assert b"Missing chunks: 150" in stdout + stderr
    assert requests_answered(env, 206) == 3 and requests_answered(env, 200) == 0
    await assert_serving(env)
