"""Content-addressed artifact storage on a local filesystem.

Layout under the storage root::

    artifacts/ab/cdef...   one file per artifact, named by its sha256 (first 2 hex chars as folder)
    tmp/                   partial downloads and other temporary files (same filesystem),
                           one folder per process (see `store.tempdirs`)
    quarantine/            artifacts whose bytes no longer match their name (found by verify)

A file enters ``artifacts/`` only by an atomic rename of a complete temp file whose size was
checked and whose data is on disk (fsynced by `ArtifactStorage.commit`, or with ``durable=False``
flushed beforehand by the caller, one ``syncfs`` for a batch), so ``artifacts/`` never holds a
partial file.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, cast

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from store.digests import is_sha256_hex
from store.errors import (
    ArtifactNotFound,
    NotARegularFile,
    PathTaken,
    StorageError,
    WrongSize,
    local_fault,
)
from store.interfaces import IArtifactStorage
from store.tempdirs import OwnTempDir, remove_quietly, remove_stale, spread_folders

_log = Logger()

CHUNK_SIZE = 1024 * 1024
TEMP_PREFIX = "part-"
#: The file naming the storage folder (a random id), recorded by the catalog it belongs to.
IDENTITY_FILE = "storage-id"
ARTIFACT_MODE = 0o644
#: Loose files in tmp/ (made by no process that keeps its own locked folder) older than this
#: are left-overs; a process cleaning up at start passes it as ``clean_temp``'s *min_age*.
STALE_TEMP_SECONDS = 3600.0


@attrs.frozen
class BadArtifact:
    """An artifact whose content did not match its name (or that is no regular file: then
    *reason* says what it is and *actual_sha256* is empty), and where it was moved."""

    sha256: str
    actual_sha256: str
    quarantine_path: str
    reason: str = ""


@attrs.frozen
class VerifyReport:
    """Outcome of ``ArtifactStorage.verify``."""

    checked: int
    good: int
    bad: list[BadArtifact]


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_REGULAR = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC
_OPEN_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def file_kind(mode: int) -> str:
    """What a file of *mode* is, in words (``a FIFO``, ``a regular file``)."""
    return "a regular file" if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "special")


def open_regular(path: str, below: str | None = None, size: int | None = None) -> BinaryIO:
    """Open *path* for reading if it is a regular file, never following a symbolic link
    (``O_NOFOLLOW``) or waiting on a FIFO (``O_NONBLOCK``); else raise `NotARegularFile`
    (or ``OSError``: missing, unreadable). With *below* (a trusted folder holding *path*),
    no folder between the two may be a symbolic link either. With *size*, a file of another
    size raises `WrongSize` (the ``fstat`` that checks the kind tells).

    The file comes unbuffered (a ``FileIO``): its readers take large reads or its descriptor
    (``os.pread``, ``sendfile``), and a buffered reader costs two more system calls per open.
    """
    try:
        fd = _open_beneath(path, below)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotARegularFile(f"{path} is (or is under) a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.ENOTDIR):  # a socket; a file where a folder goes
            raise NotARegularFile(f"{path} is not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path} is {file_kind(info.st_mode)}")
        if size is not None and info.st_size != size:
            raise WrongSize(f"{path} has {info.st_size} bytes, the catalog says {size}")
        return cast(BinaryIO, open(fd, "rb", buffering=0))  # the caller owns (and closes) it
    except BaseException:
        os.close(fd)
        raise


def _open_beneath(path: str, below: str | None) -> int:
    """A descriptor of *path* (`open_regular`'s flags), no folder below *below* followed if
    it is a symbolic link.

    Where *below* is reached through no link itself, one ``openat2`` refusing every link on
    the path does it (Linux 5.6+); otherwise, or when it reports a link (which may be above
    *below*, where links are allowed), each folder is opened in turn with ``O_NOFOLLOW``:
    five system calls instead of one."""
    if below is None:
        return os.open(path, _OPEN_REGULAR)
    if _link_free(below):
        open_plain = _openat2()
        if open_plain is not None:
            try:
                return open_plain(path)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
    *folders, name = path[len(below) :].lstrip(os.sep).split(os.sep)
    dir_fd = os.open(below, _OPEN_FOLDER)
    try:
        for folder in folders:
            inner = os.open(folder, _OPEN_FOLDER | _NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = inner
        return os.open(name, _OPEN_REGULAR, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


@functools.lru_cache(maxsize=64)
def _link_free(folder: str) -> bool:
    """Whether *folder* (an absolute path) is reached through no symbolic link (asked once
    per folder: a link added later only costs the slower open, whose answer is exact)."""
    return os.path.isabs(folder) and os.path.realpath(folder) == os.path.normpath(folder)


#: ``openat2``'s number (the same on every Linux architecture) and ``RESOLVE_NO_SYMLINKS``.
_SYS_OPENAT2 = 437
_RESOLVE_NO_SYMLINKS = 0x04


@functools.cache
def _openat2() -> Callable[[str], int] | None:
    """``open(path)`` with `open_regular`'s flags through ``openat2(RESOLVE_NO_SYMLINKS)``
    (no symbolic link anywhere on the path: ``ELOOP``), or None where the kernel or the
    platform has no ``openat2``. Loaded on first use, like `_renameat2`."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        ]

    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    how = OpenHow(_OPEN_REGULAR, 0, _RESOLVE_NO_SYMLINKS)
    address, size = ctypes.addressof(how), ctypes.sizeof(how)

    def open_plain(path: str, _keep: object = how) -> int:  # (_keep: `how` lives as long)
        fd = syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), address, size)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return int(fd)

    try:  # a kernel without it (ENOSYS), or a sandbox refusing it (EPERM)
        os.close(open_plain(os.path.abspath(os.sep)))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
            return None
        # Anything else (a root folder we may not read) says the call itself works.
    return open_plain


