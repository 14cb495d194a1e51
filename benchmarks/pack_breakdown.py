"""Where the time of a `ckaqad` command goes: startup, imports, hashing, read, quantize, write, fsync, exit.

    python benchmarks/pack_breakdown.py [--runs N] -- pack --run R --model SRC --out OUT --scheme w4a16 --no-verify

Runs the command N times (default 3; --run R and --out OUT are removed before each run), each in a fresh process
that wraps the functions that do each job in timers, then runs the command as `ckaqad` would ("imports": from the
first line of Python to the start of the stage: the CLI's and the stage's imports, and the argument parsing). Prints the median of each row as a Markdown table: wall seconds and CPU seconds of the
thread that ran it (the threads of one job added up: reading, hashing and quantizing run on pack's worker threads,
beside the writer on the main thread, so the rows add up to more than the wall time). Each row counts its own time
only (the hash taken inside a read is in "hashing", not in "read"). Startup is from the start of the process to its
first line of Python; exit, from the end of the command to the end of the process (interpreter teardown).
An in-process breakdown: the whole command's time is what bench_pack.py measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

_STARTED = time.time()
_CHILD = "_PACK_BREAKDOWN_CHILD"
ROWS = ("startup", "imports", "hashing", "read", "quantize", "write", "fsync", "other", "exit")


def _child(argv: list[str]) -> None:
    """In the timed process: wrap each job's functions, run the command, print the timers as one JSON line."""
    import atexit
    import collections
    import threading

    wall, cpu = collections.defaultdict(float), collections.defaultdict(float)
    stack = threading.local()

    def timed(row: str, fn):
        def wrapper(*args, **kwargs):
            frames = stack.__dict__.setdefault("frames", [])
            frames.append([0.0, 0.0])  # time of the wrapped calls made inside this one
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dt, dc = time.perf_counter() - t, time.thread_time() - c
                inner = frames.pop()
                wall[row] += dt - inner[0]
                cpu[row] += dc - inner[1]
                if frames:
                    frames[-1][0] += dt
                    frames[-1][1] += dc
        return wrapper

    t, c = time.perf_counter(), time.process_time()
    import ckaqad_cli.app as app
    import ckaqad_cli.stages.pack as stage

    def imports_done(fn):  # the command's imports (its stage's among them) and argument parsing end where it starts
        def wrapper(*args, **kwargs):
            wall["imports"], cpu["imports"] = time.perf_counter() - t, time.process_time() - c
            return fn(*args, **kwargs)
        return wrapper

    import hashlib
    import types

    from ckaqad_cli import safetensors_io, safetensors_write
    from ckaqad_cli.packing import write
    from ckaqad_kernels import dispatch

    safetensors_io.hashlib = types.SimpleNamespace(sha256=timed("hashing", hashlib.sha256))
    stage.run_pack = imports_done(stage.run_pack)
    stage.describe_input = timed("hashing", stage.describe_input)
    safetensors_io.SafetensorsSource.get = timed("read", safetensors_io.SafetensorsSource.get)
    write._checked_amax = timed("quantize", write._checked_amax)
    dispatch.quantize_and_pack = timed("quantize", dispatch.quantize_and_pack)
    safetensors_write.ShardedWriter.write = timed("write", safetensors_write.ShardedWriter.write)
    os.fsync = timed("fsync", os.fsync)

    def report() -> None:  # registered first, so it runs after the command's own exit handlers
        print(json.dumps({"started": _STARTED, "ended": time.time(), "wall": wall, "cpu": cpu}), flush=True)

    atexit.register(report)
    sys.argv = ["ckaqad", *argv]
    app.main()


def _measure(argv: list[str]) -> dict[str, tuple[float, float]]:
    """{row: (wall s, cpu s)} of one run of the command."""
    env = {**os.environ, _CHILD: "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"the command failed (exit {proc.returncode}): ckaqad {' '.join(argv)}")
    timers = json.loads(out.strip().splitlines()[-1])
    rows = {"startup": (timers["started"] - t0, float("nan")), "exit": (t1 - timers["ended"], float("nan"))}
    for row in ROWS:
        if row in timers["wall"]:
            rows[row] = (timers["wall"][row], timers["cpu"][row])
    total_cpu = usage.ru_utime + usage.ru_stime
    rows["other"] = (float("nan"), total_cpu - sum(c for w, c in rows.values() if c == c))
    rows["total (process)"] = (t1 - t0, total_cpu)
    return rows


def main() -> None:
    if os.environ.get(_CHILD):
        _child(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- and the ckaqad command line (without `ckaqad`)")
    args = ap.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    runs = []
    for _ in range(args.runs):
        for flag in ("--run", "--out"):
            if flag in argv:
                shutil.rmtree(argv[argv.index(flag) + 1], ignore_errors=True)
        runs.append(_measure(argv))
    print(f"`ckaqad {' '.join(argv)}`: median of {args.runs} runs, load average {os.getloadavg()[0]:.1f}\n")
    print("| | wall (s) | CPU (s) |\n|---|---|---|")
    for row in runs[0]:
        w, c = (statistics.median(r[row][i] for r in runs) for i in (0, 1))
        print(f"| {row} | {'' if w != w else f'{w:.2f}'} | {'' if c != c else f'{c:.2f}'} |")


if __name__ == "__main__":
    main()
