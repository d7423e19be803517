"""The examples of Pulp's download documentation (the seeds), each run as written with Twisted
types, in a child process (plain code, as a plugin writer's script would be): basic fetch(),
parallel downloads in a DeferredList, downloads from a remote and a remote artifact, validation
(the documentation's own md5 example), a downloader for a new scheme through
downloader_overrides, a custom download behaviour (another mirror after a 404), a
GroupDownloader, and many downloads from plain code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest_twisted

import downloaders
from tests.support.clients import run_process
from tests.support.faults import Serve

ROOT = str(Path(downloaders.__file__).resolve().parents[1])
A = b"first file\n" * 300
B = b"second file\n" * 200
MD5 = hashlib.md5(A).hexdigest()  # the documentation's own example digest

PLAIN = """
import json, sys
from downloaders import DownloaderFactory, GroupDownloader, Group, HttpDownloader, fetch_all
from importer import Remote
from store import CatalogEntry

base, md5, sha256, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = {}

# Basic Downloading
downloader = HttpDownloader(base + 'a.bin')
result = downloader.fetch()
first = open(result.path, 'rb').read(5).decode()
out['basic'] = [result.url, result.artifact_attributes['size'], first]

# Configuring from a Remote
my_remote = Remote(name='example', url=base + 'PULP_MANIFEST', allowed_digests=['md5', 'sha256'])
downloader = my_remote.get_downloader(url=base + 'a.bin')
out['remote'] = downloader.fetch().artifact_attributes['sha256']

# ... or from a remote artifact (here: a catalog entry), with digest and size validation
ra = CatalogEntry('example/a.bin', 'example', base + 'a.bin', size, {'sha256': sha256})
downloader = my_remote.get_downloader(remote_artifact=ra)
out['remote_artifact'] = [downloader.expected_size, downloader.fetch().artifact_attributes['size']]

# Validation: the documentation's md5 example, allowed by the remote's allowed_digests
downloader = my_remote.get_downloader(url=base + 'a.bin', expected_digests={'md5': md5})
out['md5'] = downloader.fetch().artifact_attributes['md5']

# The DownloaderFactory
the_factory = DownloaderFactory(my_remote)
downloader = the_factory.build(base + 'b.bin')
result = downloader.fetch()  # 'result' is a DownloadResult
out['factory'] = [result.headers['content-length'], DownloaderFactory.user_agent().split('/')[0]]

# Many downloads from plain code
results = fetch_all([the_factory.build(base + name) for name in ('a.bin', 'missing', 'b.bin')])
out['fetch_all'] = [type(r).__name__ for r in results]

# A GroupDownloader: a content unit is reported when all of its files are there
groups = [Group('unit-1', [base + 'a.bin', base + 'b.bin']), Group('unit-2', [base + 'b.bin'])]
out['groups'] = sorted((r.key, r.ok) for r in GroupDownloader(the_factory, groups).fetch())
print(json.dumps(out))
"""

REACTOR = """
import json, os, sys
from twisted.internet import defer, task
from downloaders import BaseDownloader, DownloaderFactory, HttpDownloader, NotFound
from importer import Remote

base = sys.argv[1]


# Adding New Protocol Support: a BaseDownloader subclass, given through downloader_overrides
class EchoDownloader(BaseDownloader):
    async def _run(self, extra_data=None):
        await self.handle_data(self.url.encode())
        await self.finalize()


# Custom Download Behavior: catch a 404 and try another mirror
class MirrorDownloader(HttpDownloader):
    mirrors = [base + 'mirror/']

    async def _run(self, extra_data=None):
        try:
            return await super()._run(extra_data)
        except NotFound:
            for mirror in self.mirrors:
                other = HttpDownloader(mirror + self.url.rsplit('/', 1)[1], self.session)
                result = await other.run()
                with open(result.path, 'rb') as f:
                    await self.handle_data(f.read())
                os.unlink(result.path)
                await self.finalize()
                return
            raise


async def main(reactor):
    out = {}
    # Parallel Downloading
    download_deferreds = [
        HttpDownloader(base + 'a.bin').run(),
        HttpDownloader(base + 'b.bin').run(),
        HttpDownloader(base + 'missing').run(),
    ]
    done = await defer.DeferredList(download_deferreds, consumeErrors=True)
    out['parallel'] = []
    for ok, result in done:
        size = result.artifact_attributes['size'] if ok else type(result.value).__name__
        out['parallel'].append(size)

    factory = DownloaderFactory(
        Remote(name='r', url=base + 'PULP_MANIFEST'),
        {'echo': EchoDownloader, 'http': MirrorDownloader},
    )
    result = await factory.build('echo://hello').run()
    out['echo'] = open(result.path).read()
    result = await factory.build(base + 'only-on-mirror.bin').run()
    out['mirror'] = open(result.path, 'rb').read().decode()
    print(json.dumps(out))


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


async def run_example(script: str, *args: str, tmp_path: Path) -> dict:
    env = {"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    code, out, err = await run_process("python3", "-c", script, *args, env=env, timeout=60)
    assert code == 0, err.decode()
    return json.loads(out)


@pytest_twisted.ensureDeferred
async def test_the_seeds_examples_from_plain_code(upstream, tmp_path):
    upstream.check_leaks = False  # the child's keep-alive connections close when it exits
    upstream.register("/repo/a.bin", Serve(A))
    upstream.register("/repo/b.bin", Serve(B))
    base = upstream.url("/repo/")
    sha256 = hashlib.sha256(A).hexdigest()

    out = await run_example(PLAIN, base, MD5, sha256, str(len(A)), tmp_path=tmp_path)

    assert out["basic"] == [base + "a.bin", len(A), "first"]
    assert out["remote"] == sha256
    assert out["remote_artifact"] == [len(A), len(A)]
    assert out["md5"] == MD5
    assert out["factory"] == [str(len(B)), "twisted-streamer"]
    assert out["fetch_all"] == ["DownloadResult", "NotFound", "DownloadResult"]
    assert out["groups"] == [["unit-1", True], ["unit-2", True]]


@pytest_twisted.ensureDeferred
async def test_the_seeds_examples_in_the_reactor(upstream, tmp_path):
    upstream.check_leaks = False
    upstream.register("/repo/a.bin", Serve(A))
    upstream.register("/repo/b.bin", Serve(B))
    upstream.register("/repo/mirror/only-on-mirror.bin", Serve(b"from the mirror"))

    out = await run_example(REACTOR, upstream.url("/repo/"), tmp_path=tmp_path)

    assert out["parallel"] == [len(A), len(B), "NotFound"]
    assert out["echo"] == "echo://hello"
    assert out["mirror"] == "from the mirror"
