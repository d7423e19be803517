"""ArtifactStorage on real files: atomic commit, duplicates, temp cleanup, verify."""

import hashlib
import io
import os

import pytest
from zope.interface.verify import verifyObject

from store import ArtifactNotFound, ArtifactStorage, IArtifactStorage, StorageError
from store.errors import NotARegularFile


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_temp(storage: ArtifactStorage, data: bytes) -> str:
    with storage.new_temp_file() as f:
        f.write(data)
    return f.name


def _all_files(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, name), folder)
        for d, _dirs, names in os.walk(folder)
        for name in names
    )


@pytest.fixture
def storage(tmp_path) -> ArtifactStorage:
    return ArtifactStorage(tmp_path / "var")


def test_layout_and_interface(storage, tmp_path):
    assert verifyObject(IArtifactStorage, storage)
    assert storage.root == str(tmp_path / "var")
    assert os.path.isdir(storage.temp_dir)
    # tmp/ holds one folder per process (see store.tempdirs), this process's among them.
    assert os.path.dirname(storage.temp_dir) == os.path.join(storage.root, "tmp")
    sha = _sha(b"x")
    assert storage.path_for(sha) == os.path.join(storage.root, "artifacts", sha[:2], sha[2:])


def test_commit_enters_file_by_rename(storage):
    data = b"hello artifact\n" * 1000
    temp = _write_temp(storage, data)
    assert os.path.dirname(temp) == storage.temp_dir
    path = storage.commit(temp, _sha(data), len(data))
    assert path == storage.path_for(_sha(data))
    assert not os.path.exists(temp)
    assert storage.has(_sha(data))
    with storage.open(_sha(data)) as f:
        assert f.read() == data
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(storage.temp_dir) == []


def test_commit_size_mismatch_refused(storage):
    data = b"short"
    temp = _write_temp(storage, data)
    with pytest.raises(StorageError, match="size mismatch.*expected 6 bytes.*has 5"):
        storage.commit(temp, _sha(data), 6)
    assert not os.path.exists(temp)
    assert _all_files(os.path.join(storage.root, "artifacts")) == []
    assert not storage.has(_sha(data))


@pytest.mark.parametrize("bad", ["A" * 64, "ab" * 31, "g" * 64, "", "../" + "a" * 61])
def test_commit_bad_digest_refused(storage, bad):
    temp = _write_temp(storage, b"data")
    with pytest.raises(StorageError, match="not a sha256 digest"):
        storage.commit(temp, bad, 4)
    assert not os.path.exists(temp)
    assert _all_files(os.path.join(storage.root, "artifacts")) == []


def test_commit_refuses_file_outside_temp_dir(storage, tmp_path):
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"data")
    with pytest.raises(StorageError, match="not a file in"):
        storage.commit(str(outside), _sha(b"data"), 4)
    assert _all_files(os.path.join(storage.root, "artifacts")) == []


def test_commit_missing_temp_file_is_storage_error(storage):
    missing = os.path.join(storage.temp_dir, "part-gone")
    with pytest.raises(StorageError, match="cannot store artifact"):
        storage.commit(missing, _sha(b""), 0)


def test_commit_existing_artifact_drops_temp(storage):
    data = b"same bytes"
    first = storage.commit(_write_temp(storage, data), _sha(data), len(data))
    inode = os.stat(first).st_ino
    temp = _write_temp(storage, data)
    second = storage.commit(temp, _sha(data), len(data))
    assert second == first
    assert os.stat(second).st_ino == inode
    assert not os.path.exists(temp)
    assert os.listdir(storage.temp_dir) == []


def test_open_missing_artifact(storage):
    with pytest.raises(ArtifactNotFound):
        storage.open(_sha(b"never stored"))
    assert not storage.has(_sha(b"never stored"))


def _stored(storage: ArtifactStorage, data: bytes) -> str:
    storage.commit(_write_temp(storage, data), _sha(data), len(data))
    return _sha(data)


def test_open_gives_the_bytes_unbuffered(storage):
    """The file comes as a raw ``FileIO``: its readers take its descriptor or large reads, and
    a buffered reader costs two system calls more per open (every warm request makes one)."""
    sha = _stored(storage, b"stored bytes\n" * 5000)
    with storage.open(sha) as f:
        assert isinstance(f, io.FileIO)
        assert f.read() == b"stored bytes\n" * 5000
        assert os.pread(f.fileno(), 6, 7) == b"bytes\n"