def hash_file(path: str, below: str | None = None) -> tuple[str, int]:
    """Return (sha256 hex, size) of the (regular) file at *path*, reading it in chunks
    (*below*: see `open_regular`)."""
    digest = hashlib.sha256()
    size = 0
    with open_regular(path, below) as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _is_regular(path: str, size: int | None = None) -> bool:
    """True when *path* itself (not a link's target) is a regular file (of *size* bytes)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and size in (None, info.st_size)


def _is_folder(path: str) -> bool:
    """True when *path* itself (not a link's target) is a folder."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.cache
def _renameat2() -> Any:
    """Linux's ``renameat2`` (glibc 2.28+), or None; loaded on first use."""
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_no_replace_works = True


def _rename_no_replace(src: str, dst: str) -> bool:
    """Rename *src* to *dst* unless *dst* exists; return False (and leave *src*) if it does.

    One ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it, instead
    of a ``stat`` then a ``rename``; the result is the same either way (two processes
    storing the same content both end with the one valid artifact)."""
    global _no_replace_works
    function = _renameat2() if _no_replace_works else None
    if function is not None:
        if (
            function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
            == 0
        ):
            return True
        code = _ctypes_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), src, None, dst)
        _no_replace_works = False  # this filesystem cannot: stat, then rename
    if os.path.isfile(dst):
        return False
    os.replace(src, dst)
    return True


def _make_folder(folder: str) -> None:
    """Make sure *folder* (an ``artifacts/xx`` folder) is a folder, not a symbolic link to
    one elsewhere; StorageError if it is a link.

    One ``lstat`` when it exists, as it mostly does: another process (a sync's helper, the
    service) made it a moment ago. A ``mkdir`` only when it is missing: two processes making
    the same folders meet on the parent's lock, where a ``mkdir`` may wait for a whole inode
    allocation of the other's (on ext4 without a journal, a scan past every inode deleted
    nearby in the last minute), only to be told it exists."""
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        try:
            os.mkdir(folder)
            return  # made here: a folder
        except FileExistsError:
            pass  # made by another process meanwhile
        except FileNotFoundError:  # artifacts/ itself is gone (removed by hand)
            os.makedirs(folder, exist_ok=True)
        mode = os.lstat(folder).st_mode
    if stat.S_ISLNK(mode):  # a link to a folder elsewhere
        raise StorageError(f"{folder} is a symbolic link: refusing to store through it")
    if not stat.S_ISDIR(mode):
        raise StorageError(f"{folder} is {file_kind(mode)}, not a folder: cannot store in it")


def _ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


