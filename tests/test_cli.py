"""The CLI shell: help texts, --version, config files, one-line errors, and `ckaqad status`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ckaqad_cli import __version__
from ckaqad_cli.app import app
from ckaqad_cli.cli.common import handle_errors
from ckaqad_cli.config import ConfigOption, effective_config
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
        seen.update(effective_config(ctx))

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
    import subprocess
    import sys

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
