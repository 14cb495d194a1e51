"""FSDP2 under torchrun on the CPU (gloo): a 2-process run matches 1 process on the same global batch, with the
teacher sharded, or offloaded (--teacher-offload) with the student's layers checkpointed (--grad-checkpointing), and
its DCP checkpoint resumes in one process (another world size)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckaqad_cli import checkpoints, distributed

WORKER = Path(__file__).parent / "distill_worker.py"
# w4a16: the weights' NVFP4 scales do not depend on the batch. (W4A4's dynamic per-tensor activation scale is taken
# over each process's own micro-batch, so 2 processes quantize activations slightly differently from 1.)
ARGS = ["--scheme", "w4a16", "--steps", "6", "--save-every", "2", "--lambda-cka", "0.5"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    return env


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _torchrun(out: Path, *args: str) -> dict:
    """A 2-process run of the worker; rank 0's summary."""
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
                 str(out), *ARGS, *args])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _run([sys.executable, str(WORKER), str(root / "one"), *ARGS])
    summaries = {
        "two": _torchrun(root / "two"),
        "offload": _torchrun(root / "offload", "--teacher-offload", "--grad-checkpointing"),
    }
    (root / "summaries.json").write_text(json.dumps(summaries))
    return root


def _assert_same_run(one: list[dict], two: list[dict]) -> None:
    assert [(r["step"], r["type"]) for r in one] == [(r["step"], r["type"]) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "kl", "cka_term", "grad_norm", "eval_kl", "eval_cka_mean"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-8), (a["step"], key)


def test_two_processes_match_one_process(runs):
    one = _metrics(runs / "one")
    _assert_same_run(one, _metrics(runs / "two"))
    losses = [r["loss"] for r in one if r["type"] == "train"]
    assert len(set(losses)) == len(losses)  # the run really trains: every step's loss differs
    assert (runs / "two" / "checkpoints" / "step-6" / "dcp" / ".metadata").is_file()
    offload = json.loads((runs / "summaries.json").read_text())["two"]["cpu_offload"]
    assert offload == {"student": [False] * 4, "teacher": [False] * 4}


def test_teacher_offload_and_grad_checkpointing_under_fsdp2_keep_the_same_losses(runs):
    """--teacher-offload: every teacher unit gets FSDP2's CPUOffloadPolicy (on the CPU its copies are no-ops, so this
    checks the wiring and that the losses do not change; the memory saving itself needs a GPU). The same run
    recomputes the student's sharded layers in backward (--grad-checkpointing), which must not change them either."""
    summaries = json.loads((runs / "summaries.json").read_text())
    assert summaries["offload"]["cpu_offload"] == {"student": [False] * 4, "teacher": [True] * 4}
    assert summaries["offload"]["attention_calls"] == summaries["two"]["attention_calls"] + 6  # 1 recompute a step
    _assert_same_run(_metrics(runs / "one"), _metrics(runs / "offload"))


def test_fused_moe_experts_under_fsdp2_match_one_process(tmp_path):
    """NVFP4Experts hands out its 3-D expert weights fake-quantized; between forwards FSDP2 reads them back as its
    sharded DTensor parameters, which must come back as they are (quantizing them there crashed every MoE run under
    torchrun). Two processes then train as one does."""
    args = [*ARGS, "--arch", "qwen3_moe", "--steps", "3"]
    _run([sys.executable, str(WORKER), str(tmp_path / "one"), *args])
    _torchrun(tmp_path / "two", *args)
    one = _metrics(tmp_path / "one")
    _assert_same_run(one, _metrics(tmp_path / "two"))
    assert len({r["loss"] for r in one if r["type"] == "train"}) == 3


