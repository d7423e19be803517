"""bench/pair_bench.py's versions: a git revision becomes a whole source tree."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def pair_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (it imports benchlib beside it)
    spec = importlib.util.spec_from_file_location("pair_bench", BENCH / "pair_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchlib", None)


def test_a_revision_is_exported_whole(pair_bench, tmp_path):
    """Every package of the project, not bench/ alone: the streamer of each version must run
    from its own tree, not from whatever checkout is installed."""
    inside = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=BENCH, capture_output=True, text=True
    )
    if inside.stdout.strip() != "true":
        pytest.skip("not a git checkout")
    tree = pair_bench.source_tree("HEAD", tmp_path, "tree-A")
    for package in ("downloaders", "importer", "store", "streamer"):
        assert (tree / package / "__init__.py").is_file(), package
    assert (tree / "twisted" / "plugins").is_dir()


def test_a_folder_is_taken_as_it_is(pair_bench, tmp_path):
    assert pair_bench.source_tree(str(tmp_path), tmp_path / "unused", "x") == tmp_path
