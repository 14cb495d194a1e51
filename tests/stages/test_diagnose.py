"""The diagnose stage and CLI on tiny random models (a few hundred tokens)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ckaqad_cli import models
from ckaqad_cli.app import app
from ckaqad_cli.builtin.tokenizer import build_tokenizer
from ckaqad_cli.cka import linear_cka
from ckaqad_cli.settings.diagnose import parse_student
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.models import capture_residuals
from ckaqad_cli.stages.diagnose import DiagnoseConfig, run_diagnose
from fixtures import save_tiny_model

runner = CliRunner()
SMALL = {"seq_len": 16, "max_tokens": 256, "batch_size": 4, "task_problems": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {
        "teacher": save_tiny_model(root / "teacher", layers=3),
        "other": save_tiny_model(root / "other", layers=3, seed=1),
    }
    # a student close to the teacher: the teacher's weights with small noise
    m = AutoModelForCausalLM.from_pretrained(out["teacher"])
    torch.manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    m.save_pretrained(root / "noisy")
    build_tokenizer().save_pretrained(root / "noisy")
    out["noisy"] = root / "noisy"
    return out


def test_report_numbers_and_files(tiny, tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = DiagnoseConfig(
        teacher=str(tiny["teacher"]),
        students=[("same", str(tiny["teacher"])), ("noisy", str(tiny["noisy"])), ("other", str(tiny["other"]))],
        **SMALL,
    )
    report = run_diagnose(cfg, run)
    same, noisy, other = (report["students"][k] for k in ("same", "noisy", "other"))
    assert same["linear_cka"] == pytest.approx([1.0] * 4, abs=1e-6) and same["kl"] == pytest.approx(0, abs=1e-6)
    assert same["top1"] == 1.0 and same["perplexity"] == pytest.approx(report["teacher"]["perplexity"])
    assert 1.0 > noisy["mean_cka"] > other["mean_cka"]  # ordering by closeness to the teacher
    assert 0 < noisy["kl"] < other["kl"] and noisy["top1"] > other["top1"]
    assert report["tokens"] == 256 and report["cka_tokens"] == 256 - 256 // 16  # position 0 dropped per row

    # the streamed numbers equal CKA on all kept tokens at once, captured independently
    from ckaqad_cli.data import load_texts, pack_sequences
    from ckaqad_cli.models import load_model

    (t, tok), (s, _) = (load_model(p, dtype=torch.float32) for p in (tiny["teacher"], tiny["other"]))
    ids = pack_sequences(load_texts("builtin", split="test"), tok, 16, max_tokens=256)
    with capture_residuals(t) as ht, capture_residuals(s) as hs:
        t(ids), s(ids)
    layer = 2
    want = linear_cka(hs[layer][:, 1:].double(), ht[layer][:, 1:].double()).item()
    assert other["linear_cka"][layer] == pytest.approx(want, abs=1e-6)

    entry = run.stage_entry("diagnose")
    assert entry["status"] == "done"
    assert entry["outputs"] == {"report_json": "diagnose/report.json", "report_md": "diagnose/report.md",
                                "plot": "diagnose/cka.png"}
    assert entry["metrics"]["noisy"]["mean_cka"] == pytest.approx(noisy["mean_cka"])
    assert set(entry["metrics"]["other"]) == {"mean_cka", "min_cka", "kl", "top1"}
    assert json.loads((run.path / "diagnose/report.json").read_text())["students"]["other"]["kl"] == other["kl"]
    md = (run.path / "diagnose/report.md").read_text()
    assert "| layer 3 |" in md and "position 0 / BOS" in md and "▼" in md
    assert (run.path / "diagnose/cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_in_a_log_fit_80_columns_with_every_value_and_a_progress_line(tiny, tmp_path, monkeypatch):
    """stderr redirected to a log (not a terminal, 80 columns): no cell cut, every number printed in full, 4
    decimals; and plain-text progress lines instead of the bar."""
    import io

    from rich.console import Console

    from ckaqad_cli.report import fmt

    monkeypatch.setenv("CKAQAD_PROGRESS_INTERVAL", "0")
    students = [("same-weights", str(tiny["teacher"])), ("noisy-student", str(tiny["noisy"])),
                ("unrelated-model", str(tiny["other"]))]
    log = Console(file=io.StringIO(), width=80)
    report = run_diagnose(DiagnoseConfig(teacher=str(tiny["teacher"]), students=students, **SMALL), RunDir(tmp_path),
                          console=log)
    text = log.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    values = [fmt(report["teacher"]["perplexity"])]
    for label, s in report["students"].items():
        values += [label, *(f"{a:.4f} ({b:.4f})" for a, b in zip(s["linear_cka"], s["debiased_cka"]))]
        values += [fmt(s[k]) for k in ("mean_cka", "min_cka", "mean_debiased_cka", "kl", "top1", "perplexity")]
    assert [v for v in values if v not in text] == [], text
    assert "diagnose: 4/4 (100%)" in text  # the last progress line: 256 tokens in 16 sequences, 4 a batch


def test_sequential_matches_parallel(tiny, tmp_path):
    common = dict(teacher=str(tiny["teacher"]), students=[("noisy", str(tiny["noisy"]))], **SMALL)
    a = run_diagnose(DiagnoseConfig(**common), RunDir(tmp_path / "a"))
    b = run_diagnose(DiagnoseConfig(**common, sequential=True, chunk_batches=2), RunDir(tmp_path / "b"))
    for key in ("linear_cka", "debiased_cka"):
        assert b["students"]["noisy"][key] == pytest.approx(a["students"]["noisy"][key], abs=1e-9)
    assert b["students"]["noisy"]["kl"] == pytest.approx(a["students"]["noisy"]["kl"], rel=1e-6)


def test_filters_are_reported_and_change_the_tokens(tiny, tmp_path):
    cfg = DiagnoseConfig(teacher=str(tiny["teacher"]), students=[("o", str(tiny["other"]))], drop_first=False,
                         drop_massive=True, massive_ratio=4.0, standardize=True, **SMALL)
    report = run_diagnose(cfg, RunDir(tmp_path / "r"))
    assert "position 0 / BOS" not in report["filters"]
    assert any("massive" in f for f in report["filters"]) and any("standardized" in f for f in report["filters"])
    assert 0 < report["cka_tokens"] < report["tokens"]  # 4 x median flags some tokens of a random model


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: save_tiny_model(root / "s", layers=2), "2 layers of width 32"),
        (lambda root: save_tiny_model(root / "s", layers=3, hidden=64), "width 64"),
        (lambda root: save_tiny_model(root / "s", layers=3, vocab=128), "different vocabulary"),
    ],
)
def test_incompatible_student_is_one_error_and_nothing_done(tiny, tmp_path, make, message):
    result = runner.invoke(app, ["diagnose", "--teacher", str(tiny["teacher"]), "--student",
                                 str(make(tmp_path)), "--run", str(tmp_path / "run"), "--task-problems", "0"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len([ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 1
    assert RunDir(tmp_path / "run").stage_entry("diagnose") is None


def test_bad_data_and_seq_len_are_errors(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = dict(teacher=str(tiny["teacher"]), students=[("o", str(tiny["other"]))], task_problems=0, seq_len=16)
    with pytest.raises(CkaqadError, match="holds no text"):
        run_diagnose(DiagnoseConfig(**base, data=str(empty)), RunDir(tmp_path / "run"))
    with pytest.raises(CkaqadError, match="over the teacher's limit of 64"):
        run_diagnose(DiagnoseConfig(**{**base, "seq_len": 65}), RunDir(tmp_path / "run"))
    with pytest.raises(CkaqadError, match="no student"):
        run_diagnose(DiagnoseConfig(teacher=str(tiny["teacher"])), RunDir(tmp_path / "run"))
    with pytest.raises(CkaqadError, match="'teacher' names the teacher"):  # it would overwrite the teacher's row
        run_diagnose(DiagnoseConfig(**{**base, "students": [("teacher", str(tiny["other"]))]}), RunDir(tmp_path / "run"))
    with pytest.raises(CkaqadError, match="--massive-ratio must be > 1"):
        run_diagnose(DiagnoseConfig(**base, drop_massive=True, massive_ratio=-1.0), RunDir(tmp_path / "run"))
    with pytest.raises(CkaqadError, match="--device must be auto, cpu, cuda or cuda:N, not 'bogus'"):
        run_diagnose(DiagnoseConfig(**base, device="bogus"), RunDir(tmp_path / "run"))
    if not torch.cuda.is_available():
        with pytest.raises(CkaqadError, match="no CUDA GPU is visible"):
            run_diagnose(DiagnoseConfig(**base, device="cuda"), RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    "module, option",
    [("lm_eval", {"lm_eval_tasks": ["hellaswag"]}), ("accelerate", {"device_map": "auto"})],
)
def test_missing_optional_package_is_a_clear_error(tiny, tmp_path, monkeypatch, module, option):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package shows
    cfg = DiagnoseConfig(teacher=str(tiny["teacher"]), students=[("o", str(tiny["other"]))], **SMALL, **option)
    with pytest.raises(CkaqadError, match=rf"needs {module.replace('_', '-')}: pip install {module.replace('_', '-')}"):
        run_diagnose(cfg, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "run.json").exists()


def test_device_map_auto_gives_the_same_numbers(tiny, tmp_path, monkeypatch):
    """On a machine without GPUs "auto" places everything on the CPU: the same numbers through the device-map
    loading paths (from_pretrained, a distilled student's recipe, a packed student dispatched after decoding, PTQ)."""
    from ckaqad_cli.quant import apply_fake_quant
    from ckaqad_cli.stages.pack import PackConfig, pack_model

    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    apply_fake_quant(model, "w4a16").save(tmp_path / "distilled")
    model.save_pretrained(tmp_path / "distilled")
    build_tokenizer().save_pretrained(tmp_path / "distilled")
    pack_model(PackConfig(model=str(tmp_path / "distilled"), out=str(tmp_path / "packed"), verify=False))
    common = dict(teacher=str(tiny["teacher"]), ptq=["w4a4"], **SMALL,
                  students=[("noisy", str(tiny["noisy"])), ("distilled", str(tmp_path / "distilled")),
                            ("packed", str(tmp_path / "packed"))])
    plain = run_diagnose(DiagnoseConfig(**common), RunDir(tmp_path / "a"))
    dispatched = []
    monkeypatch.setattr(models, "dispatch", lambda m, real=models.dispatch: dispatched.append(m) or real(m))
    mapped = run_diagnose(DiagnoseConfig(**common, device_map="auto"), RunDir(tmp_path / "b"))
    assert len({id(m) for m in dispatched}) == len(dispatched) == 5  # the teacher and each student, once
    assert all(m.hf_device_map == {"": "cpu"} for m in dispatched)  # no GPU here: all of each model on the CPU
    assert set(mapped["students"]) == {"noisy", "distilled", "packed", "ptq-w4a4"}
    for label, want in plain["students"].items():
        for key in ("linear_cka", "debiased_cka", "kl", "top1", "perplexity"):
            assert mapped["students"][label][key] == pytest.approx(want[key], abs=1e-9), (label, key)
    assert plain["students"]["distilled"]["kl"] > 0  # the recipe was applied: the student is not the teacher
    assert RunDir(tmp_path / "b").stage_entry("diagnose")["config"]["device_map"] == "auto"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sequential"], "--device-map and --sequential exclude each other"),
        (["--device", "cpu"], "leave --device at auto"),
        ([], "--device-map must be auto"),
    ],
)
def test_device_map_usage_errors(tiny, tmp_path, extra, message):
    value = "balanced" if not extra else "auto"
    result = runner.invoke(app, ["diagnose", "--teacher", str(tiny["teacher"]), "--ptq", "w4a16", "--run",
                                 str(tmp_path / "run"), "--device-map", value, *extra])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert RunDir(tmp_path / "run").stage_entry("diagnose") is None


