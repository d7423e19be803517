#!/usr/bin/env python3
"""CPU per small request of two versions of the streamer run side by side: the A/B measure
for changes of a few per cent on a busy machine.

    python bench/pair_bench.py A B [--rounds 6] [--files 1500] [--size 16384]
        [--processes 1] [--parallel 10] [--warm]

*A* and *B* are git revisions of this repository (``main``, ``HEAD~1``, a commit) or
folders holding a source tree. Each round starts both streamers at once (each its own port and
storage folder, one nginx upstream), then one ``curl -Z`` fetches every file from both, their
requests interleaved, so both versions meet the same load from whatever else runs on the
machine; cold (each round starts with empty storage), then warm with ``--warm``. For each
version: the CPU of its first process's main thread (the reactor) and of all its processes and
threads, from ``/proc/PID/task/TID/schedstat`` (nanoseconds on the CPU), per request. The
figure is the median over rounds of B minus A, with each round's difference.

Why not `cpu_bench.py` one version after the other: here its rounds spread by 8-15% (other
work, caches), more than most single changes; paired this way an A/A run differs by about
+-10 us on ~850 us per cold request (1.2%). Tests running at the same time still spoil it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import (
    BENCH,
    Nginx,
    free_port,
    group_pids,
    machine,
    make_fixture,
    record_raw,
    set_aside,
    stop,
    streamer_config,
    wait_port,
)


def source_tree(version: str, work: Path, name: str) -> Path:
    """A folder holding *version*'s tree: *version* itself if it is a folder, else that git
    revision of this repository exported to ``work/name``."""
    if Path(version).is_dir():
        return Path(version).resolve()
    tree = work / name
    tree.mkdir()
    # From the top of the repository: run in bench/, ``git archive`` exports bench/ alone, and
    # the streamer then ran from whatever the installed checkout held, for A and B alike.
    archive = subprocess.run(
        ["git", "archive", version], cwd=BENCH.parent, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if not (tree / "downloaders" / "__init__.py").is_file():
        raise SystemExit(f"{version}: not a source tree of this project")
    return tree


def cpu_ns(pids: list[int]) -> tuple[int, int]:
    """Nanoseconds on the CPU so far: of every thread of *pids*, and of the first one's main
    thread."""
    total = main = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            total += ns
            if int(tid) == pids[0]:
                main += ns
    return total, main


def fetch(urls: list[str], parallel: int, config: Path) -> None:
    """Every url once, ``parallel`` at a time, with curl."""
    config.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for url in urls))
    command = ["curl", "-sS", "--no-progress-meter", "-f", "-Z", "--parallel-max", str(parallel)]
    subprocess.run([*command, "-K", str(config)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="git revision or source folder of version A")
    parser.add_argument("b", help="git revision or source folder of version B")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--processes", type=int, default=1, help="[server] processes")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--warm", action="store_true", help="a warm pass after the cold one")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pair-bench-"))
    work.chmod(0o755)
    trash = work / "trash"
    phases = ["cold", "warm"] if args.warm else ["cold"]
    versions = {"A": args.a, "B": args.b}
    samples: dict[str, list[float]] = {}
    nginx: Nginx | None = None
    print(f"# {machine()}", flush=True)
    try:
        fixture = work / "upstream"
        make_fixture(fixture, args.files, args.size)
        nginx = Nginx(fixture, free_port(), free_port(), work / "nginx")
        nginx.start()
        upstream = f"http://127.0.0.1:{nginx.static_port}"
        setups = {}
        for name, version in versions.items():
            tree = source_tree(version, work, f"tree-{name}")
            port = free_port()
            config = streamer_config(
                work / f"{name}.toml",
                port,
                work / f"var-{name}",
                upstream,
                f"processes = {args.processes}",
            )
            env = dict(os.environ, PYTHONPATH=str(tree))
            sync = ["streamer", "--config", str(config), "sync"]
            subprocess.run(sync, check=True, capture_output=True, env=env)
            setups[name] = (config, port, env)
        paths = [f"files/{i:05d}.bin" for i in range(args.files)]
        for turn in range(args.rounds):
            print(f"round {turn + 1} of {args.rounds}", flush=True)
            for name in versions:
                set_aside(work / f"var-{name}" / "artifacts", trash)
            os.sync()
            procs = {}
            try:
                for name, (config, _, env) in setups.items():
                    procs[name] = subprocess.Popen(
                        [
                            *("twistd", "-n", "--pidfile=", "--logfile"),
                            str(work / f"{name}.log"),
                            *("streamer", "--config", str(config)),
                        ],
                        cwd=work,
                        env=env,
                    )
                for _, port, _ in setups.values():
                    wait_port(port)
                time.sleep(1 if args.processes == 1 else 3)  # helpers start after the port
                bases = {
                    name: f"http://127.0.0.1:{port}/bench" for name, (_, port, _) in setups.items()
                }
                fetch([f"{base}/{paths[0]}" for base in bases.values()], 1, work / "urls")
                pids = {name: group_pids(proc.pid) for name, proc in procs.items()}
                order = list(versions) if turn % 2 == 0 else list(versions)[::-1]
                urls = [f"{bases[name]}/{path}" for path in paths[1:] for name in order]
                for phase in phases:
                    time.sleep(0.3)
                    before = {name: cpu_ns(pids[name]) for name in versions}
                    fetch(urls, args.parallel, work / "urls")
                    after = {name: cpu_ns(pids[name]) for name in versions}
                    per = 1e-3 / (len(paths) - 1)  # ns -> us per request
                    for name in versions:
                        for index, what in enumerate(("all", "main")):
                            spent = (after[name][index] - before[name][index]) * per
                            samples.setdefault(f"{phase} {what} us/request: {name}", []).append(
                                spent
                            )
            finally:
                for proc in procs.values():
                    stop(proc)
    finally:
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nA = {args.a}, B = {args.b}; {args.rounds} rounds")
    print("| phase | threads | A us/request | B us/request | B - A (median) | each round |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for phase in phases:
        for what in ("main", "all"):
            a = samples[f"{phase} {what} us/request: A"]
            b = samples[f"{phase} {what} us/request: B"]
            differences = [y - x for x, y in zip(a, b, strict=True)]
            rounds = " ".join(f"{d:+.0f}" for d in differences)
            print(
                f"| {phase} | {'reactor' if what == 'main' else 'all'} | "
                f"{statistics.median(a):.1f} | {statistics.median(b):.1f} | "
                f"{statistics.median(differences):+.1f} | {rounds} |"
            )
    record_raw("pair", {"rounds": samples, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
