"""The run directory: atomic manifest writes under a crash, the lock, stale locks, stage records."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckaqad_cli.atomic import OUTPUT_MARKER, atomic_directory, atomic_write_bytes
from ckaqad_cli.errors import RunLockedError, StageDoneError
from ckaqad_cli.rundir import RunDir, describe_input, scrub_secrets


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline()
    assert line.strip() == expected, f"child said {line!r}"


def test_stage_records_done_with_outputs_and_versions(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("pack", config={"format": "modelopt"}, inputs={"model": "x"}) as rec:
        rec.outputs["model"] = "pack/model"
        rec.metrics["ratio"] = 3.5
    entry = run.stage_entry("pack")
    assert entry["status"] == "done"
    assert entry["config"] == {"format": "modelopt"}
    assert entry["outputs"] == {"model": "pack/model"}
    assert entry["metrics"] == {"ratio": 3.5}
    assert entry["versions"]["torch"] is not None and entry["versions"]["ckaqad"]
    assert entry["started"] <= entry["ended"]
    assert not run.lock_path.exists(), "the lock is released when the stage ends"


def test_failed_stage_records_the_error_and_reraises(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError), run.stage("distill", config={}):
        raise ValueError("loss is NaN at step 7")
    entry = run.stage_entry("distill")
    assert entry["status"] == "failed"
    assert "loss is NaN at step 7" in entry["error"]


def test_rerunning_a_done_stage_needs_force(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("pack", config={}):
        pass
    with pytest.raises(StageDoneError, match="--force"), run.stage("pack", config={}):
        pass
    with run.stage("pack", config={"again": True}, force=True):
        pass
    assert run.stage_entry("pack")["config"] == {"again": True}


def test_stage_output_resolves_paths_inside_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("distill", config={}) as rec:
        (run.stage_dir("distill") / "student").mkdir()
        rec.outputs["student"] = "distill/student"
        rec.outputs["steps"] = 10
    assert run.stage_output("distill", "student") == run.path / "distill" / "student"
    assert run.stage_output("distill", "steps") == 10
    assert run.stage_output("pack", "model") is None


def test_progress_updates_survive_into_the_final_record(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("distill", config={}) as rec:
        run.record_progress("distill", outputs={"last_checkpoint": "distill/checkpoints/step-5"})
        assert run.stage_entry("distill")["outputs"]["last_checkpoint"].endswith("step-5")
        rec.outputs["student"] = "distill/student"
    assert run.stage_entry("distill")["outputs"] == {
        "last_checkpoint": "distill/checkpoints/step-5",
        "student": "distill/student",
    }


def test_manifest_never_holds_secrets(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("push", config={"repo_id": "o/n", "token": "hf_SECRET", "nested": {"api_key": "k"}}):
        pass
    text = run.manifest_path.read_text()
    assert "hf_SECRET" not in text and '"k"' not in text
    assert json.loads(text)["stages"]["push"]["config"] == {"repo_id": "o/n", "nested": {}}
    assert scrub_secrets({"HF_TOKEN": 1, "Authorization": 2, "access_token": 3, "push": {"token": 4}}) == {"push": {}}
    kept = {"tokens_seen": 1, "max_tokens": 2, "tokenizer.json": 3, "cka_tokens": 4}
    assert scrub_secrets(kept) == kept


def test_describe_input_hashes_local_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    d = describe_input(tmp_path / "m")
    assert d["files"] == {"config.json": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}
    assert describe_input("Qwen/Qwen3-4B") == {"hub_id": "Qwen/Qwen3-4B"}


def test_describe_input_records_safetensors_by_their_tensors_digest_and_takes_given_digests(tmp_path, monkeypatch):
    import hashlib

    import torch
    from safetensors.torch import save_file

    import ckaqad_cli.safetensors_io as sio

    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(model / "model.safetensors"))
    (model / "sub" / "broken.safetensors").write_bytes(b"not safetensors")
    (model / ".hidden").write_text("skipped")
    files = describe_input(model)["files"]
    assert files == {
        "model.safetensors": sio.tensors_sha256(model / "model.safetensors"),
        "sub/broken.safetensors": hashlib.sha256(b"not safetensors").hexdigest(),  # not one: its plain SHA-256
    }
    monkeypatch.setattr(sio, "tensors_sha256", lambda path: pytest.fail(f"{path} read again"))
    given = describe_input(model, digests={"model.safetensors": "tensors-sha256:given", "sub/broken.safetensors": "x"})
    assert given["files"] == {"model.safetensors": "tensors-sha256:given", "sub/broken.safetensors": "x"}


def test_inputs_described_while_the_stage_ran_are_recorded_with_the_given_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("pack", config={}, inputs={"model": {"path": "/m"}, "data": "d"}) as rec:
        assert run.stage_entry("pack")["inputs"] == {"model": {"path": "/m"}, "data": "d"}
        rec.inputs["model"] = described = {"path": "/m", "files": {"model.safetensors": "tensors-sha256:ab"}}
    assert run.stage_entry("pack")["inputs"] == {"model": described, "data": "d"}


def test_crash_mid_write_leaves_a_parseable_manifest_never_done(tmp_path):
    """SIGKILL a process that rewrites run.json in a tight loop: the manifest always parses, the stage is not done."""
    run_path = tmp_path / "run"
    proc = _spawn(
        f"""
        from ckaqad_cli.rundir import RunDir
        run = RunDir({str(run_path)!r})
        with run.stage("distill", config={{"x": 1}}):
            print("started", flush=True)
            i = 0
            while True:
                i += 1
                run.record_progress("distill", metrics={{"step": i, "blob": "x" * 200000}})
        """
    )
    _wait_for_line(proc, "started")
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = RunDir(run_path)
    data = json.loads(run.manifest_path.read_text())  # parses: never a half-written file
    assert data["stages"]["distill"]["status"] == "running"
    assert data["stages"]["distill"]["metrics"]["step"] >= 1
    messages = []
    run = RunDir(run_path, on_message=messages.append)
    with run.lock():
        pass
    entry = run.stage_entry("distill")
    assert entry["status"] == "failed" and "interrupted" in entry["error"]
    assert any("stale lock" in m for m in messages)


def test_lock_stops_a_second_writer(tmp_path):
    run_path = tmp_path / "run"
    proc = _spawn(
        f"""
        import time
        from ckaqad_cli.rundir import RunDir
        with RunDir({str(run_path)!r}).lock():
            print("locked", flush=True)
            time.sleep(30)
        """
    )
    try:
        _wait_for_line(proc, "locked")
        with pytest.raises(RunLockedError, match=f"locked by process {proc.pid}"):
            with RunDir(run_path).stage("pack", config={}):
                pass
        assert RunDir(run_path).stage_entry("pack") is None
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_dead_process_is_cleared(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_path = tmp_path / "run"
    run_path.mkdir()
    import socket

    (run_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    messages = []
    with RunDir(run_path, on_message=messages.append).stage("diagnose", config={}):
        pass
    assert messages and f"process {dead.pid}" in messages[0]


def test_lock_held_by_another_host_is_not_taken(tmp_path):
    run_path = tmp_path / "run"
    run_path.mkdir()
    (run_path / ".lock").write_text(json.dumps({"pid": 1, "host": "other-node", "since": "x"}))
    with pytest.raises(RunLockedError, match="other-node"):
        with RunDir(run_path).lock():
            pass


def test_atomic_write_keeps_old_content_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"], "the temporary file is cleaned up"


def test_atomic_directory_leaves_nothing_on_failure_and_renames_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done").write_text("1")
        assert not target.exists()
    assert (target / "done").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == sorted([OUTPUT_MARKER, "new"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_removes_what_a_killed_writer_left(tmp_path):
    """A pack killed with SIGKILL leaves its full-size temporary directory; the next write to the same target
    removes it when its process is gone, and leaves a live writer's alone."""
    code = ("import os, sys; from ckaqad_cli.atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n"
            "    (tmp / 'half.safetensors').write_bytes(b'x' * 1000); os.kill(os.getpid(), 9)\n")
    target = tmp_path / "model"
    subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.") and left[0].endswith(".partial")
    live = tmp_path / f".model.{socket.gethostname()}-{os.getpid()}.abcd1234.partial"  # a writer still running
    live.mkdir()
    with atomic_directory(target) as tmp:
        assert tmp.exists() and not (tmp_path / left[0]).exists()
        (tmp / "done").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_permissions_of_the_umask(tmp_path, umask):
    """Temporary names are created private; the final file and directory must be what open/mkdir would give, so
    that a packed model is readable by an inference server running as another user."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask


def test_manifest_of_another_schema_version_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.manifest_path.write_text(json.dumps({"schema_version": 99, "stages": {}}))
    from ckaqad_cli.errors import CkaqadError

    with pytest.raises(CkaqadError, match="schema_version 99"):
        run.read()
    for edited in ([], {"schema_version": 1}, {"schema_version": 1, "stages": []}):  # hand-edited into another shape
        run.manifest_path.write_text(json.dumps(edited))
        with pytest.raises(CkaqadError, match="is not a ckaqad run manifest"):
            run.read()


def test_interrupted_stage_is_marked_failed_only_by_the_next_lock_holder(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    with run.stage("pack", config={}):
        pass
    data = run.read()
    data["stages"]["pack"]["status"] = "running"
    run.manifest_path.write_text(json.dumps(data))
    assert run.stage_entry("pack")["status"] == "running"
    with run.lock():
        assert run.stage_entry("pack")["status"] == "failed"
