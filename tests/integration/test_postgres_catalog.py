"""The real commands on a PostgreSQL catalog (the session's private cluster): ``streamer
migrate``, ``streamer sync``, ``twistd -n streamer`` serving and storing, ``streamer verify``;
and the refusals at start, each one line and a non-zero exit: no server, a schema newer than
the code, a storage folder the catalog does not belong to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest_twisted

from tests.integration.test_end_to_end import (
    artifact_path,
    sha256,
    streamer_cli,
    write_config,
    write_repo,
)
from tests.support.clients import free_port
from tests.support.twistd import start_twistd, twistd
from tests.support.upstream import UpstreamServer

FILES = {"a.txt": b"alpha\n", "pkg/b.bin": os.urandom(200_000)}


def rows(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def pg_config(folder: Path, manifest_url: str, catalog_url: str, storage: str = "var") -> Path:
    config = write_config(folder, manifest_url, extra=f'[catalog]\nurl = "{catalog_url}"\n')
    text = config.read_text().replace('path = "var"', f'path = "{storage}"')
    config.write_text(text)
    return config


async def twistd_exit(config: Path, timeout: float = 20.0) -> tuple[int | None, str]:
    """Run ``twistd -n streamer --config CONFIG`` expecting it to give up: (status, output)."""
    child = start_twistd(config.parent, ["--config", str(config)])
    code = await child.exited(timeout)
    return code, child.output


def one_error_line(output: str, marker: str) -> str:
    """The single line of *output* holding *marker* (and no traceback anywhere)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if marker in line]
    assert len(lines) == 1, output
    return lines[0]


@pytest_twisted.ensureDeferred
async def test_migrate_sync_serve_and_verify_through_postgresql(
    tmp_path, upstream: UpstreamServer, postgres_url
):
    folder = tmp_path / "upstream"
    folder.mkdir()
    write_repo(folder, FILES)
    upstream.serve_tree("/repo", folder)
    config = pg_config(tmp_path, upstream.url("/repo/PULP_MANIFEST"), postgres_url)

    code, out, err = await streamer_cli(config, "migrate")
    assert (code, err) == (0, "")
    assert out.strip().endswith("schema version 1 (created)")
    assert "@" not in out or "postgres@" in out  # the user, never a password

    code, out, err = await streamer_cli(config, "sync")
    assert code == 0, out + err
    assert rows(postgres_url, "SELECT path, stored FROM catalog_entries ORDER BY path") == [
        ("demo/a.txt", False),
        ("demo/pkg/b.bin", False),
    ]
    upstream.clear_log()
    async with twistd(config) as served:
        for name, data in FILES.items():
            code, body, err = await served.curl(f"/demo/{name}")
            assert (code, body) == (0, data), err  # cold: streamed from upstream, stored
        for name, data in FILES.items():
            code, body, err = await served.curl(f"/demo/{name}")
            assert (code, body) == (0, data), err  # warm: from the store
        code, body, _ = await served.curl("/demo/pkg/")
        assert b'href="b.bin"' in body
        assert await served.stop() == 0, served.output
    assert len(upstream.all_requests()) == len(FILES)
    for data in FILES.values():
        assert artifact_path(tmp_path / "var", data).read_bytes() == data
    assert rows(postgres_url, "SELECT bool_and(stored) FROM catalog_entries") == [(True,)]
    recorded = rows(postgres_url, "SELECT value FROM catalog_meta WHERE key = 'storage_id'")
    assert recorded == [((tmp_path / "var" / "storage-id").read_text().strip(),)]

    # verify unmarks a damaged artifact in the PostgreSQL catalog, so it is fetched again
    artifact_path(tmp_path / "var", FILES["a.txt"]).write_bytes(b"rotten\n")
    code, out, err = await streamer_cli(config, "verify")
    assert code == 1 and "1 bad" in out, out + err
    assert rows(
        postgres_url,
        "SELECT stored FROM catalog_entries WHERE sha256 = %s",
        (sha256(FILES["a.txt"]),),
    ) == [(False,)]

    # A second node whose [storage] path is another folder is refused at start.
    other = tmp_path / "node2"
    other.mkdir()
    config2 = pg_config(other, upstream.url("/repo/PULP_MANIFEST"), postgres_url)
    code, output = await twistd_exit(config2)
    assert code not in (0, None), output
    line = one_error_line(output, "belongs to the storage folder")
    assert str(other / "var") in line
    code, out, err = await streamer_cli(config2, "sync")
    assert code == 1 and err.count("\n") == 1 and "belongs to the storage folder" in err


@pytest_twisted.ensureDeferred
async def test_no_database_at_start_is_one_line_and_a_failure(tmp_path):
    port = free_port()  # nothing listens there
    url = f"postgresql://streamer:s3cret@127.0.0.1:{port}/catalog"
    config = pg_config(tmp_path, "http://127.0.0.1:1/PULP_MANIFEST", url)
    code, output = await twistd_exit(config)
    assert code not in (0, None), output
    line = one_error_line(output, "cannot open the catalog")
    assert f"postgresql://streamer@127.0.0.1:{port}/catalog" in line
    assert "s3cret" not in output
    for command in ("sync", "migrate"):
        code, out, err = await streamer_cli(config, command)
        assert code == 1, out + err
        assert err.count("\n") == 1 and "Connection refused" in err and "s3cret" not in err, err


@pytest_twisted.ensureDeferred
async def test_a_schema_newer_than_the_code_is_refused_at_start(tmp_path, postgres_url):
    config = pg_config(tmp_path, "http://127.0.0.1:1/PULP_MANIFEST", postgres_url)
    code, out, err = await streamer_cli(config, "migrate")
    assert code == 0, out + err
    rows(
        postgres_url, "UPDATE catalog_meta SET value = '7' WHERE key = 'schema_version' RETURNING 1"
    )
    code, output = await twistd_exit(config)
    assert code not in (0, None), output
    one_error_line(output, "schema version 7, newer than this streamer supports")
    code, out, err = await streamer_cli(config, "migrate")
    assert code == 1 and err.count("\n") == 1 and "newer than this streamer" in err
    code, out, err = await streamer_cli(config, "sync")
    assert code == 1 and err.count("\n") == 1 and "newer than this streamer" in err
