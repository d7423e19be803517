"""apt against the streamer: a flat repository (``deb [trusted=yes] http://HOST/base/ ./``).

apt asks for ``/base/./InRelease``, ``/base/./Release``, ``/base/./Packages.gz`` and, from
``Filename: ./pkg.deb`` as dpkg-scanpackages writes it, ``/base/./pkg.deb``; the remote's
PULP_MANIFEST lists the same files without ``./``. The repository is built here from small
``.deb`` files (dpkg-deb, dpkg-scanpackages, apt-ftparchive) and apt runs as a user would, but
entirely on private state (sources list, lists, cache, status, no configuration of this
machine), so it touches nothing of the machine's apt.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from tests.clients.mirror import client_env
from tests.support.clients import ProcessResult, run_process
from tests.support.faults import Serve

TOOLS = ("apt-get", "dpkg-deb", "dpkg-scanpackages", "apt-ftparchive")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs apt and dpkg-dev/apt-utils: {', '.join(MISSING)} missing"
)

PACKAGES = ("streamer-test-alpha", "streamer-test-beta")
VERSION = "1.0-1"


def deb_name(package: str) -> str:
    return f"{package}_{VERSION}_all.deb"


def build_flat_repository(folder: Path) -> dict[str, bytes]:
    """Build two small packages and index them as a flat repository; its files by name."""
    repo = folder / "repo"
    repo.mkdir(parents=True)
    for package in PACKAGES:
        root = folder / "build" / package
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: {package}\nVersion: {VERSION}\nArchitecture: all\n"
            f"Maintainer: Tests <tests@example.org>\nDescription: {package} for the apt test\n"
        )
        doc = root / "usr" / "share" / "doc" / package
        doc.mkdir(parents=True)
        (doc / "README").write_text(f"{package}\n" * 200)
        subprocess.run(
            [
                "dpkg-deb",
                "--root-owner-group",
                "-Zgzip",
                "--build",
                str(root),
                str(repo / deb_name(package)),
            ],
            check=True,
            capture_output=True,
        )
    packages = subprocess.run(
        ["dpkg-scanpackages", "-m", ".", "/dev/null"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    assert b"Filename: ./" + deb_name(PACKAGES[0]).encode() in packages
    (repo / "Packages").write_bytes(packages)
    (repo / "Packages.gz").write_bytes(gzip.compress(packages, mtime=0))
    release = subprocess.run(
        ["apt-ftparchive", "release", "."], cwd=repo, check=True, capture_output=True
    ).stdout
    (repo / "Release").write_bytes(release)
    return {path.name: path.read_bytes() for path in repo.iterdir()}


@pytest.fixture
def flat_repository(tmp_path) -> dict[str, bytes]:
    return build_flat_repository(tmp_path / "source")


class PrivateApt:
    """apt-get with its own sources list, lists, cache, archives and status under *root*,
    reading none of this machine's apt configuration."""

    def __init__(self, root: Path, source_line: str) -> None:
        self.root = root
        for folder in (
            "parts",
            "sources.list.d",
            "preferences.d",
            "lists/partial",
            "cache",
            "archives/partial",
            "downloads",
        ):
            (root / folder).mkdir(parents=True)
        (root / "status").write_text("")
        (root / "sources.list").write_text(source_line + "\n")
        # APT_CONFIG is read first: it points apt at an empty configuration folder, so no file
        # of /etc/apt/apt.conf.d (proxies, mirrors) applies.
        (root / "apt.conf").write_text(
            f'Dir::Etc::Parts "{root / "parts"}";\nDir::Etc::Main "/dev/null";\n'
        )
        self.options = [
            f"-oDir::Etc::SourceList={root / 'sources.list'}",
            f"-oDir::Etc::SourceParts={root / 'sources.list.d'}",
            "-oDir::Etc::Preferences=/dev/null",
            f"-oDir::Etc::PreferencesParts={root / 'preferences.d'}",
            f"-oDir::State::Lists={root / 'lists'}",
            f"-oDir::State::Status={root / 'status'}",
            f"-oDir::Cache={root / 'cache'}",
            f"-oDir::Cache::Archives={root / 'archives'}",
            # apt drops privileges to _apt when root: it could not write these private folders.
            "-oAPT::Sandbox::User=root",
            "-oDebug::NoLocking=1",
            "-oAcquire::Languages=none",
            "-oAcquire::Retries=0",
            "-oAcquire::http::Timeout=10",
        ]

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    async def run(self, *args: str) -> ProcessResult:
        env = client_env() | {"APT_CONFIG": str(self.root / "apt.conf"), "LC_ALL": "C"}
        return await run_process(
            "apt-get", *self.options, *args, env=env, cwd=str(self.downloads), timeout=60
        )


