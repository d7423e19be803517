"""Fixtures for importer tests: an upstream repository folder served on loopback, a storage
root and an open catalog, and helpers to build remotes that are closed at teardown."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted

from importer import Remote
from store import ArtifactStorage, open_catalog
from tests.support.upstream import UpstreamServer


@attrs.define
class Repo:
    """A PULP_MANIFEST repository in a folder: write files, then ``publish()`` the manifest."""

    folder: Path
    files: dict[str, bytes] = attrs.Factory(dict)

    def put(self, relative: str, data: bytes) -> None:
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.files[relative] = data

    def drop(self, relative: str) -> None:
        (self.folder / relative).unlink()
        del self.files[relative]

    def publish(self, extra_lines: tuple[str, ...] = ()) -> None:
        lines = [f"{rel},{sha(data)},{len(data)}" for rel, data in sorted(self.files.items())]
        (self.folder / "PULP_MANIFEST").write_text("\n".join([*lines, *extra_lines]) + "\n")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content(i: int, size: int = 2048) -> bytes:
    return (f"file {i}\n".encode() * (size // 6 + 1))[:size]


@pytest.fixture
def repo(tmp_path: Path, upstream: UpstreamServer) -> Repo:
    """Ten files under ``files/`` published at ``<upstream>/repo/PULP_MANIFEST``."""
    r = Repo(tmp_path / "upstream")
    for i in range(10):
        r.put(f"files/{i:02d}.bin", content(i))
    r.publish()
    upstream.serve_tree("/repo", r.folder)
    return r


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage(tmp_path / "var")


@pytest.fixture
def catalog(tmp_path: Path, storage: ArtifactStorage) -> Iterator[object]:
    cat = open_catalog("", storage.root)
    pytest_twisted.blockon(cat.open())
    yield cat
    pytest_twisted.blockon(cat.close())


@pytest.fixture
def make_remote(upstream: UpstreamServer) -> Iterator[object]:
    """``make_remote(policy, **settings)``: a Remote of ``repo``, closed at teardown."""
    made: list[Remote] = []

    def make(policy: str = "immediate", **kwargs: object) -> Remote:
        kwargs.setdefault("url", upstream.url("/repo/PULP_MANIFEST"))
        kwargs.setdefault("name", "fixtures")
        kwargs.setdefault("max_retries", 0)
        remote = Remote(policy=policy, **kwargs)
        made.append(remote)
        return remote

    yield make
    for remote in made:
        pytest_twisted.blockon(remote.close())


def artifacts(storage: ArtifactStorage) -> dict[str, bytes]:
    """Every stored artifact by sha256, with its bytes."""
    return {digest: Path(path).read_bytes() for digest, path in storage.iter_artifacts()}


def temp_files(storage: ArtifactStorage) -> list[str]:
    return sorted(os.listdir(storage.temp_dir))
