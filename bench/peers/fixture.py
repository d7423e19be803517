#!/usr/bin/env python3
"""Write an upstream repository for the benchmarks: files of random bytes and their listing.

    python bench/peers/fixture.py DIR [--count 2000] [--size 16384] [--big BYTES]

DIR/files/00000.bin ... hold --count files of --size bytes (and DIR/files/big.bin of --big
bytes when asked); DIR/PULP_MANIFEST lists each as ``relative_path,sha256,size``, the format
our importer reads. Standard library only, so any interpreter can make a fixture.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

BLOCK = 1 << 20


def write_random(path: Path, size: int) -> str:
    """Fill *path* with *size* random bytes; return their sha256 as hex."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        remaining = size
        while remaining > 0:
            data = os.urandom(min(BLOCK, remaining))
            out.write(data)
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


def make_fixture(root: Path, count: int, size: int, big: int = 0) -> list[str]:
    """Write the files and the listing under *root*; return the listing's lines."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    names = [f"files/{n:05d}.bin" for n in range(count)]
    sizes = [size] * count
    if big:
        names.append("files/big.bin")
        sizes.append(big)
    lines = [
        f"{name},{write_random(root / name, n)},{n}" for name, n in zip(names, sizes, strict=True)
    ]
    (root / "PULP_MANIFEST").write_text("".join(line + "\n" for line in lines))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--big", type=int, default=0, help="also files/big.bin of this size")
    args = parser.parse_args()
    lines = make_fixture(args.dir, args.count, args.size, args.big)
    print(f"{len(lines)} files listed in {args.dir / 'PULP_MANIFEST'}")


if __name__ == "__main__":
    main()
