"""ArtifactStorage.commit's short path: files already in the artifacts' mode are renamed
without being reopened, and the ``artifacts/xx`` folders are made once."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat

import pytest

from store import ArtifactStorage, StorageError


def _temp(storage: ArtifactStorage, data: bytes, mode: int) -> tuple[str, str]:
    path = os.path.join(storage.temp_dir, "part-x")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.close(fd)
    os.chmod(path, mode)  # whatever the umask
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", [0o600, 0o644])
@pytest.mark.parametrize("durable", [True, False])
def test_commit_gives_artifact_mode(tmp_path, mode: int, durable: bool) -> None:
    storage = ArtifactStorage(tmp_path)
    path, sha256 = _temp(storage, b"hello", mode)
    dest = storage.commit(path, sha256, 5, durable=durable)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644
    assert not os.path.exists(path)
    with storage.open(sha256) as f:
        assert f.read() == b"hello"


def test_commit_short_path_still_checks_size_and_symlinks(tmp_path) -> None:
    storage = ArtifactStorage(tmp_path)
    path, sha256 = _temp(storage, b"hello", 0o644)
    with pytest.raises(StorageError, match="size mismatch"):
        storage.commit(path, sha256, 6, durable=False)
    assert not os.path.exists(path) and not storage.has(sha256)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"hello")
    os.chmod(target, 0o644)
    link = os.path.join(storage.temp_dir, "part-link")
    os.symlink(target, link)
    with pytest.raises(StorageError, match="not a regular file"):
        storage.commit(link, sha256, 5, durable=False)
    assert not storage.has(sha256) and target.read_bytes() == b"hello"


def test_commit_remakes_a_folder_removed_after_first_use(tmp_path) -> None:
    storage = ArtifactStorage(tmp_path)
    path, sha256 = _temp(storage, b"one", 0o644)
    dest = storage.commit(path, sha256, 3, durable=False)
    shutil.rmtree(os.path.dirname(dest))  # removed by hand, while the storage object lives
    path, sha256 = _temp(storage, b"one", 0o644)
    assert storage.commit(path, sha256, 3, durable=False) == dest
    assert os.path.isfile(dest)


@pytest.mark.parametrize("no_replace", [True, False])
def test_commit_of_stored_content_keeps_the_artifact(tmp_path, monkeypatch, no_replace) -> None:
    import store.storage

    monkeypatch.setattr(store.storage, "_no_replace_works", no_replace)
    storage = ArtifactStorage(tmp_path)
    path, sha256 = _temp(storage, b"same", 0o644)
    dest = storage.commit(path, sha256, 4, durable=False)
    before = os.stat(dest)
    path, _ = _temp(storage, b"same", 0o644)
    assert storage.commit(path, sha256, 4, durable=False) == dest
    assert not os.path.exists(path)  # the second copy is dropped
    assert os.stat(dest).st_ino == before.st_ino  # the stored one is left as it was
    assert os.listdir(storage.temp_dir) == []
