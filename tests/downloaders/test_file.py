"""FileDownloader: only under the allowed import paths, by path components after symlinks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from downloaders import (
    DigestValidationError,
    DownloadError,
    FileDownloader,
    FileNotFound,
    ForbiddenPath,
    NotFound,
    SizeValidationError,
    ValidationError,
)
from tests.support.polling import until

BODY = os.urandom(3 * 256 * 1024 + 123)  # several chunks and a partial one
SHA256 = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``allowed/`` with a file, ``allowed_evil/`` and ``outside/`` beside it, ``tmp/``."""
    for name in ("allowed", "allowed_evil", "outside", "tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "allowed" / "sub").mkdir()
    (tmp_path / "allowed" / "sub" / "a.bin").write_bytes(BODY)
    (tmp_path / "allowed_evil" / "a.bin").write_bytes(BODY)
    (tmp_path / "outside" / "secret").write_bytes(b"secret\n")
    return tmp_path


def downloader(tree: Path, path: Path, **kwargs) -> FileDownloader:
    kwargs.setdefault("allowed_import_paths", [str(tree / "allowed")])
    return FileDownloader(path.as_uri(), temp_dir=str(tree / "tmp"), **kwargs)


@pytest_twisted.inlineCallbacks
def test_file_inside_allowed_path(tree: Path):
    source = tree / "allowed" / "sub" / "a.bin"
    result = yield downloader(
        tree, source, expected_digests={"sha256": SHA256}, expected_size=len(BODY)
    ).run()
    assert result.url == source.as_uri()
    assert result.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    assert Path(result.path).read_bytes() == BODY
    assert Path(result.path).parent == tree / "tmp"
    assert result.headers is None


@pytest_twisted.inlineCallbacks
def test_symlink_inside_allowed_path_is_fine(tree: Path):
    link = tree / "allowed" / "link.bin"
    link.symlink_to(tree / "allowed" / "sub" / "a.bin")
    result = yield downloader(tree, link).run()
    assert result.artifact_attributes["sha256"] == SHA256


@pytest_twisted.inlineCallbacks
def test_outside_allowed_paths(tree: Path):
    source = tree / "outside" / "secret"
    with pytest.raises(ForbiddenPath) as caught:
        yield downloader(tree, source).run()
    assert str(caught.value) == (
        f"{source} is outside the allowed import paths ({tree / 'allowed'}) ({source.as_uri()})"
    )
    assert os.listdir(tree / "tmp") == []


@pytest_twisted.inlineCallbacks
def test_prefix_trick_is_not_inside(tree: Path):
    with pytest.raises(ForbiddenPath):
        yield downloader(tree, tree / "allowed_evil" / "a.bin").run()


@pytest_twisted.inlineCallbacks
def test_dot_dot_escape(tree: Path):
    url = (tree / "allowed").as_uri() + "/../outside/secret"
    with pytest.raises(ForbiddenPath):
        yield FileDownloader(url, allowed_import_paths=[str(tree / "allowed")]).run()


@pytest_twisted.inlineCallbacks
def test_symlink_escape_is_refused(tree: Path):
    link = tree / "allowed" / "escape"
    link.symlink_to(tree / "outside" / "secret")
    with pytest.raises(ForbiddenPath, match="outside the allowed import paths"):
        yield downloader(tree, link).run()
    folder_link = tree / "allowed" / "dir-escape"
    folder_link.symlink_to(tree / "outside", target_is_directory=True)
    with pytest.raises(ForbiddenPath):
        yield downloader(tree, folder_link / "secret").run()


@pytest_twisted.inlineCallbacks
def test_no_allowed_paths_refuses_everything(tree: Path):
    with pytest.raises(ForbiddenPath, match="no allowed import paths are configured"):
        yield downloader(tree, tree / "allowed" / "sub" / "a.bin", allowed_import_paths=[]).run()


@pytest_twisted.inlineCallbacks
def test_missing_file_is_not_found(tree: Path):
    missing = tree / "allowed" / "nope.bin"
    with pytest.raises(FileNotFound) as caught:
        yield downloader(tree, missing).run()
    assert isinstance(caught.value, NotFound)
    assert caught.value.path == str(missing)
    assert str(caught.value) == f"no such file: {missing} ({missing.as_uri()})"
    assert not caught.value.retryable


@pytest_twisted.inlineCallbacks
def test_folder_is_not_a_file(tree: Path):
    with pytest.raises(DownloadError, match="not a regular file"):
        yield downloader(tree, tree / "allowed" / "sub").run()


def test_remote_host_refused(tree: Path):
    with pytest.raises(ForbiddenPath, match="must be local"):
        FileDownloader("file://example.org/etc/passwd", allowed_import_paths=["/"])


@pytest_twisted.inlineCallbacks
def test_validation_failures_leave_no_file(tree: Path, assert_no_temp_files):
    source = tree / "allowed" / "sub" / "a.bin"
    with pytest.raises(DigestValidationError):
        yield downloader(tree, source, expected_digests={"sha256": "0" * 64}).run()
    with pytest.raises(SizeValidationError) as caught:
        yield downloader(tree, source, expected_size=1000).run()
    assert caught.value.actual <= 1000 + 256 * 1024  # stopped at the first chunk too many
    with pytest.raises(SizeValidationError):
        yield downloader(tree, source, expected_size=len(BODY) + 1).run()
    assert_no_temp_files(tree / "tmp")


@pytest_twisted.inlineCallbacks
def test_cancel_removes_temp_file(tree: Path, assert_no_temp_files):
    source = tree / "allowed" / "big.bin"
    with open(source, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    file_downloader = downloader(tree, source)
    d = file_downloader.run()
    yield until(lambda: file_downloader.artifact_attributes["size"] > 0)
    assert len(os.listdir(tree / "tmp")) == 1
    d.cancel()
    assert file_downloader.artifact_attributes["size"] < 256 * 1024 * 1024
    with pytest.raises(defer.CancelledError):
        yield d
    assert_no_temp_files(tree / "tmp")


@pytest_twisted.inlineCallbacks
def test_empty_file_gives_an_empty_temp_file(tree: Path):
    source = tree / "allowed" / "empty"
    source.write_bytes(b"")
    result = yield downloader(tree, source, expected_size=0).run()
    assert result.artifact_attributes == {"size": 0, "sha256": hashlib.sha256().hexdigest()}
    assert Path(result.path).read_bytes() == b""


@pytest_twisted.inlineCallbacks
def test_writer_takes_the_bytes(tree: Path):
    received: list[bytes] = []
    writer = type("Writer", (), {"write": lambda self, data: received.append(data)})()
    source = tree / "allowed" / "sub" / "a.bin"
    result = yield downloader(
        tree, source, writer=writer, expected_digests={"sha256": SHA256}
    ).run()
    assert result.path is None
    assert b"".join(received) == BODY
    assert len(received) == 4  # read and handed over chunk by chunk
    assert os.listdir(tree / "tmp") == []


@pytest_twisted.inlineCallbacks
def test_a_path_not_allowed_is_a_validation_error_as_in_pulp(tree: Path):
    """Pulp's FileDownloader raises its ValidationError for a url outside the allowed import
    paths; an importer catching that catches ours, whose summary still names no path."""
    with pytest.raises(ValidationError) as caught:
        yield downloader(tree, tree / "outside" / "secret").run()
    assert isinstance(caught.value, ForbiddenPath)
    assert caught.value.error_code == "forbidden-path"
    assert caught.value.summary == "path not allowed"
    assert "outside the allowed import paths" in caught.value.message
