"""Errors a user can cause are one line naming the file, option or path, and come before any model loads or the
run directory is touched (issue 18 item 10): read-only places, bad --data, bad model paths, out-of-range options."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ckaqad_cli import models
from ckaqad_cli.app import app
from fixtures import save_tiny_model
from tests.test_safetensors_io import make_unwritable

runner = CliRunner()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load is a failure: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input checks")

    monkeypatch.setattr(models, "load_model", refuse)


def one_error(result, *expected: str) -> str:
    """The single `error:` line of a failed command, checked to hold every expected text."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize("stage", ["diagnose", "distill"])
def test_read_only_run_is_refused_before_any_model_loads(stage, tmp_path, monkeypatch, no_model_loads):
    ro = make_unwritable(tmp_path / "ro", monkeypatch)
    extra = ["--ptq", "w4a4"] if stage == "diagnose" else ["--steps", "2"]
    missing = runner.invoke(app, [stage, "--run", str(ro / "run"), *extra])
    one_error(missing, f"--run {ro / 'run'} cannot be created in {ro}", "choose a directory you can write to")
    existing = runner.invoke(app, [stage, "--run", str(ro), *extra])
    one_error(existing, f"--run {ro} is not writable")
    assert sorted(p.name for p in ro.iterdir()) == []


@pytest.mark.parametrize("stage", ["diagnose", "distill"])
def test_bad_data_is_refused_before_any_model_loads(stage, tmp_path, no_model_loads):
    extra = ["--ptq", "w4a4"] if stage == "diagnose" else []
    run = tmp_path / "run"
    missing = runner.invoke(app, [stage, "--run", str(run), "--data", str(tmp_path / "nope.jsonl"), *extra])
    one_error(missing, f"data source {tmp_path / 'nope.jsonl'} is not")
    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(b"\x8f\xff\x00\x01")
    bad = runner.invoke(app, [stage, "--run", str(run), "--data", str(binary), *extra])
    one_error(bad, f"cannot read {binary} as UTF-8 JSON lines")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"body": "x"}\n')
    wrong_field = runner.invoke(app, [stage, "--run", str(run), "--data", str(jsonl), *extra])
    one_error(wrong_field, f"{jsonl}:1 has no string field 'text'")
    assert not run.exists()


@pytest.mark.parametrize(
    "args, option",
    [(["diagnose", "--teacher", "/no/such/teacher", "--ptq", "w4a4"], "--teacher /no/such/teacher"),
     (["diagnose", "--student", "./no/such/student"], "--student ./no/such/student"),
     (["distill", "--teacher", "~/no/such/teacher"], "--teacher ~/no/such/teacher")],
)
def test_missing_model_path_creates_no_run_and_no_hub_id(args, option, tmp_path, no_model_loads):
    run = tmp_path / "run"
    result = runner.invoke(app, [args[0], "--run", str(run), *args[1:]])
    one_error(result, f"{option}: no such directory (and not a hub id")
    assert not run.exists()


@pytest.mark.parametrize(
    "args, message",
    [(["diagnose", "--ptq", "w4a4", "--task-problems", "-5"], "--task-problems must be at least 0"),
     (["diagnose", "--ptq", "w4a4", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
     (["diagnose", "--ptq", "w4a4", "--seq-len", "1"], "--seq-len must be at least 2, got 1"),
     (["diagnose", "--ptq", "w4a4", "--chunk-batches", "0"], "--chunk-batches must be at least 1, got 0"),
     (["distill", "--steps", "10", "--warmup", "500"], "--warmup 500 steps is longer than the run (--steps 10)"),
     (["distill", "--steps", "10", "--warmup", "2.5"], "--warmup 2.5: from 1 up it counts steps"),
     (["pack", "--max-shard-size", "0"], "--max-shard-size '0' must be at least 1 byte"),
     (["pack", "--max-shard-size", "-5"], "--max-shard-size '-5' is not a size"),
     (["pack", "--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size")],
)
def test_out_of_range_option_is_named(args, message, tmp_path, no_model_loads):
    run = tmp_path / "run"
    one_error(runner.invoke(app, [args[0], "--run", str(run), *args[1:]]), message)
    assert not run.exists()


def test_damaged_teacher_file_is_named(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher")
    (teacher / "model.safetensors").write_bytes(b"garbage")
    result = runner.invoke(app, ["diagnose", "--run", str(tmp_path / "run"), "--teacher", str(teacher),
                                 "--ptq", "w4a4", "--task-problems", "0"])
    one_error(result, f"{teacher / 'model.safetensors'} is not a readable safetensors file")


def test_pack_into_a_read_only_out_or_run_is_refused_before_packing(tmp_path, monkeypatch):
    import ckaqad_cli.stages.pack as pack

    def refuse(*args, **kwargs):
        raise AssertionError("pack started before the output checks")

    monkeypatch.setattr(pack, "pack_model", refuse)
    src = save_tiny_model(tmp_path / "src")
    ro = make_unwritable(tmp_path / "ro", monkeypatch)
    run = tmp_path / "run"
    out = runner.invoke(app, ["pack", "--run", str(run), "--model", str(src), "--out", str(ro / "model")])
    one_error(out, f"--out {ro / 'model'} cannot be created in {ro}")
    in_run = runner.invoke(app, ["pack", "--run", str(ro / "run"), "--model", str(src)])
    one_error(in_run, f"--run {ro / 'run'} cannot be created in {ro}")
    assert not run.exists() and list(ro.iterdir()) == []