@implementer(IArtifactStorage)
class ArtifactStorage:
    """Artifacts named by sha256 under *root*; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.artifacts_dir = os.path.join(self.root, "artifacts")
        #: Shared by every process using this storage; each has its own folder in it.
        self.temp_root = os.path.join(self.root, "tmp")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        #: The ``artifacts/xx`` folders known to exist (at most 256 names).
        self._folders: set[str] = set()
        self._own_temp: OwnTempDir | None = None
        try:
            os.makedirs(self.artifacts_dir, exist_ok=True)
            os.makedirs(self.temp_root, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage folders under {self.root!r}: {exc}") from exc
        # Each process's temp folder (and the claims') in a block group of its own: file
        # creates there do not pay for every file deleted nearby (`spread_folders`).
        spread_folders(self.temp_root)

    def __repr__(self) -> str:
        return f"ArtifactStorage({self.root!r})"

    def path_for(self, sha256: str) -> str:
        """Return the path of the artifact with this sha256 (64 lowercase hex characters)."""
        if not is_sha256_hex(sha256):
            raise StorageError(f"not a sha256 digest (64 lowercase hex characters): {sha256!r}")
        return os.path.join(self.artifacts_dir, sha256[:2], sha256[2:])

    def has(self, sha256: str, size: int | None = None) -> bool:
        """Return True when the artifact is stored (as a regular file, not a link to one;
        of *size* bytes, if given)."""
        return _is_regular(self.path_for(sha256), size)

    def open(self, sha256: str, size: int | None = None) -> BinaryIO:
        """Open the stored artifact for binary reading.

        Anything at its path but a regular file (a FIFO would block the caller forever, a
        symbolic link could point anywhere), or, given its *size*, a file of another size,
        is logged and treated as not stored: `NotARegularFile` or `WrongSize`, both an
        `ArtifactNotFound`. The next commit of the artifact replaces it.
        """
        path = self.path_for(sha256)
        try:
            return open_regular(path, below=self.artifacts_dir, size=size)
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {sha256} is not in storage") from None
        except (NotARegularFile, WrongSize) as exc:
            _log.warn("{what}: treated as not stored (streamer verify moves it aside)", what=exc)
            raise
        except OSError as exc:
            raise StorageError(f"cannot open artifact {sha256}: {exc}") from exc

    @property
    def temp_dir(self) -> str:
        """This process's own folder under tmp/, made and locked on first use (and again
        in a forked child), so no other process ever removes a file in it while we live.
        Raises StorageError when it cannot be made (storage read-only or full)."""
        own = self._own_temp
        if own is None or not own.alive:
            try:
                own = self._own_temp = OwnTempDir.claim(self.temp_root)
            except OSError as exc:
                raise StorageError(
                    f"cannot make a temporary folder in {self.temp_root!r}: {exc}"
                ) from exc
        return own.folder

    def clean_temp(self, min_age: float = 0.0) -> int:
        """Remove temporary files that nobody will use; return how many were removed.

        That is: this process's own files last modified at least *min_age* seconds ago, the
        folders of processes that are gone (whose lock is free: however young), and loose
        files in tmp/ older than *min_age*. Files of another live process are never touched,
        so a service (re)starting beside a running sync leaves its downloads alone.
        """
        own = self._own_temp if self._own_temp is not None and self._own_temp.alive else None
        removed = own.clear(min_age) if own is not None else 0
        return removed + remove_stale(self.temp_root, own, min_age)

    def writable_problem(self) -> str | None:
        """Why new files cannot be stored now, or None: ``storage read-only``, ``storage
        full``, ``too many open files`` (with the errno), or the error of a failed write.

        One ``statvfs`` and a one-byte probe file in tmp/ (created, written, removed): cheap
        enough for every health check, and it sees what ``os.access`` cannot (a read-only
        mount, a full disk, root's writes)."""
        try:
            fs = os.statvfs(self.temp_root)
            if fs.f_flag & os.ST_RDONLY:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.temp_root)
            if fs.f_bavail == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.temp_root)
            probe = os.path.join(self.temp_root, f".probe-{os.getpid()}-{os.urandom(4).hex()}")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
                remove_quietly(probe)
        except OSError as exc:
            fault = local_fault(exc)
            return fault.detail if fault is not None else f"cannot write in {self.temp_root}: {exc}"
        return None

    def check_room(self, size: int) -> None:
        """Raise ``OSError(ENOSPC)`` when the filesystem has less than *size* bytes free for
        us, ``OSError(EROFS)`` when it is read-only: a download that could never be stored is
        refused before it starts (a small one held in memory opens no file until its commit)."""
        fs = os.statvfs(self.temp_root)
        if fs.f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.temp_root)
        if fs.f_bavail * fs.f_frsize < size:
            raise OSError(
                errno.ENOSPC,
                f"{os.strerror(errno.ENOSPC)}: {size} bytes needed, "
                f"{fs.f_bavail * fs.f_frsize} free",
                self.temp_root,
            )

    def clean_stale_temp(self) -> int:
        """Remove only the temporary folders of processes that are gone (and loose files),
        never one of this process's files: for a process that stays at work while another
        using the storage ended. Returns how many files were removed."""
        own = self._own_temp if self._own_temp is not None and self._own_temp.alive else None
        return remove_stale(self.temp_root, own, STALE_TEMP_SECONDS)

    def close(self) -> int:
        """Remove this process's temporary folder and everything in it (at the end of a
        service or a sync); return the number of files removed. A later `temp_dir` makes a
        new one."""
        own, self._own_temp = self._own_temp, None
        return own.release() if own is not None else 0

    def identity(self) -> str:
        """The folder's id (the ``storage-id`` file), made on first use.

        A catalog records the id of the storage folder it describes, so a process configured
        with another folder for the same catalog is refused (`store.schema`). The id is written
        to a temp file then hard-linked into place, which is atomic even on NFS: processes or
        nodes starting together on one new folder all read the same id.
        """
        path = os.path.join(self.root, IDENTITY_FILE)
        for _ in range(3):
            try:
                with open(path, encoding="ascii") as f:
                    value = f.read().strip()
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError) as exc:
                raise StorageError(f"cannot read the storage id {path!r}: {exc}") from exc
            else:
                if value:
                    return value
                raise StorageError(f"the storage id file {path!r} is empty")
            value = uuid.uuid4().hex
            temp = f"{path}.{value}.tmp"
            try:
                with open(temp, "x", encoding="ascii") as f:
                    f.write(value + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(temp, path)
                except FileExistsError:
                    pass  # another process made it first: read theirs
                finally:
                    remove_quietly(temp)
            except OSError as exc:
                raise StorageError(f"cannot write the storage id {path!r}: {exc}") from exc
        raise StorageError(f"the storage id file {path!r} keeps disappearing")

    def new_temp_file(self) -> IO[bytes]:
        """Return a new writable binary file in tmp/ (its ``.name`` is its path).

        The caller writes, closes, then passes ``.name`` to ``commit`` or removes it.
        """
        return tempfile.NamedTemporaryFile(  # the caller owns the file
            mode="wb", dir=self.temp_dir, prefix=TEMP_PREFIX, delete=False
        )

    def discard(self, temp_path: str) -> None:
        """Remove a temp file that will not be committed (missing is fine)."""
        remove_quietly(temp_path)

    def commit(self, temp_path: str, sha256: str, size: int, *, durable: bool = True) -> str:
        """Enter a complete temp file into storage under *sha256*; return the artifact path.

        *sha256* is the digest the caller computed while writing the file (it is not re-read).
        The file's size must equal *size*. The file is fsynced, then renamed atomically into
        place. If the artifact exists already the temp file is dropped. On any failure the
        temp file is removed and StorageError raised. ``durable=False`` skips the fsync, for a
        caller that already flushed the file's data (one ``syncfs`` for a batch of files).
        """
        try:
            return self._commit(temp_path, sha256, size, durable)
        except BaseException as exc:
            remove_quietly(temp_path)
            if isinstance(exc, StorageError):
                raise
            if isinstance(exc, OSError):
                raise StorageError(f"cannot store artifact {sha256}: {exc}") from exc
            raise

    def _commit(self, temp_path: str, sha256: str, size: int, durable: bool = True) -> str:
        if not is_sha256_hex(sha256):
            raise StorageError(f"not a sha256 digest (64 lowercase hex characters): {sha256!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise StorageError(f"invalid artifact size: {size!r}")
        temp_path = os.path.abspath(temp_path)
        if os.path.dirname(temp_path) != self.temp_dir:
            raise StorageError(f"refusing to commit {temp_path!r}: not a file in {self.temp_dir!r}")
        # One lstat settles most files: a regular file (not a symlink) of the right size
        # whose mode is already the artifacts' (downloads made for storage are created so).
        # The file is opened only to change its mode or to fsync it.
        st = os.lstat(temp_path)
        self._check_temp(temp_path, st, sha256, size)
        if durable or stat.S_IMODE(st.st_mode) != ARTIFACT_MODE:
            fd = os.open(temp_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                self._check_temp(temp_path, os.fstat(fd), sha256, size)  # the file we opened
                os.fchmod(fd, ARTIFACT_MODE)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        dest = self.path_for(sha256)
        if not self._rename_into(temp_path, dest, sha256[:2], size):  # stored already
            remove_quietly(temp_path)
        return dest

    @staticmethod
    def _check_temp(temp_path: str, st: os.stat_result, sha256: str, size: int) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"refusing to commit {temp_path!r}: not a regular file")
        if st.st_size != size:
            raise StorageError(
                f"size mismatch for artifact {sha256}: expected {size} bytes, "
                f"the file has {st.st_size}"
            )

    def _rename_into(self, temp_path: str, dest: str, prefix: str, size: int) -> bool:
        """Rename into ``artifacts/<prefix>/`` unless *dest* exists (as a regular file of
        *size* bytes); False if it did.

        The folder is looked at the first time only (a ``mkdir`` costs about as much as
        creating a file: once per folder, not per file), and made only when missing."""
        if prefix not in self._folders:
            _make_folder(os.path.dirname(dest))
            self._folders.add(prefix)
        try:
            renamed = _rename_no_replace(temp_path, dest)
        except IsADirectoryError:  # (no renameat2 here: os.replace met a folder)
            renamed = False
        except FileNotFoundError:
            if not os.path.exists(temp_path):
                raise
            # The folder went away after we made it (removed by hand): make it again.
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            renamed = _rename_no_replace(temp_path, dest)
        if not renamed and _is_folder(dest):  # a rename cannot replace it, nor do we
            raise PathTaken(f"{dest} is a folder: not replaced (streamer verify moves it aside)")
        if not renamed and not _is_regular(dest, size):
            # Something else sits at the artifact's path (a FIFO, a symbolic link, a file
            # cut short): the validated file takes its place.
            _log.warn("replacing {dest}: it was not a regular file of its size", dest=dest)
            os.replace(temp_path, dest)
            return True
        return renamed

    def import_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        """Copy the local file at *path* into storage through tmp/; return (sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        temp = self.new_temp_file()
        try:
            with temp, open(path, "rb") as src:
                while chunk := src.read(CHUNK_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
                    temp.write(chunk)
        except OSError as exc:
            remove_quietly(temp.name)
            raise StorageError(f"cannot import {os.fspath(path)!r}: {exc}") from exc
        except BaseException:
            remove_quietly(temp.name)
            raise
        sha256 = digest.hexdigest()
        self.commit(temp.name, sha256, size)
        return sha256, size

    def iter_artifacts(self) -> Iterator[tuple[str, str]]:
        """Yield (sha256, path) for every stored artifact (regular files only), in sha256
        order."""
        for sha256, path, mode in self._iter_named():
            if stat.S_ISREG(mode):
                yield sha256, path

    def _iter_named(self) -> Iterator[tuple[str, str, int]]:
        """Yield (sha256, path, mode) for everything in ``artifacts/`` named like an
        artifact, regular file or not (``lstat``: links are not followed)."""
        try:
            prefixes = sorted(os.listdir(self.artifacts_dir))
        except FileNotFoundError:
            return
        for prefix in prefixes:
            folder = os.path.join(self.artifacts_dir, prefix)
            if len(prefix) != 2 or not _is_folder(folder):  # never through a link
                continue
            for rest in sorted(os.listdir(folder)):
                sha256 = prefix + rest
                path = os.path.join(folder, rest)
                if is_sha256_hex(sha256):
                    try:
                        yield sha256, path, os.lstat(path).st_mode
                    except FileNotFoundError:
                        continue

    def verify(self, on_bad: Callable[[BadArtifact], object] | None = None) -> VerifyReport:
        """Re-hash every artifact; move mismatching ones to quarantine/ and report them.

        *on_bad* is called with each BadArtifact as it is found (for example to clear the
        catalog's stored flag). This reads every byte in storage: run it outside the reactor.
        """
        checked = good = 0
        bad: list[BadArtifact] = []
        for sha256, path, mode in self._iter_named():
            reason = actual = ""
            try:
                if stat.S_ISREG(mode):
                    actual, _size = hash_file(path, self.artifacts_dir)
                else:
                    raise NotARegularFile(path)
            except FileNotFoundError:
                continue
            except NotARegularFile:
                try:
                    mode = os.lstat(path).st_mode
                except FileNotFoundError:
                    continue
                reason = f"not a regular file: {file_kind(mode)}"
            checked += 1
            if actual == sha256:
                good += 1
                continue
            item = BadArtifact(sha256, actual, self._quarantine(sha256, path), reason)
            bad.append(item)
            if on_bad is not None:
                on_bad(item)
        return VerifyReport(checked=checked, good=good, bad=bad)

    def _quarantine(self, sha256: str, path: str) -> str:
        os.makedirs(self.quarantine_dir, exist_ok=True)
        dest = os.path.join(self.quarantine_dir, f"{sha256}.{time.time_ns()}")
        os.replace(path, dest)
        return dest
