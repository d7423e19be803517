#!/usr/bin/env python3
"""CPU time per request, the streamer beside the aiohttp peer: the A/B measure that holds on a
busy machine, where requests per second move 2-4x between runs but the CPU a request costs
hardly does.

    python bench/cpu_bench.py [--repeat 3] [--files 1000] [--size 16384] [--processes 1]
        [--parallel 10]

Per round (contenders rotated; each round starts cold): ``curl -Z`` fetches every file once
(cold: lazy download, tee, validation, commit), then once more (warm: from the store), with
``--parallel`` keep-alive transfers. For each contender and phase: user and system CPU of its
processes (the streamer's group: the first process, its threads and helpers) from
``/proc/PID/stat``, divided by the requests, and the requests per second; and the share of
that CPU spent by threads beside each process's main thread (the streamer's committing and
catalog threads: ``/proc/PID/task/TID/stat``). Medians of the rounds; raw numbers go to
``bench/raw/cpu-*.json``.
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
    Nginx,
    free_port,
    group_pids,
    machine,
    make_fixture,
    record_raw,
    set_aside,
    start_aiohttp_proxy,
    start_streamer,
    stop,
    streamer_config,
    wait_port,
)
from stream_bench import small_files_rate

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of *pids* (every thread of each), so far."""
    user = system = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def thread_seconds(pids: list[int]) -> float:
    """CPU seconds so far of the threads of *pids* other than each one's main thread (the
    reactor): the committing thread, the catalog's, resolvers. Split out because their work
    runs beside the reactor's, and because per-thread figures move less between runs."""
    total = 0.0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            if task.name == str(pid):
                continue
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--processes", type=int, default=1, help="[server] processes")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    trash = work / "trash"
    samples: dict[str, list[float]] = {}
    procs: list[subprocess.Popen] = []
    nginx: Nginx | None = None
    print(f"# {machine()}", flush=True)
    try:
        fixture = work / "upstream"
        make_fixture(fixture, args.files, args.size)
        static, proxy, aio, ours = (free_port() for _ in range(4))
        nginx = Nginx(fixture, static, proxy, work / "nginx")
        nginx.start()
        upstream = f"http://127.0.0.1:{static}"
        procs.append(start_aiohttp_proxy(upstream, aio, work / "aio"))
        config = streamer_config(
            work / "streamer.toml", ours, work / "var", upstream, f"processes = {args.processes}"
        )
        subprocess.run(["streamer", "--config", config, "sync"], check=True, capture_output=True)
        streamer = start_streamer(config, work / "twistd.log")
        procs.append(streamer)
        wait_port(aio)
        wait_port(ours)
        time.sleep(1 if args.processes == 1 else 3)  # helpers start after the port answers
        contenders = {
            "aiohttp": (f"http://127.0.0.1:{aio}", [procs[0].pid], work / "aio" / "store"),
            "streamer": (
                f"http://127.0.0.1:{ours}/bench",
                group_pids(streamer.pid),
                work / "var" / "artifacts",
            ),
        }
        paths = [f"files/{i:05d}.bin" for i in range(args.files)]
        names = list(contenders)
        for turn in range(args.repeat):
            print(f"round {turn + 1} of {args.repeat}", flush=True)
            for _, _, store in contenders.values():
                set_aside(store, trash)
            os.sync()
            order = names[turn % len(names) :] + names[: turn % len(names)]
            for phase in ("cold", "warm"):
                for name in order:
                    base, pids, _ = contenders[name]
                    os.sync()
                    time.sleep(0.3)
                    user0, sys0 = cpu_seconds(pids)
                    threads0 = thread_seconds(pids)
                    rate = small_files_rate(base, paths, args.parallel)
                    user1, sys1 = cpu_seconds(pids)
                    threads1 = thread_seconds(pids)
                    per = 1e3 / len(paths)
                    for key, value in (
                        ("user ms/request", (user1 - user0) * per),
                        ("system ms/request", (sys1 - sys0) * per),
                        ("CPU ms/request", (user1 - user0 + sys1 - sys0) * per),
                        ("of it, other threads, ms/request", (threads1 - threads0) * per),
                        ("req/s", rate),
                    ):
                        samples.setdefault(f"{phase} {key}: {name}", []).append(value)
            time.sleep(0.5)  # the last commits, so the next round starts cold and idle
    finally:
        for proc in procs:
            stop(proc)
        if nginx is not None:
            nginx.stop()

    print(f"\n{args.repeat} rounds; median (min–max)")
    print("| measure | median | spread |\n| --- | ---: | --- |")
    for key, values in samples.items():
        print(f"| {key} | {statistics.median(values):.3f} | {min(values):.3g}–{max(values):.3g} |")
    print("\n| phase | streamer CPU ms/request | aiohttp CPU ms/request | ratio (peer/ours) |")
    print("| --- | ---: | ---: | ---: |")
    for phase in ("cold", "warm"):
        ours_cpu = statistics.median(samples[f"{phase} CPU ms/request: streamer"])
        peer_cpu = statistics.median(samples[f"{phase} CPU ms/request: aiohttp"])
        print(f"| {phase} | {ours_cpu:.3f} | {peer_cpu:.3f} | {peer_cpu / ours_cpu:.2f}x |")
    record_raw("cpu", {"rounds": samples, "args": vars(args)})
    shutil.rmtree(trash, ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
