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


MKDIRS_OF_A_COMMIT = """
import hashlib, os, sys

from store import ArtifactStorage

storage = ArtifactStorage(sys.argv[1])
made = []
committing = []
sys.addaudithook(
    lambda event, args: made.append(args[0]) if event == "os.mkdir" and committing else None
)
for data in (b"first", b"second"):
    sha256 = hashlib.sha256(data).hexdigest()
    if data == b"second":  # its folder made by another process (a helper) beforehand
        os.makedirs(os.path.dirname(storage.path_for(sha256)), exist_ok=True)
    path = os.path.join(storage.temp_dir, "part-x")
    with open(path, "wb") as f:
        f.write(data)
    committing.append(True)
    storage.commit(path, sha256, len(data))
    committing.clear()
    assert storage.has(sha256)
print(len(made))
"""


def test_a_commit_makes_only_a_folder_that_is_missing(tmp_path) -> None:
    """A first commit under ``artifacts/xx`` makes the folder with one ``mkdir``; a folder
    another process made already is only looked at (no ``mkdir`` meeting the other's on the
    parent's lock, to be told it exists)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-c", MKDIRS_OF_A_COMMIT, str(tmp_path / "var")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": repo},
        cwd=repo,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]  # the first file's folder; none for the second


def test_a_file_in_place_of_a_folder_is_refused_by_name(tmp_path) -> None:
    """Something else than a folder at ``artifacts/xx`` (a regular file, a link): the commit
    fails naming it, the temp file is removed, nothing is stored."""
    storage = ArtifactStorage(tmp_path)
    path, sha256 = _temp(storage, b"blocked", 0o644)
    folder = os.path.dirname(storage.path_for(sha256))
    with open(folder, "wb") as f:
        f.write(b"not a folder")
    with pytest.raises(StorageError, match="is a regular file, not a folder"):
        storage.commit(path, sha256, 7, durable=False)
    assert not os.path.exists(path)
    os.remove(folder)
    os.symlink(tmp_path, folder)
    path, sha256 = _temp(storage, b"blocked", 0o644)
    with pytest.raises(StorageError, match="is a symbolic link: refusing to store through it"):
        storage.commit(path, sha256, 7, durable=False)
    assert not os.path.exists(path) and not storage.has(sha256)
