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

import pytest
import pytest_twisted

from store import CatalogEntry
from tests.faults.service_env import ServiceEnv, settle
from tests.faults.test_hostile_clients import assert_serving, request, status_of
from tests.support import faults
from tests.support.clients import RawResult, raw_http, run_curl

BODY = bytes(range(256)) * 256  # 64 KiB; WrongBytes flips byte 32768
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
    # The fault upstream sends 64 KiB of the right size whose middle byte is wrong (slowly, so
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

    assert await settle(lambda: not env.lazy.in_flight and env.temp_files() == [])
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
    assert await settle(lambda: env.storage.has(sha256(BODY)) == stored)
    assert await settle(lambda: not env.lazy.in_flight and env.temp_files() == [])
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
    assert await settle(lambda: env.storage.has(sha256(BODY)))
    await assert_serving(env)