def test_cli_picks_up_the_runs_distilled_student(tiny, tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage("distill", config={}) as rec:
        student = run.stage_dir("distill") / "student"
        student.mkdir()
        for f in tiny["noisy"].iterdir():
            (student / f.name).write_bytes(f.read_bytes())
        rec.outputs["student"] = "distill/student"
    result = runner.invoke(app, ["diagnose", "--teacher", str(tiny["teacher"]), "--run", str(run.path),
                                 "--seq-len", "16", "--max-tokens", "128", "--task-problems", "0"])
    assert result.exit_code == 0, result.output
    assert "distilled" in run.stage_entry("diagnose")["metrics"]
    assert "layer 3" in result.output  # the table went to the terminal
    again = runner.invoke(app, ["diagnose", "--teacher", str(tiny["teacher"]), "--run", str(run.path)])
    assert again.exit_code == 1 and "--force" in again.output


def test_ptq_student(tiny, tmp_path):
    cfg = DiagnoseConfig(teacher=str(tiny["teacher"]), ptq=["w4a16", "w4a4"], **SMALL)
    report = run_diagnose(cfg, RunDir(tmp_path / "run"))
    w16, w4 = report["students"]["ptq-w4a16"], report["students"]["ptq-w4a4"]
    assert w16["linear_cka"][0] == pytest.approx(1.0)  # embeddings are not quantized
    assert 0 < w16["kl"] < w4["kl"] and w4["mean_cka"] < w16["mean_cka"] < 1.0


def test_builtin_teacher_reports_task_accuracy(tmp_path):
    from ckaqad_cli.builtin import TEACHER_DIR

    cfg = DiagnoseConfig(students=[("self", str(TEACHER_DIR))], seq_len=32, max_tokens=128, task_problems=8)
    report = run_diagnose(cfg, RunDir(tmp_path / "run"))
    acc = report["task_accuracy"]
    assert acc["self"]["overall"] == acc["teacher"]["overall"]
    assert RunDir(tmp_path / "run").stage_entry("diagnose")["metrics"]["self"]["task_acc"] == acc["self"]["overall"]


def test_task_memo_decodes_the_teacher_and_ptq_student_once_for_both_diagnoses(tmp_path, monkeypatch):
    """The pipeline's two diagnose stages share a memo: the second decodes only its distilled student and reports the
    first one's teacher and PTQ numbers; other settings (another seed) miss it."""
    from ckaqad_cli.builtin import TEACHER_DIR
    from ckaqad_cli.builtin import tasks as builtin_tasks

    decoded = []
    real = builtin_tasks.evaluate
    monkeypatch.setattr(builtin_tasks, "evaluate", lambda model, *a, **k: decoded.append(model) or real(model, *a, **k))
    memo: dict = {}
    common = dict(ptq=["w4a4"], use_run_student=False, seq_len=32, max_tokens=128, task_problems=8)
    run = RunDir(tmp_path / "run")
    first = run_diagnose(DiagnoseConfig(stage="diagnose-ptq", **common), run, task_memo=memo)
    assert len(decoded) == 2 and len(memo) == 2  # the teacher, the PTQ student
    second = run_diagnose(DiagnoseConfig(students=[("self", str(TEACHER_DIR))], **common), run, task_memo=memo)
    assert len(decoded) == 3  # the student only
    for label in ("teacher", "ptq-w4a4"):
        assert second["task_accuracy"][label] == first["task_accuracy"][label]
    assert second["task_accuracy"]["self"] == first["task_accuracy"]["teacher"]  # the same model, decoded afresh
    run_diagnose(DiagnoseConfig(stage="other", seed=1, **common), run, task_memo=memo)
    assert len(decoded) == 5 and len(memo) == 4


def test_builtin_reasoner_scores_its_own_suite_by_decoding_whole_traces(tmp_path):
    """--teacher builtin-reasoner: --data builtin means the reasoner's traces, and task accuracy is the reasoner
    suite's (its families, its scorer on whole decoded traces), the same numbers as the suite's own evaluate."""
    from ckaqad_cli.builtin import reasoner_tasks
    from ckaqad_cli.models import load_model

    cfg = DiagnoseConfig(teacher="builtin-reasoner", ptq=["w4a16"], use_run_student=False, seq_len=64, max_tokens=256,
                         task_problems=4)
    report = run_diagnose(cfg, RunDir(tmp_path / "run"))
    assert RunDir(tmp_path / "run").stage_entry("diagnose")["config"]["data"] == "builtin-reasoner"
    model, tokenizer = load_model("builtin-reasoner", dtype=torch.float32)
    expected = reasoner_tasks.evaluate(model, tokenizer, reasoner_tasks.generate("test", 4, 0))
    assert report["task_accuracy"]["teacher"] == expected
    assert set(expected["per_family"]) == set(reasoner_tasks.FAMILIES)


def test_parse_student():
    assert parse_student("kl=runs/a/distill/student") == ("kl", "runs/a/distill/student")
    assert parse_student("out/qwen3-nvfp4") == ("qwen3-nvfp4", "out/qwen3-nvfp4")


def test_cka_precision_bf16_agrees_with_float32_and_is_recorded(tiny, tmp_path):
    """--cka-precision bf16 (emulated on the CPU) gives the float32 numbers to well within the report's 4 decimals;
    auto resolves to float32 for a float32 model; the report says which ran."""
    common = dict(teacher=str(tiny["teacher"]), students=[("noisy", str(tiny["noisy"]))], **SMALL)
    f32 = run_diagnose(DiagnoseConfig(**common), RunDir(tmp_path / "a"))
    bf16 = run_diagnose(DiagnoseConfig(**common, cka_precision="bf16"), RunDir(tmp_path / "b"))
    assert f32["cka_precision"] == "float32" and bf16["cka_precision"] == "bf16"
    assert bf16["students"]["noisy"]["linear_cka"] == pytest.approx(f32["students"]["noisy"]["linear_cka"], abs=1e-5)
    assert bf16["students"]["noisy"]["linear_cka"] != f32["students"]["noisy"]["linear_cka"]  # another arithmetic
    with pytest.raises(CkaqadError, match="--cka-precision must be one of auto, float32, bf16"):
        DiagnoseConfig(**common, cka_precision="fp8").check()


def test_ptq_scale_rule_reaches_the_ptq_student(tiny, tmp_path):
    """--scale-rule changes the PTQ student's weights (and so its drift); an unknown rule is one line."""
    common = dict(teacher=str(tiny["teacher"]), ptq=["w4a16"], use_run_student=False, **SMALL)
    amax = run_diagnose(DiagnoseConfig(**common), RunDir(tmp_path / "a"))["students"]["ptq-w4a16"]
    mse = run_diagnose(DiagnoseConfig(**common, scale_rule="mse"), RunDir(tmp_path / "b"))["students"]["ptq-w4a16"]
    assert mse["linear_cka"] != amax["linear_cka"]
    with pytest.raises(CkaqadError, match="--scale-rule must be one of amax, four-over-six, mse, mse-act"):
        DiagnoseConfig(**common, scale_rule="best").check()
