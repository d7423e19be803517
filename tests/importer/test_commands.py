"""The sync and fetch commands in process: the CLI's remote selection, `run_sync` over a real
config and `run_fetch`; and the importer's halves, called with plain values (remotes, a
storage, a catalog), as code that is not the command line calls them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import attrs
import pytest
import pytest_twisted

from downloaders import DigestValidationError, SizeValidationError
from importer import Remote, SyncError, SyncReport, download_url, remote_for_url, sync_remotes
from store import open_catalog, open_for_storage
from streamer.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    run_fetch,
    run_sync,
    select_remotes,
    sync_command,
)
from streamer.config import parse_config
from tests.importer.conftest import sha
from tests.support.faults import Serve, WrongBytes


def make_config(tmp_path, upstream, **remote):
    table = {"name": "fixtures", "url": upstream.url("/repo/PULP_MANIFEST"), "max_retries": 0}
    table.update(remote)
    return parse_config(
        {
            "storage": {"path": "var"},
            "remotes": [table, {"name": "other", "url": upstream.url("/repo/PULP_MANIFEST")}],
        },
        str(tmp_path),
    )


def test_select_remotes(tmp_path, upstream):
    config = make_config(tmp_path, upstream)
    assert [r.name for r in select_remotes(config, [])] == ["fixtures", "other"]
    assert [r.name for r in select_remotes(config, ["other", "other"])] == ["other"]
    with pytest.raises(ValueError, match=r"unknown remote 'nope' \(known: fixtures, other\)"):
        select_remotes(config, ["fixtures", "nope"])


def test_sync_command_unknown_remote_is_a_usage_error(tmp_path, upstream, capsys):
    assert sync_command(make_config(tmp_path, upstream), ["nope"]) == EXIT_USAGE
    assert capsys.readouterr().err == "error: unknown remote 'nope' (known: fixtures, other)\n"


@pytest_twisted.ensureDeferred
async def test_sync_remotes_prints_summaries_and_exit_status(tmp_path, upstream, repo):
    config = make_config(tmp_path, upstream, policy="immediate")
    out, err = io.StringIO(), io.StringIO()
    remotes = select_remotes(config, ["fixtures"])
    assert await run_sync(config, remotes, None, out, err) == EXIT_OK
    assert out.getvalue().startswith("fixtures: 10 downloaded, 0 already present")

    upstream.register("/repo/files/03.bin", WrongBytes(repo.files["files/03.bin"]))
    (tmp_path / "var" / "artifacts").joinpath(
        sha(repo.files["files/03.bin"])[:2], sha(repo.files["files/03.bin"])[2:]
    ).unlink()
    out = io.StringIO()
    assert await run_sync(config, config.remotes, None, out, err) == EXIT_FAILED
    text = out.getvalue()
    assert "fixtures: 0 downloaded, 9 already present" in text
    assert f"  failed: {upstream.url('/repo/files/03.bin')}: sha256 mismatch" in text
    assert "other: 0 downloaded, 0 already present, 10 recorded lazily" in text
    assert err.getvalue() == ""

    catalog = open_catalog(config.catalog.url, config.storage.path)
    await catalog.open()
    try:
        assert await catalog.count() == 20
    finally:
        await catalog.close()


@pytest_twisted.ensureDeferred
async def test_run_sync_closes_the_catalog_while_its_helpers_exit(
    tmp_path, upstream, repo, monkeypatch
):
    """The helpers are told to stop (their connections closed), then the catalog closes
    while they exit: its close (SQLite's last checkpoint) does not wait for their exit,
    nor theirs for it. Both are done when the sync's status is known."""
    import streamer.cli as cli
    from importer.helpers.process import SyncHelpers

    events: list[tuple[str, list[bool]]] = []
    helpers = SyncHelpers(1).start()
    opened, closing = cli._open_catalog, helpers.close

    def open_catalog(*args, **kwargs):
        catalog = opened(*args, **kwargs)
        close = catalog.close

        def close_catalog():
            events.append(("catalog closes", [link.alive for link in helpers.links]))
            return close()

        catalog.close = close_catalog
        return catalog

    def close_helpers():
        exited = closing()
        return exited.addCallback(lambda _: events.append(("helpers exited", [])))

    monkeypatch.setattr(cli, "_open_catalog", open_catalog)
    monkeypatch.setattr(helpers, "close", close_helpers)
    config = make_config(tmp_path, upstream, policy="immediate")
    out, err = io.StringIO(), io.StringIO()
    remotes = select_remotes(config, ["fixtures"])
    assert await run_sync(config, remotes, None, out, err, helpers=helpers) == EXIT_OK
    assert events == [("catalog closes", [False]), ("helpers exited", [])]
    assert [process.poll() for process in helpers.processes] == [0]
    assert out.getvalue().startswith("fixtures: 10 downloaded")


@pytest_twisted.ensureDeferred
async def test_sync_remotes_reports_a_broken_remote_and_goes_on(tmp_path, upstream, repo):
    config = make_config(tmp_path, upstream, url=upstream.url("/missing/PULP_MANIFEST"))
    out, err = io.StringIO(), io.StringIO()
    assert await run_sync(config, config.remotes, None, out, err) == EXIT_FAILED
    assert err.getvalue().startswith("error: sync fixtures: cannot fetch the listing: HTTP 404")
    assert out.getvalue().startswith("other: 0 downloaded, 0 already present, 10 recorded")


@pytest_twisted.ensureDeferred
async def test_fetch_url_writes_the_output_and_prints_size_and_sha256(tmp_path, upstream):
    body = b"one file for scripts\n" * 100
    url = upstream.register("/one.bin", Serve(body))
    out = io.StringIO()
    target = tmp_path / "one.bin"
    await run_fetch(
        make_config(tmp_path, upstream), url, sha(body).upper(), len(body), str(target), out
    )
    assert target.read_bytes() == body
    assert out.getvalue().splitlines() == [
        f"size: {len(body)}",
        f"sha256: {sha(body)}",
        f"written: {target}",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["one.bin"]


@pytest_twisted.ensureDeferred
async def test_fetch_url_without_output_writes_the_urls_file_name(tmp_path, upstream, monkeypatch):
    # As curl -O and wget do; it used to leave a hidden temporary file in /tmp.
    url = upstream.register("/files/x.bin", Serve(b"xyz"))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    await run_fetch(make_config(tmp_path, upstream), url, out=out)
    assert out.getvalue().splitlines()[-1] == "written: x.bin"
    assert (tmp_path / "x.bin").read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("expect", "error"),
    [({"sha256": "0" * 64}, DigestValidationError), ({"size": 4}, SizeValidationError)],
)
@pytest_twisted.ensureDeferred
async def test_fetch_url_validation_failure_leaves_no_file(tmp_path, upstream, expect, error):
    url = upstream.register("/x", Serve(b"xyz"))
    target = tmp_path / "out" / "x"
    target.parent.mkdir()
    with pytest.raises(error):
        await run_fetch(
            make_config(tmp_path, upstream), url, output=str(target), out=io.StringIO(), **expect
        )
    assert list(target.parent.iterdir()) == []


def test_fetch_uses_the_settings_of_a_remote_on_the_same_origin(tmp_path, upstream):
    config = make_config(tmp_path, upstream, username="u", password="p")
    assert remote_for_url(config.remotes, upstream.url("/elsewhere")).name == "fixtures"
    plain = remote_for_url(config.remotes, "http://127.0.0.2:9/x")
    assert (plain.name, plain.username) == ("fetch", "")


def test_fetch_matches_the_origin_with_its_default_port_spelled_out(tmp_path, upstream):
    """``http://host/`` and ``HTTP://HOST:80/`` are one origin (the downloaders' `origin`)."""
    config = make_config(tmp_path, upstream)
    remote = attrs.evolve(config.remotes[0], url="http://mirror.example/dists/x/Release")
    config = attrs.evolve(config, remotes=[remote])
    assert remote_for_url(config.remotes, "HTTP://Mirror.Example:80/pool/a.deb").name == remote.name
    assert remote_for_url(config.remotes, "http://mirror.example:8080/pool/a.deb").name == "fetch"


@pytest_twisted.ensureDeferred
async def test_the_importer_syncs_remotes_given_plain_values(
    upstream, repo, storage, catalog, make_remote
):
    """No configuration object: a list of remotes, a storage and an open catalog. Each remote
    is reported as it ends, a broken one does not stop the next, and each is closed."""
    good = make_remote("immediate")
    broken = make_remote("immediate", name="broken", url=upstream.url("/missing/PULP_MANIFEST"))
    heard: list[tuple[str, object]] = []
    await open_for_storage(catalog, storage)
    outcomes = await sync_remotes(
        [broken, good], catalog, storage, reported=lambda r, o: heard.append((r.name, o))
    )
    assert [(name, type(outcome)) for name, outcome in heard] == [
        ("broken", SyncError),
        (good.name, SyncReport),
    ]
    assert outcomes == [outcome for _, outcome in heard]
    assert outcomes[1].downloaded == len(repo.files) and outcomes[1].ok
    assert storage.has(sha(repo.files["files/00.bin"]))
    assert good._factory is None and broken._factory is None  # each remote was closed


@pytest_twisted.ensureDeferred
async def test_the_importer_downloads_one_url_given_a_remote(tmp_path, upstream):
    """`download_url`: the validated bytes in a temporary file the caller owns; a failure
    leaves nothing behind in the folder named."""
    body = b"plain values\n" * 50
    url = upstream.register("/plain.bin", Serve(body))
    remote = remote_for_url([], url)
    assert remote == Remote(name="fetch", url=url)
    result = await download_url(remote, url, sha(body), len(body), str(tmp_path))
    assert Path(result.path).read_bytes() == body
    os.unlink(result.path)
    with pytest.raises(SizeValidationError):
        await download_url(remote, url, size=len(body) + 1, temp_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