@pytest.mark.parametrize("where", ["root", "above the root"])
def test_open_through_a_linked_storage_folder(tmp_path, where):
    """A storage folder reached through a symbolic link (the root itself, or a folder above
    it) is served as before: links are refused only below ``artifacts/``."""
    real = tmp_path / "real"
    real.mkdir()
    if where == "root":
        (tmp_path / "var").symlink_to(real)
        storage = ArtifactStorage(tmp_path / "var")
    else:
        (tmp_path / "up").symlink_to(real)
        storage = ArtifactStorage(tmp_path / "up" / "var")
    sha = _stored(storage, b"through a link\n")
    with storage.open(sha) as f:
        assert f.read() == b"through a link\n"
    with pytest.raises(ArtifactNotFound):
        storage.open(_sha(b"never stored"))


def test_open_refuses_links_below_artifacts(storage, tmp_path):
    """A link at an artifact's path, or in place of its ``artifacts/<ab>`` folder, is not
    stored content (`NotARegularFile`, an `ArtifactNotFound`), however the folder is opened."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for clients\n")
    linked = _sha(b"linked")
    os.makedirs(os.path.dirname(storage.path_for(linked)), exist_ok=True)
    os.symlink(secret, storage.path_for(linked))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    under = next(
        _sha(data)
        for data in (b"%d" % n for n in range(1000))
        if not os.path.exists(os.path.dirname(storage.path_for(_sha(data))))
    )
    (elsewhere / under[2:]).write_bytes(b"not for clients\n")
    os.symlink(elsewhere, os.path.dirname(storage.path_for(under)))
    with pytest.raises(NotARegularFile, match="is .or is under. a symbolic link"):
        storage.open(linked)
    with pytest.raises(NotARegularFile):
        storage.open(under)
    assert issubclass(NotARegularFile, ArtifactNotFound)


def test_open_refuses_a_fifo_without_waiting(storage):
    sha = _sha(b"fifo")
    os.makedirs(os.path.dirname(storage.path_for(sha)), exist_ok=True)
    os.mkfifo(storage.path_for(sha))
    with pytest.raises(NotARegularFile, match="a FIFO"):
        storage.open(sha)


def test_clean_temp_removes_stale_files(storage):
    for data in (b"a", b"b", b"c"):
        _write_temp(storage, data)
    assert storage.clean_temp() == 3
    assert os.listdir(storage.temp_dir) == []
    assert storage.clean_temp() == 0


def test_clean_temp_min_age_keeps_recent_files(storage):
    old = _write_temp(storage, b"old")
    recent = _write_temp(storage, b"recent")
    os.utime(old, (0, 0))
    assert storage.clean_temp(min_age=3600) == 1
    assert os.listdir(storage.temp_dir) == [os.path.basename(recent)]


def test_import_file_and_iter_artifacts(storage, tmp_path):
    files = {}
    for i in range(3):
        data = os.urandom(3000 + i)
        src = tmp_path / f"f{i}"
        src.write_bytes(data)
        assert storage.import_file(src) == (_sha(data), len(data))
        files[_sha(data)] = data
    # importing again is a no-op
    storage.import_file(tmp_path / "f0")
    listed = list(storage.iter_artifacts())
    assert [sha for sha, _path in listed] == sorted(files)
    for sha, path in listed:
        with open(path, "rb") as f:
            assert f.read() == files[sha]
    assert os.listdir(storage.temp_dir) == []


def test_import_missing_file_leaves_nothing(storage, tmp_path):
    with pytest.raises(StorageError, match="cannot import"):
        storage.import_file(tmp_path / "missing")
    assert os.listdir(storage.temp_dir) == []
    assert list(storage.iter_artifacts()) == []


def test_verify_quarantines_corrupted_artifact(storage, tmp_path):
    good_data, bad_data = b"good" * 100, b"bad" * 100
    for name, data in (("good", good_data), ("bad", bad_data)):
        (tmp_path / name).write_bytes(data)
        storage.import_file(tmp_path / name)
    bad_sha = _sha(bad_data)
    with open(storage.path_for(bad_sha), "r+b") as f:  # flip a byte on disk
        f.write(b"B")
    seen = []
    report = storage.verify(on_bad=seen.append)
    assert (report.checked, report.good) == (2, 1)
    assert len(report.bad) == 1 and seen == report.bad
    item = report.bad[0]
    assert item.sha256 == bad_sha
    assert item.actual_sha256 == _sha(b"B" + bad_data[1:])
    assert os.path.dirname(item.quarantine_path) == os.path.join(storage.root, "quarantine")
    assert not storage.has(bad_sha)
    assert storage.has(_sha(good_data))
    with open(item.quarantine_path, "rb") as f:
        assert f.read() == b"B" + bad_data[1:]
    again = storage.verify()
    assert (again.checked, again.good, again.bad) == (1, 1, [])


def test_clean_temp_leaves_the_files_of_another_live_user_of_the_storage(tmp_path):
    """Two users of one storage (two processes, or two storages in one process: an flock
    is per open file): each cleans only its own files and those of users that are gone."""
    ours, theirs = ArtifactStorage(tmp_path / "var"), ArtifactStorage(tmp_path / "var")
    their_file = _write_temp(theirs, b"in progress")
    our_file = _write_temp(ours, b"ours")
    assert ours.temp_dir != theirs.temp_dir
    assert ours.clean_temp() == 1
    assert os.path.exists(their_file) and not os.path.exists(our_file)
    theirs._own_temp.forget()  # its lock dropped as the kernel drops a dead process's
    assert ours.clean_temp() == 1
    assert not os.path.exists(their_file)
    assert sorted(os.listdir(os.path.join(ours.root, "tmp"))) == sorted(
        [os.path.basename(ours.temp_dir), os.path.basename(ours.temp_dir) + ".lock"]
    )
    assert ours.close() == 0
    assert os.listdir(os.path.join(ours.root, "tmp")) == []


def test_remove_quietly_removes_a_file_and_passes_over_what_is_gone(tmp_path):
    """The store's one quiet delete: a file goes, a missing path or None is no error, a
    folder (a mistake, not a leftover) is not swallowed."""
    from store.tempdirs import remove_quietly

    leftover = tmp_path / "leftover"
    leftover.write_bytes(b"x")
    remove_quietly(str(leftover))
    assert not leftover.exists()
    remove_quietly(str(leftover))
    remove_quietly(None)
    remove_quietly("")
    with pytest.raises(IsADirectoryError):
        remove_quietly(str(tmp_path))


def test_a_forked_child_makes_a_temp_folder_of_its_own_and_leaves_the_parents(tmp_path):
    """A forked child does not write into, or remove, its parent's temporary folder: it
    claims one of its own (the process id that tells them apart is renewed at the fork)."""
    storage = ArtifactStorage(tmp_path / "var")
    parents = storage.temp_dir
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        status = 1
        try:
            os.close(read)
            own = storage.temp_dir
            storage.close()  # removes the child's own folder only
            os.write(write, f"{own}\n{os.path.isdir(parents)}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs, parents_kept = pipe.read().split("\n")
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert childs != parents and os.path.dirname(childs) == os.path.dirname(parents)
    assert parents_kept == "True" and os.path.isdir(parents) and storage.temp_dir == parents
    assert not os.path.exists(childs)


def _inode_flags(path) -> int | None:
    """The folder's inode flags (``lsattr``), or None where the filesystem keeps none."""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x80086601, struct.pack("i", 0)))[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def test_the_temp_folders_are_spread_over_the_disk_where_the_filesystem_can(tmp_path):
    """tmp/ carries the "top of a directory hierarchy" flag (``chattr +T``), so each
    process's temp folder is placed apart, as top-level folders are: on ext4 without a
    journal a file create otherwise scans every inode deleted nearby in the last minute.
    Opening the storage again keeps the flag and the folder's other flags."""
    from store.tempdirs import spread_folders

    before = _inode_flags(tmp_path)
    if before is None or not spread_folders(str(tmp_path)):
        pytest.skip("this filesystem keeps no such flag")
    storage = ArtifactStorage(tmp_path / "var")
    flags = _inode_flags(storage.temp_root)
    assert flags is not None and flags & 0x00020000
    ArtifactStorage(tmp_path / "var")
    assert _inode_flags(storage.temp_root) == flags
    assert _inode_flags(tmp_path) == before | 0x00020000
    assert os.path.isdir(storage.temp_dir)  # the folders are made as before


def test_a_folder_that_cannot_be_spread_is_left_as_it_is(tmp_path):
    """No folder, or a filesystem without the flag: False, nothing raised (only placement
    is at stake), and the storage opens as before."""
    from store.tempdirs import spread_folders

    assert spread_folders(str(tmp_path / "missing")) is False
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile

        with tempfile.TemporaryDirectory(dir=shm) as folder:
            if _inode_flags(folder) is None or not spread_folders(folder):
                storage = ArtifactStorage(os.path.join(folder, "var"))
                assert os.path.isdir(storage.temp_dir)
                storage.close()
