"""benchmarks/gpu_check.py in its CPU mode: tiny shapes through the code paths the GPU run takes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


def test_cpu_mode_runs_every_part(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert (tmp_path / "gpu_check.json").is_file(), proc.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["kernels", "pack", "cka", "distill"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p.get("traceback") for n, p in parts.items()}
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parts["kernels"]["all_bit_exact"] and len(parts["kernels"]["rows"]) == 4
    assert parts["cka"]["bf16_max_error_vs_float64"] < 1e-4
    assert set(parts["cka"]) >= {"bf16", "float32", "forwards_s"}
    distill = parts["distill"]
    assert distill["cka"]["cka_layers"] and not distill["kl_only"]["cka_layers"]
    assert distill["estimate_bytes"]["cka"] > distill["estimate_bytes"]["kl_only"] > 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## kernels: ok" in markdown and "## distill: ok" in markdown


def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    gpu_check = importlib.import_module("gpu_check")

    def broken(plan, device):
        raise RuntimeError("no kernel today\nsecond line")

    monkeypatch.setattr(gpu_check, "check_kernels", broken)
    monkeypatch.setattr(gpu_check, "check_pack", lambda plan, device, work: {
        "checkpoint_bytes": 10, "copy_s": 1.0, "pack_s": 2.0, "pack_of_copy": 2.0, "kernel": "C", "bytes_after": 5})
    results = gpu_check.run("cpu", tmp_path, ["kernels", "pack"])
    kernels, pack = results["parts"]["kernels"], results["parts"]["pack"]
    assert kernels["status"] == "failed" and kernels["error"] == "RuntimeError: no kernel today"
    assert "Traceback" in kernels["traceback"] and pack["status"] == "ok"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["kernels"]["status"] == "failed"
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## kernels: failed" in markdown and "RuntimeError: no kernel today" in markdown