def test_dcp_checkpoint_resumes_in_one_process(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    shutil.rmtree(resumed / "student")
    assert checkpoints.complete_steps(resumed / "checkpoints") == [4]
    _run([sys.executable, str(WORKER), str(resumed), *ARGS, "--resume"])
    one, again = _metrics(runs / "one"), _metrics(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in one]
    final_one, final_again = one[-1], again[-1]
    assert final_again["eval_kl"] == pytest.approx(final_one["eval_kl"], rel=2e-4)


def test_single_process_helpers_are_identity():
    ctx = distributed.DistContext()
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.gather_rows(x, ctx) is x
    assert distributed.any_rank(True, ctx) and not distributed.any_rank(False, ctx)
    torch.testing.assert_close(distributed.all_reduce_mean(torch.tensor(2.0), ctx), torch.tensor(2.0))


def test_flattened_optimizer_state_round_trips_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ctx = distributed.DistContext()
    flat = distributed.full_optimizer_state(model, opt, ctx)
    assert "state.0.weight.exp_avg" in flat and flat["param_groups.1.bias.lr"] == pytest.approx(1e-2)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    distributed.load_full_state(model2, opt2, model.state_dict(), flat, ctx)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
        torch.testing.assert_close(p, q)


# --- the documented torchrun launch ------------------------------------------------------------------------------
REPO = Path(__file__).parent.parent


def _documented_torchrun_lines() -> list[str]:
    """Every `torchrun ...` command of the README and docs/distributed.md (continuation lines joined)."""
    lines = []
    for doc in (REPO / "README.md", REPO / "docs" / "distributed.md"):
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        lines += [line.strip() for line in text.splitlines() if line.startswith("torchrun ")]
    return lines


def test_documented_torchrun_lines_reach_ckaqad_whole():
    """torchrun's parser reads every argument, those after the script too, and refuses an abbreviation of one of its
    own options: `--run` (its --run-path). Each documented line must give ckaqad all its arguments, untouched."""
    from torch.distributed.run import get_args_parser

    lines = _documented_torchrun_lines()
    assert len(lines) >= 4, lines
    for line in lines:
        argv = shlex.split(re.sub(r"\$[A-Z_]+", "1", line), comments=True)[1:]  # $NODE_RANK, $MASTER: a value
        args = get_args_parser().parse_args(argv)  # SystemExit (exit 2) on an ambiguous option
        assert args.module and args.training_script == "ckaqad_cli.app", line
        assert args.training_script_args == argv[argv.index("ckaqad_cli.app") + 1:], line
        assert "--run-dir" in args.training_script_args, line


def test_no_ckaqad_option_is_taken_by_torchrun():
    """Every option of every command (both spellings of a flag, `OPT X` and `OPT=X`) passes torchrun's parser to the
    script, except `--run`, which the docs replace with its other name --run-dir under torchrun."""
    from torch.distributed.run import get_args_parser
    from typer.main import get_command

    from ckaqad_cli.app import app

    group = get_command(app)
    checked = 0
    for name, command in group.commands.items():
        ctx = command.make_context(name, [], resilient_parsing=True)
        for param in command.get_params(ctx):
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if opt == "--run" or not opt.startswith("-"):
                    continue
                for tail in ([opt, "x"], [f"{opt}=x"]):
                    argv = ["--standalone", "--nproc-per-node", "2", "-m", "ckaqad_cli.app", name, *tail]
                    try:
                        args = get_args_parser().parse_args(argv)
                    except SystemExit:
                        pytest.fail(f"torchrun refuses `{name} {' '.join(tail)}`")
                    assert args.training_script_args == [name, *tail]
                    checked += 1
    assert checked > 100


@pytest.mark.slow
def test_documented_cpu_torchrun_line_runs(tmp_path):
    """The CPU line of docs/distributed.md, exactly as written, in an empty directory: 2 processes with gloo."""
    (line,) = [line for line in _documented_torchrun_lines() if "--device cpu" in line]
    argv = shlex.split(line)
    launcher = Path(sys.executable).parent / "torchrun"
    argv[:1] = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / argv[argv.index("--run-dir") + 1]
    stage = json.loads((run / "run.json").read_text())["stages"]["distill"]
    steps = int(argv[argv.index("--steps") + 1])
    assert stage["status"] == "done" and stage["config"]["world_size"] == 2 and stage["config"]["steps"] == steps
    assert [r["step"] for r in _metrics(run / "distill") if r["type"] == "train"] == list(range(1, steps + 1))
    assert (run / "distill" / "student").is_dir()


_TEARDOWN_SCRIPT = """
import sys, time
from ckaqad_cli import distributed
ctx = distributed.setup("cpu")
if ctx.rank == 0:
    time.sleep(2.0)
distributed.teardown(ctx, finished=sys.argv[1] == "finished")
print(f"{ctx.rank} {time.time()}")
"""


@pytest.mark.parametrize("finished", [True, False])
def test_teardown_waits_for_every_rank_only_after_success(tmp_path, finished):
    """After a run that ended on every rank, no rank leaves the process group (and exits) before the others are done
    with it; after an error, a rank leaves at once (the others may never come). Both ranks exit cleanly."""
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN_SCRIPT)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                 "finished" if finished else "error"])
    left = dict(line.split() for line in proc.stdout.split("\n") if line.strip())
    gap = float(left["0"]) - float(left["1"])  # rank 0 slept 2 s before leaving
    assert (abs(gap) < 1.0) if finished else (gap > 1.5), gap