def assert_clean(result: ProcessResult, what: str) -> str:
    """apt exited 0 and reported no error or failed fetch; its combined output."""
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.exit_code == 0, f"{what}: {output}"
    assert "Err:" not in output and "\nE:" not in "\n" + output, f"{what}: {output}"
    return output


async def update_and_download(apt: PrivateApt, files: dict[str, bytes]) -> str:
    output = assert_clean(await apt.run("update"), "apt-get update")
    output += assert_clean(await apt.run("download", *PACKAGES), "apt-get download")
    for package in PACKAGES:
        # apt checked each .deb against the SHA256 of Packages.gz: these are the right bytes.
        assert (apt.downloads / deb_name(package)).read_bytes() == files[deb_name(package)]
    return output


@pytest.mark.parametrize("policy", ["on_demand", "streamed"])
@pytest_twisted.ensureDeferred
async def test_apt_flat_repository_update_and_download(
    make_mirror, flat_repository, tmp_path, policy
):
    mirror = await make_mirror(flat_repository, policy=policy)
    source_line = f"deb [trusted=yes] {mirror.base_url} ./"
    fetched = ["Release", "Packages.gz", *(deb_name(p) for p in PACKAGES)]

    first = await update_and_download(PrivateApt(tmp_path / "apt1", source_line), flat_repository)
    assert f"{mirror.base_url.rstrip('/')} ./ Release" in first  # the flat form was used
    for name in fetched:
        assert mirror.upstream_gets(name) == 1, name
    # InRelease and Release.gpg are not published: 404, which apt takes as "not signed".
    assert mirror.upstream_gets("InRelease") == 0

    if policy == "on_demand":
        for name in fetched:
            assert await mirror.stored_soon(name), name
    # A second machine (fresh lists and cache) does it all again.
    await update_and_download(PrivateApt(tmp_path / "apt2", source_line), flat_repository)
    metrics = mirror.env.service.metrics
    for name in fetched:
        if policy == "on_demand":
            assert mirror.upstream_gets(name) == 1, name  # served from the store
        else:
            assert mirror.upstream_gets(name) == 2, name  # streamed keeps nothing
            assert not mirror.is_stored(name), name
    hits = metrics.value("streamer_cache_hits_total")
    assert hits == (len(fetched) if policy == "on_demand" else 0)
    assert mirror.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_apt_update_again_on_a_streamed_remote_revalidates_instead_of_downloading(
    make_mirror, flat_repository, tmp_path
):
    """apt keeps the upstream's Last-Modified as its lists' modification time and asks with
    If-Modified-Since next time: on a `streamed` remote (nothing stored) the condition goes
    upstream, whose 304 reaches apt ("Hit"), and no index is downloaded again."""
    published = "Mon, 01 Jan 2024 00:00:00 GMT"
    behaviours = {
        name: Serve(data, last_modified=published) for name, data in flat_repository.items()
    }
    mirror = await make_mirror(flat_repository, behaviours, policy="streamed")
    apt = PrivateApt(tmp_path / "apt", f"deb [trusted=yes] {mirror.base_url} ./")
    assert_clean(await apt.run("update"), "apt-get update")
    output = assert_clean(await apt.run("update"), "apt-get update")
    assert "Hit:" in output and "Get:" not in output, output
    sent = [r.headers.get("if-modified-since") for r in mirror.upstream.requests("/Release")]
    assert sent == [None, published], sent
    assert mirror.upstream_gets("Packages.gz") == 1
    assert mirror.temp_files() == []
