"""The CLI shell: help texts, --version, config files, one-line errors, and `ckaqad status`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ckaqad_cli import __version__
from ckaqad_cli.app import app
from ckaqad_cli.cli.common import handle_errors
from ckaqad_cli.cli.config import NOT_CONFIG, ConfigOption
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir

runner = CliRunner()
COMMANDS = ("diagnose", "distill", "pack", "push", "pipeline", "status")


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ckaqad {__version__}"


def test_root_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_has_help(command):
    """Each option is documented: the help text of every parameter is non-empty and shown by --help."""
    from typer.main import get_command

    click_command = get_command(app).commands[command]
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())  # the panels' text, wrapping undone
    for param in click_command.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        assert getattr(param, "help", None), f"{command} --{param.name} has no help text"
        assert param.opts[0] in result.stdout, f"{param.opts[0]} missing from `{command} --help`"
        # whole, so that no [bracketed] part of it was taken for rich markup and dropped
        assert " ".join(param.help.split()) in shown, f"`{command} --help` mangles the help of {param.opts[0]}"
    for line in click_command.help.split("\n\n")[1].split("\n"):  # the paragraph under the summary line
        assert " ".join(line.split()) in shown, f"`{command} --help` mangles {line!r}"
    assert "Example" in result.stdout or "example" in result.stdout, f"`{command} --help` shows no example"


# --- config files, on a command built only for this test so the mechanism is tested alone ----------------------
def _probe_app(seen: dict) -> typer.Typer:
    probe = typer.Typer()

    @probe.command()
    def run(
        ctx: typer.Context,
        steps: int = typer.Option(10, "--steps", help="steps"),
        lr: float = typer.Option(1e-5, "--lr", help="learning rate"),
        exclude: list[str] = typer.Option([], "--exclude", help="globs"),
        token: str = typer.Option(None, "--token", help="secret"),
        config: Path = ConfigOption,
    ) -> None:
        seen.update({name: value for name, value in ctx.params.items() if name not in NOT_CONFIG})

    @probe.command()
    def other() -> None:
        pass

    return probe


def test_config_file_values_are_used_and_flags_override_them(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 500\nlr: 3.0e-4\nexclude: ['*.mlp.down_proj']\n")
    seen: dict = {}
    result = runner.invoke(_probe_app(seen), ["run", "--config", str(cfg), "--steps", "7", "--token", "hf_x"])
    assert result.exit_code == 0, result.output
    assert seen == {"steps": 7, "lr": 3e-4, "exclude": ["*.mlp.down_proj"]}, "flag wins, file fills, no token"


def test_config_keys_may_use_dashes_and_json(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"--steps": 3, "lr": 0.5}))
    seen: dict = {}
    result = runner.invoke(_probe_app(seen), ["run", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert seen["steps"] == 3 and seen["lr"] == 0.5


def test_config_value_of_a_repeatable_option_may_be_one_value_or_a_list(tmp_path):
    for value, want in (('"*.q_proj"', ["*.q_proj"]), ('["a", "b"]', ["a", "b"])):
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"exclude: {value}\n")
        seen: dict = {}
        result = runner.invoke(_probe_app(seen), ["run", "--config", str(cfg)])
        assert result.exit_code == 0, result.output
        assert seen["exclude"] == want


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 5\nlearning_rate: 0.1\n")
    result = runner.invoke(_probe_app({}), ["run", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "learning_rate" in result.output and "unknown key" in result.output
    assert "Traceback" not in result.output


def test_config_file_of_wrong_shape_or_missing_is_an_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("- 1\n- 2\n")
    result = runner.invoke(_probe_app({}), ["run", "--config", str(cfg)])
    assert result.exit_code == 2 and "mapping" in result.output
    result = runner.invoke(_probe_app({}), ["run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read config file" in result.output


def test_bad_config_value_type_is_a_usage_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: many\n")
    result = runner.invoke(_probe_app({}), ["run", "--config", str(cfg)])
    assert result.exit_code == 2 and "--steps" in result.output


# --- errors ------------------------------------------------------------------------------------------------------
def test_known_error_is_one_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["status", "--run", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error:") and "not a run directory" in result.stderr
    assert "Traceback" not in result.output


def test_unexpected_error_is_one_line_unless_debug(monkeypatch):
    @handle_errors
    def boom() -> None:
        raise ZeroDivisionError("division by zero")

    probe = typer.Typer()
    probe.command()(boom)

    @probe.callback()
    def root(debug: bool = typer.Option(False, "--debug")) -> None:
        from ckaqad_cli.cli import common

        common.state.debug = debug

    result = runner.invoke(probe, ["boom"])
    assert result.exit_code == 1
    assert "ZeroDivisionError: division by zero" in result.stderr and "Traceback" not in result.stderr
    assert "--debug" in result.stderr
    result = runner.invoke(probe, ["--debug", "boom"])
    assert result.exit_code == 1 and "Traceback" in result.stderr
    from ckaqad_cli.cli import common

    common.state.debug = False


def test_locked_run_is_a_one_line_error(tmp_path):
    run = RunDir(tmp_path)
    with run.stage("pack", config={}):
        pass
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "now"}))

    @handle_errors
    def write(run_path: Path = typer.Option(..., "--run")) -> None:
        with RunDir(run_path).stage("diagnose", config={}):
            pass

    probe = typer.Typer()
    probe.command()(write)
    probe.command()(lambda: None)
    result = runner.invoke(probe, ["write", "--run", str(tmp_path)])
    assert result.exit_code == 1
    assert "locked by process 1 on elsewhere" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_ckaqad_error_message_is_printed_verbatim():
    @handle_errors
    def fail() -> None:
        raise CkaqadError("source directory /x has no *.safetensors files")

    probe = typer.Typer()
    probe.command()(fail)
    probe.command()(lambda: None)
    result = runner.invoke(probe, ["fail"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: source directory /x has no *.safetensors files"


# --- status --------------------------------------------------------------------------------------------------------
def _example_run(path: Path) -> RunDir:
    run = RunDir(path)
    with run.stage("distill", config={"steps": 5}) as rec:
        rec.outputs["student"] = "distill/student"
        rec.metrics["mean_cka"] = 0.99123
    with pytest.raises(RuntimeError), run.stage("pack", config={}):
        raise RuntimeError("disk full")
    return run


def test_status_table_shows_stages_states_metrics_and_errors(tmp_path):
    _example_run(tmp_path)
    result = runner.invoke(app, ["status", "--run", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.stderr
    assert "distill" in out and "done" in out and "mean_cka=0.9912" in out and "distill/student" in out
    assert "pack" in out and "failed" in out and "disk full" in out
    assert result.stdout == "", "tables go to stderr, stdout stays clean"


def test_status_in_a_log_fits_80_columns_with_every_value_in_full(tmp_path):
    """stderr redirected to a file, no COLUMNS: rich renders at 80 columns; no cell is cut, floats have 4 decimals."""

    run = _example_run(tmp_path / "run")
    layer_cka = [0.9928314685821533, 0.9780835509300232, 0.9673751592636108, 0.9294987916946411]
    with run.stage("distill-kl", config={}) as rec:
        rec.outputs.update(student="distill-kl/student", metrics="distill-kl/metrics.jsonl")
        rec.metrics.update(steps=300, mode="kl-only", cka_filters=["padding", "position 0 / BOS"], layer_cka=layer_cka,
                           train_seconds=1234.5678, ptq_mean_cka=0.968512345, eval_sequences=64)
    with run.stage("pipeline", config={}) as rec:
        rec.metrics.update({label: {"mean_cka": 0.96721234, "min_cka": 0.93312345, "kl": 0.55831234, "top1": 0.8516,
                                    "task_acc": 0.7} for label in ("bf16-teacher", "ptq-w4a4", "kl-only", "cka-qad")})
        rec.metrics["verify"] = {"path": "ckaqad unpacker", "transformers": {"max_abs_diff": 22.875}}
        rec.outputs["comparison_json"] = "pipeline/comparison.json"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    with open(tmp_path / "status.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "ckaqad_cli.app", "status", "--run", str(run.path)],
                              stdout=subprocess.PIPE, stderr=log, env=env, text=True, timeout=120)
    text = (tmp_path / "status.log").read_text()
    assert proc.returncode == 0 and proc.stdout == "", text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    words = {w.strip(",") for line in text.splitlines() for w in line.replace("│", " ").split()}
    for expected in ("distill-kl", "pipeline", "bf16-teacher:", "cka-qad:", "mean_cka=0.9672", "min_cka=0.9331",
                     "kl=0.5583", "task_acc=0.7000", "layer_cka=[0.9928", "0.9781", "0.9674", "0.9295]",
                     "train_seconds=1234.5678", "ptq_mean_cka=0.9685", "mean_cka=0.9912", "student=distill/student",
                     "student=distill-kl/student", "metrics=distill-kl/metrics.jsonl",
                     "transformers=(max_abs_diff=22.8750)",
                     "comparison_json=pipeline/comparison.json", "disk", "full", "failed", "done"):
        assert expected in words, (expected, text)
    assert "0.99283" not in text


def test_status_json_is_machine_clean(tmp_path):
    _example_run(tmp_path)
    result = runner.invoke(app, ["status", "--run", str(tmp_path), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["stages"]["distill"]["outputs"]["student"] == "distill/student"
    assert data["stages"]["pack"]["status"] == "failed"


def test_status_shows_a_killed_stage_as_interrupted(tmp_path):
    """A stage recorded 'running' is running while its process holds the run's lock; killed, it is interrupted."""
    import signal

    code = ("import sys, time; from ckaqad_cli.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).stage('distill', config={}):\n"
            "    print('started', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        shown = json.loads(runner.invoke(app, ["status", "--run", str(tmp_path), "--json"]).stdout)
        assert shown["stages"]["distill"]["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = runner.invoke(app, ["status", "--run", str(tmp_path)])
    assert "interrupted" in result.stderr and "the process running it is gone" in result.stderr
    shown = json.loads(runner.invoke(app, ["status", "--run", str(tmp_path), "--json"]).stdout)
    assert shown["stages"]["distill"]["status"] == "interrupted"
    assert RunDir(tmp_path).read()["stages"]["distill"]["status"] == "running", "status only reads run.json"


# --- fast help, one-line usage errors, help layout (issue 18) -----------------------------------------------------
def test_help_and_argument_errors_import_nothing_heavy():
    """--help of every command and a bad argument are answered before torch, transformers or a stage is imported
    (sys.modules, not timing: it is the imports that took 3-5 s)."""

    code = (
        "import json, sys\n"
        "from ckaqad_cli.app import app\n"
        f"commands = {list(COMMANDS)!r}\n"
        "calls = [['--help'], *[[c, '--help'] for c in commands], *[[c, '--no-such-option'] for c in commands],\n"
        "         ['distill', '--steps', 'many'], ['push'], ['pack', '--run-dir']]\n"
        "codes = []\n"
        "for args in calls:\n"
        "    try:\n"
        "        app(args, prog_name='ckaqad')\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "light = ('ckaqad_kernels', 'ckaqad_kernels.nvfp4_spec')  # the NVFP4 constants: the settings' choices\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'huggingface_hub',\n"
        "               'numpy', 'matplotlib', 'safetensors', 'triton', 'ckaqad_kernels')\n"
        "               and m not in light or m.startswith('ckaqad_cli.stages.'))\n"
        "print('RESULT', json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["heavy"] == [], result["heavy"]
    assert result["codes"] == [0] * (1 + len(COMMANDS)) + [1] * (len(COMMANDS) + 3)


@pytest.mark.parametrize(
    ("args", "where", "says"),
    [
        (["distill", "--no-such-option"], "ckaqad distill", "No such option: --no-such-option"),
        (["distill", "--steps", "many"], "ckaqad distill", "Invalid value for '--steps'"),
        (["push"], "ckaqad push", "Missing option '--repo-id'"),
        (["status", "--run"], "ckaqad status", "Option '--run' requires an argument"),
        (["no-such-command"], "ckaqad", "No such command 'no-such-command'"),
        (["--no-such-option"], "ckaqad", "No such option: --no-such-option"),
        (["pack", "--config", "/nonexistent/run.yaml"], "ckaqad pack", "cannot read config file"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, where, says):
    """Click's usage errors (unknown option, bad value, missing argument) look like every other error: one line on
    stderr, `error: ...` with a pointer to the command's --help, exit code 1; no box, nothing on stdout."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and says in line, line
    assert line.endswith(f"(see '{where} --help')"), line
    assert result.stdout == ""


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_each_default_once_and_no_placeholder_for_flags(command):
    """A literal default is shown once, by `[default: X]` (help texts say "Default: ..." only for computed ones); a
    flag shows no `<bool>` value placeholder, and one that is off by default no `[default: no-X]`."""
    from typer.main import get_command

    group = get_command(app)
    click_command = group if command is None else group.commands[command]
    result = runner.invoke(app, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout and "[default: no-" not in result.stdout and "[default: False]" not in (
        result.stdout
    )
    ctx = click_command.make_context(command or "ckaqad", [], resilient_parsing=True)
    for param in click_command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            assert len(re.findall(r"default:", record[1], re.IGNORECASE)) <= 1, (param.name, record[1])


def test_run_dir_is_the_run_option_under_another_name(tmp_path):
    _example_run(tmp_path)
    by_run = runner.invoke(app, ["status", "--run", str(tmp_path), "--json"])
    by_run_dir = runner.invoke(app, ["status", "--run-dir", str(tmp_path), "--json"])
    assert by_run.exit_code == by_run_dir.exit_code == 0
    assert json.loads(by_run_dir.stdout) == json.loads(by_run.stdout)


def test_a_log_gets_no_third_party_progress_bars(tmp_path):
    """With stderr in a file, transformers' "Loading weights" bar (one line per update) is off; ours print lines."""
    log = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    with open(log, "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "ckaqad_cli.app", "diagnose", "--run", str(tmp_path / "run"), "--ptq", "w4a16",
             "--max-tokens", "256", "--seq-len", "32", "--task-problems", "1", "--device", "cpu"],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "Loading weights" not in text, text
    assert "CKA" in text  # the report still reaches the log
