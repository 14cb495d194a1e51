"""Benchmark `ckaqad pack` as users run it: whole commands, each in a fresh process, against `cp -r` of the same
checkpoint, `python -c "import torch"` (the start-up no Python tool escapes) and the peers' own NVFP4 compression of
the same checkpoint (benchmarks/peer_compressed_tensors.py, benchmarks/peer_modelopt.py).

    python benchmarks/bench_pack.py --hidden 2048 --intermediate 8192 --layers 14 --vocab 32000 --with-8gb
    python benchmarks/bench_pack.py --scale-rules amax,four-over-six,mse,mse-act --skip-peers --skip-verify

Method: a synthetic bf16 Llama checkpoint is written once (one tensor at a time): 2.14 GB with the geometry above
(the default); with --with-8gb, then one of 8.3 GB, timed without the peers and --verify (their models would not fit
in memory beside the page cache). One warm-up round runs every command once, not counted (it puts the checkpoint in
the page cache and compiles what compiles at first use), and --rounds rounds follow, each running every command once,
in an order rotated from round to round. What a command wrote is deleted after it, untimed. For each command: median
wall and CPU (user + sys) seconds and peak RSS (the process's maxrss; this script imports nothing heavy, so none of
its own carries over); and for each round, its wall time over the copy's in the same round, and over the copy's plus
`import torch`'s: median (min-max) of those ratios.
Writes the Markdown table to --results (default benchmarks/results_pack_cpu.md) and prints it.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckaqad_cli.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent


def write_synthetic_checkpoint(
    directory: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, shard_bytes: int = 10**9, seed: int = 0
) -> tuple[int, int]:
    """A Llama checkpoint of random bf16 weights (config, tokenizer, shards); returns (total bytes, largest tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ckaqad_cli.builtin.tokenizer import build_tokenizer
    from ckaqad_cli.safetensors_io import TensorSpec
    from ckaqad_cli.safetensors_write import ShardedWriter

    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, tie_word_embeddings=False,
        dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    specs = [TensorSpec(n, torch.bfloat16, tuple(p.shape)) for n, p in model.state_dict().items()]
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(directory, specs, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for spec in specs:
        scale = 1.0 if len(spec.shape) == 1 else 0.02
        writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * scale).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


@dataclass
class Command:
    label: str
    argv: list[str]
    writes: list[Path]
    """What it leaves behind, deleted after each run."""
    peer: bool = False
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    x_copy: list[float] = field(default_factory=list)
    """Each round's wall time over the copy's in that round."""
    x_floor: list[float] = field(default_factory=list)
    """Each round's wall time over the copy's plus `import torch`'s in that round."""
    failed: str | None = None


def _run(cmd: Command, cwd: Path) -> float | None:
    """Run once in a fresh process; record wall, CPU and peak RSS; return the wall seconds (None if it failed)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd.argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    for path in cmd.writes:
        shutil.rmtree(path, ignore_errors=True)
    if proc.returncode:
        lines = stderr.decode(errors="replace").strip().splitlines() or [f"exit {proc.returncode}"]
        cmd.failed = lines[-1][:200]
        return None
    cmd.wall.append(wall)
    cmd.cpu.append(usage.ru_utime + usage.ru_stime)
    cmd.rss.append(usage.ru_maxrss * 1024)
    return wall


def _ratio(values: list[float]) -> str:
    if not values:
        return ""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commands(src: Path, work: Path, *, peers: bool, verify: bool, rules: tuple[str, ...] = ()) -> list[Command]:
    ckaqad = Path(sys.executable).with_name("ckaqad")
    ckaqad = str(ckaqad) if ckaqad.exists() else (shutil.which("ckaqad") or "ckaqad")
    out, run = work / "out", work / "run"

    def pack(fmt: str, verify: str, rule: str | None = None) -> Command:
        argv = [ckaqad, "pack", "--run", str(run), "--model", str(src), "--out", str(out), "--format", fmt,
                "--scheme", "w4a16", verify]
        label = f"--format {fmt} --scheme w4a16 {verify}"
        if rule is not None:
            extra = ["--scale-rule", rule] + (["--calib-data", "builtin"] if rule == "mse-act" else [])
            argv += extra
            label += " " + " ".join(extra)
        return Command(f"`ckaqad pack {label}`", argv, [out, run])

    commands = [
        Command("`cp -r`", ["cp", "-r", str(src), str(out)], [out]),
        Command('`python -c "import torch"`', [sys.executable, "-c", "import torch"], []),
    ]
    if rules:  # the scale rules' cost: one compressed-tensors pack per rule
        commands += [pack("compressed-tensors", "--no-verify", rule) for rule in rules]
    else:
        commands += [pack("compressed-tensors", "--no-verify"), pack("modelopt", "--no-verify")]
    if verify:
        commands.append(pack("compressed-tensors", "--verify"))
    if peers:
        for script, dist, what in (
            ("peer_compressed_tensors.py", "compressed-tensors", "compressed-tensors' own compression (NVFP4A16)"),
            ("peer_modelopt.py", "nvidia-modelopt", "ModelOpt quantize + export_hf_checkpoint (W4A16_NVFP4)"),
        ):
            if _version(dist) != "not installed":
                argv = [sys.executable, str(HERE / script), str(src), str(out)]
                commands.append(Command(f"{what}: `python benchmarks/{script}`", argv, [out], peer=True))
    return commands


@dataclass(frozen=True)
class Geometry:
    hidden: int
    intermediate: int
    layers: int
    vocab: int


EIGHT_GB = Geometry(hidden=4096, intermediate=14336, layers=16, vocab=32000)
"""8.3 GB of tensors (the width of an 8B Llama, half its depth): --with-8gb."""


def _checkpoint(src: Path, geometry: Geometry) -> tuple[int, str]:
    """Write the synthetic checkpoint in a child process (so this one stays small): (its bytes, its description)."""
    code = (
        "import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from bench_pack import write_synthetic_checkpoint as w; "
        "print(json.dumps(w(Path(sys.argv[2]), hidden=int(sys.argv[3]), intermediate=int(sys.argv[4]), "
        "layers=int(sys.argv[5]), vocab=int(sys.argv[6]))))"
    )
    g = geometry
    argv = [sys.executable, "-c", code, str(HERE), str(src), *map(str, (g.hidden, g.intermediate, g.layers, g.vocab))]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=src.parent)
    total, largest = json.loads(done.stdout.strip().splitlines()[-1])
    return total, (f"synthetic bf16 Llama, hidden {g.hidden}, intermediate {g.intermediate}, {g.layers} layers, "
                   f"vocab {g.vocab}: {total / 1e9:.2f} GB of tensors (largest {largest / 1e6:.0f} MB) in 1 GB shards")


def bench(geometry: Geometry, args: argparse.Namespace, *, peers: bool, verify: bool) -> list[str]:
    """Time every command on a synthetic checkpoint of ``geometry``; the Markdown lines of its section."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_pack.", dir=args.workdir))
    src = work / "src"
    try:
        t = time.perf_counter()
        total, checkpoint = _checkpoint(src, geometry)
        print(f"{checkpoint}; written in {time.perf_counter() - t:.0f} s", flush=True)
        commands = _commands(src, work, peers=peers, verify=verify, rules=args.scale_rules)
        load_before = os.getloadavg()
        round_loads = []
        for i in range(args.rounds + 1):  # round 0: the warm-up
            round_loads.append(os.getloadavg()[0])
            order = commands[i % len(commands):] + commands[: i % len(commands)]
            walls = {}
            for cmd in order:
                if cmd.peer and i > args.peer_rounds:
                    continue
                print(f"round {i}: {cmd.label}", flush=True)
                walls[cmd.label] = _run(cmd, work)
            if i == 0:
                for cmd in commands:
                    cmd.wall, cmd.cpu, cmd.rss = [], [], []
                continue
            copy, torch_ = walls[commands[0].label], walls[commands[1].label]
            for cmd in commands[2:]:
                if walls.get(cmd.label) and copy and torch_:
                    cmd.x_copy.append(walls[cmd.label] / copy)
                    cmd.x_floor.append(walls[cmd.label] / (copy + torch_))
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"### {total / 1e9:.2f} GB checkpoint",
        "",
        textwrap.fill(f"Checkpoint: {checkpoint}. Load average (1/5/15 min) "
                      f"{' / '.join(f'{x:.1f}' for x in load_before)} before, "
                      f"{' / '.join(f'{x:.1f}' for x in load_after)} after; 1-minute load average as each round "
                      f"began (round 0 the warm-up): {', '.join(f'{x:.1f}' for x in round_loads)}.", 120),
        "",
        "| command | runs | wall (s) | CPU (s) | peak RSS (MB) | x copy | x (copy + torch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for cmd in commands:
        if not cmd.wall:
            lines.append(f"| {cmd.label} | 0 | failed: {cmd.failed} | | | | |")
            continue
        lines.append(
            f"| {cmd.label} | {len(cmd.wall)} | {statistics.median(cmd.wall):.2f} | {statistics.median(cmd.cpu):.2f} | "
            f"{max(cmd.rss) / 1e6:.0f} | {_ratio(cmd.x_copy)} | {_ratio(cmd.x_floor)} |"
        )
    lines += [f"- {c.label} failed in some run: {c.failed}" for c in commands if c.failed and c.wall]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--with-8gb", action="store_true",
                    help="Then the same on an 8.3 GB checkpoint, without the peers and --verify (needs 20 GB of disk).")
    ap.add_argument("--rounds", type=int, default=5, help="Counted rounds of every command (default 5).")
    ap.add_argument("--peer-rounds", type=int, default=3,
                    help="Counted rounds that also run the peers (the first ones; default 3; they take minutes).")
    ap.add_argument("--skip-peers", action="store_true", help="Leave out the peers' own compression.")
    ap.add_argument("--skip-verify", action="store_true", help="Leave out `ckaqad pack --verify`.")
    ap.add_argument("--scale-rules", type=lambda v: tuple(r.strip() for r in v.split(",") if r.strip()), default=(),
                    help="Comma-separated scale rules (e.g. amax,four-over-six,mse,mse-act): time one "
                         "compressed-tensors pack per rule (mse-act calibrating on the built-in data) instead of the "
                         "two formats' "
                         "(docs/nvfp4.md, \"Scale rules\"). Default: none.")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="Where to write, made if missing (default: the temp dir; removed after).")
    ap.add_argument("--results", type=Path, default=HERE / "results_pack_cpu.md")
    args = ap.parse_args()
    lines = [
        "## `ckaqad pack` as a command",
        "",
        textwrap.fill(f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, {datetime.date.today()}. torch "
                      f"{_version('torch')}, transformers {_version('transformers')}, compressed-tensors "
                      f"{_version('compressed-tensors')}, nvidia-modelopt {_version('nvidia-modelopt')}.", 120),
        "",
        "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "`",
        "",
        textwrap.fill(f"Whole commands in fresh processes, checkpoint in the page cache, after a warm-up round; "
                      f"{args.rounds} rounds ({args.peer_rounds} for the peers); medians. x copy: each round's wall "
                      "time over `cp -r`'s in that round; x (copy + torch): over `cp -r`'s plus `python -c \"import "
                      "torch\"`'s; median (min-max) over the rounds.", 120),
        "",
    ]
    geometry = Geometry(args.hidden, args.intermediate, args.layers, args.vocab)
    lines += bench(geometry, args, peers=not args.skip_peers, verify=not args.skip_verify)
    if args.with_8gb:
        lines += bench(EIGHT_GB, args, peers=False, verify=False)
    text = "\n".join(lines)
    atomic_write_text(args.results, text)
    print(text)


if __name__ == "__main__":
    main()
