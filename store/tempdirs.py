"""Temporary folders that several processes share safely: one folder per process, owned by a lock.

Every process that writes temporary files under a storage's ``tmp/`` (the service, ``streamer
sync`` and its workers) works in a folder of its own, ``tmp/proc-<pid>-<random>/``, and holds
an exclusive ``flock`` on the lock file beside it (``tmp/proc-<pid>-<random>.lock``) for as
long as it lives. The kernel drops the lock when the process ends, however it ends, so:

* a folder whose lock can be taken (a non-blocking ``flock`` succeeds) belongs to a process
  that is gone: its files are provably stale and removed, with the folder and the lock file;
* a folder whose lock is held belongs to a live process and is never touched by another;
* a folder without a lock file is stale too (the lock file is made, and locked, first);
* a loose file directly in ``tmp/`` was written by no process following this rule (a version
  before it): removed when older than the caller's *min_age*.

A process removes its own folder when it is done (`OwnTempDir.release`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import sys
import time
import weakref

__all__ = [
    "FOLDER_PREFIX",
    "LOCK_SUFFIX",
    "OwnTempDir",
    "remove_quietly",
    "remove_stale",
    "spread_folders",
]

FOLDER_PREFIX = "proc-"
LOCK_SUFFIX = ".lock"
_OPEN_LOCK = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

#: Linux's ``FS_IOC_GETFLAGS`` / ``FS_IOC_SETFLAGS`` (an ``int`` of inode flags) and the flag
#: ``chattr +T`` sets: ``FS_TOPDIR_FL``, "the top of a directory hierarchy".
_GET_FLAGS = 0x80086601
_SET_FLAGS = 0x40086602
_TOPDIR = 0x00020000
_FLAGS = struct.Struct("i")

#: Folders claimed by this process, so a forked child can drop its copies of their locks.
_claimed: weakref.WeakSet[OwnTempDir] = weakref.WeakSet()
#: This process's id, renewed in a forked child: `OwnTempDir.alive` is asked several times per
#: stored file, and ``os.getpid`` is a system call each time.
_pid = os.getpid()


def spread_folders(path: str) -> bool:
    """Ask the filesystem to place each new folder made in *path* apart from the others, as it
    places top-level folders (ext2/3/4's ``chattr +T``); True if the flag is set. A filesystem
    without it (or a folder we may not change) is left as it is: only placement is at stake.

    Why: on ext4 without a journal, making a file skips, one by one, every inode of its block
    group deleted in the last minute (or five, until written back), so where other programs
    (or the claims) make and delete files near ``tmp/``, each create costs a scan of them
    (150-250 us of CPU measured on such a disk, against under 10 us in a quiet group). The
    per-process folders (`OwnTempDir`) then live in quiet groups of their own, where files
    are made and renamed away, never deleted, so their creates stay cheap."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        (flags,) = _FLAGS.unpack(fcntl.ioctl(fd, _GET_FLAGS, _FLAGS.pack(0)))
        if not flags & _TOPDIR:
            fcntl.ioctl(fd, _SET_FLAGS, _FLAGS.pack(flags | _TOPDIR))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class OwnTempDir:
    """This process's folder under *root*, created and locked by `claim`."""

    def __init__(self, root: str, name: str, lock_fd: int) -> None:
        self.root = root
        self.name = name
        self.folder = os.path.join(root, name)
        self.lock_path = self.folder + LOCK_SUFFIX
        self.pid = os.getpid()
        self._lock_fd: int | None = lock_fd
        _claimed.add(self)

    @classmethod
    def claim(cls, root: str) -> OwnTempDir:
        """Make and lock a new folder of this process's own under *root*. Raises ``OSError``."""
        while True:
            name = f"{FOLDER_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
            lock_path = os.path.join(root, name + LOCK_SUFFIX)
            fd = os.open(lock_path, _OPEN_LOCK | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Between the create and the lock another process's clean-up may have taken
                # the lock and removed the file: then ours is a lock on nothing; start over.
                if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(lock_path)
                os.mkdir(os.path.join(root, name), 0o700)
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                remove_quietly(lock_path)
                raise
            return cls(root, name, fd)

    @property
    def alive(self) -> bool:
        """True while the lock is held by this very process (not a forked copy)."""
        return self._lock_fd is not None and self.pid == _pid

    def clear(self, min_age: float = 0.0) -> int:
        """Remove this process's files last modified at least *min_age* seconds ago."""
        return _remove_files(self.folder, min_age)

    def release(self) -> int:
        """Remove the folder with every file in it, then the lock; return the files removed."""
        removed = 0
        if self.alive:
            removed = _remove_tree(self.folder)
            remove_quietly(self.lock_path)
        self.forget()
        return removed

    def forget(self) -> None:
        """Close this copy of the lock (in a forked child: the parent keeps its lock)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)


def _forget_inherited() -> None:
    global _pid
    _pid = os.getpid()
    for owned in list(_claimed):
        owned.forget()


if hasattr(os, "register_at_fork"):
    # A forked child must not keep its parent's folders "alive" after the parent is gone.
    os.register_at_fork(after_in_child=_forget_inherited)


def remove_stale(root: str, own: OwnTempDir | None, min_age: float = 0.0) -> int:
    """Remove what under *root* is provably stale (see the module docstring); return the
    number of files removed. *own*'s folder and lock are left alone."""
    removed = 0
    cutoff = time.time() - min_age
    own_names = {own.name, own.name + LOCK_SUFFIX} if own is not None else set()
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except FileNotFoundError:
        return 0
    names = {entry.name for entry in entries}
    for entry in entries:
        name = entry.name
        if name in own_names:
            continue
        try:
            if name.startswith(FOLDER_PREFIX) and name.endswith(LOCK_SUFFIX):
                removed += _remove_if_unlocked(root, name[: -len(LOCK_SUFFIX)])
            elif name.startswith(FOLDER_PREFIX) and entry.is_dir(follow_symlinks=False):
                if name + LOCK_SUFFIX not in names and not os.path.exists(entry.path + LOCK_SUFFIX):
                    removed += _remove_tree(entry.path)  # its owner and lock are gone
            elif (entry.is_file(follow_symlinks=False) or entry.is_symlink()) and (
                not min_age or entry.stat(follow_symlinks=False).st_mtime <= cutoff
            ):
                os.unlink(entry.path)  # a loose file: made by no process keeping a folder
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _remove_if_unlocked(root: str, name: str) -> int:
    """Remove folder *name* and its lock file if no live process holds the lock."""
    lock_path = os.path.join(root, name + LOCK_SUFFIX)
    try:
        fd = os.open(lock_path, _OPEN_LOCK)
    except (FileNotFoundError, IsADirectoryError):
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its owner is alive
        removed = _remove_tree(os.path.join(root, name))
        remove_quietly(lock_path)
        return removed
    finally:
        os.close(fd)


def _remove_files(folder: str, min_age: float) -> int:
    removed = 0
    cutoff = time.time() - min_age
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                continue
            if min_age and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def _remove_tree(folder: str) -> int:
    """Remove *folder* and what is in it; return the number of files that were in it."""
    count = 0
    for _dirpath, _dirs, files in os.walk(folder):
        count += len(files)
    shutil.rmtree(folder, ignore_errors=True)
    return count


def remove_quietly(path: str | None) -> None:
    """Remove a (temporary) file if it is still there; None or "" is nothing to remove.

    The one quiet delete of the store and of those who leave files in it (the importer's
    listings and failed downloads, the streamer's claims)."""
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
