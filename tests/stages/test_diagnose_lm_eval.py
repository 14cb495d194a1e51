"""`ckaqad diagnose --lm-eval-tasks` offline: lm-evaluation-harness on the loaded built-in teacher and its PTQ student,
with a local task YAML and a local multiple-choice JSONL file written here (no Hub, no download)."""

from __future__ import annotations

import json
import math
import random

import lm_eval  # noqa: F401  (the test extra installs it: without the harness these tests fail)
import pytest
import torch
from typer.testing import CliRunner

from ckaqad_cli import models
from ckaqad_cli.app import app
from ckaqad_cli.builtin import tasks
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.lm_eval_tasks import harness_metrics
from ckaqad_cli.report import fmt
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.stages.diagnose import DiagnoseConfig, run_diagnose

runner = CliRunner()
ITEMS = 24


def _near_misses(answer: str, rng: random.Random) -> list[str]:
    """Three wrong answers one character away from the right one (hard enough that the models miss some)."""
    out: set[str] = set()
    while len(out) < 3:
        i = rng.randrange(len(answer))
        wrong = answer[:i] + rng.choice("0123456789" if answer[i].isdigit() else "abcdefgh") + answer[i + 1 :]
        if wrong != answer:
            out.add(wrong)
    return sorted(out)


@pytest.fixture
def task_files(tmp_path, monkeypatch):
    """(items, the JSONL file, a task YAML over the same file); the datasets cache inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    rng = random.Random(3)
    items = []
    for problem in tasks.generate("test", ITEMS, seed=3):
        choices = [problem.answer, *_near_misses(problem.answer, rng)]
        rng.shuffle(choices)
        items.append({"query": problem.prompt, "choices": choices, "gold": choices.index(problem.answer)})
    jsonl = tmp_path / "tasks" / "arith_mc.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in items))
    yaml_file = tmp_path / "tasks" / "arith.yaml"
    yaml_file.write_text(
        "task: arith_yaml\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {jsonl}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: query\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return items, jsonl, yaml_file


@torch.no_grad()
def _reference_accuracy(model, tokenizer, items) -> float:
    """Accuracy by summed log-likelihood of each choice after its query, computed here without the harness.

    One sequence per forward, as the harness runs them with batch size 1: the W4A4 student's dynamic per-tensor
    input scale is an amax over the whole batch, so its scores depend on which sequences share a batch.
    """
    scores = []
    for query, choice in [(item["query"], choice) for item in items for choice in item["choices"]]:
        ids = torch.tensor([tokenizer.encode(query + choice)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        context = len(tokenizer.encode(query))
        scores.append(float(logp[context - 1 :].gather(-1, ids[0, context:, None]).sum()))
    hits, start = 0, 0
    for item in items:
        mine = scores[start : start + len(item["choices"])]
        hits += max(range(len(mine)), key=mine.__getitem__) == item["gold"]
        start += len(mine)
    return hits / len(items)


def test_local_tasks_score_the_loaded_teacher_and_ptq_student(task_files, tmp_path):
    items, jsonl, yaml_file = task_files
    run = RunDir(tmp_path / "run")
    cfg = DiagnoseConfig(ptq=["w4a4"], seq_len=32, max_tokens=128, task_problems=0, dtype="float32", batch_size=1,
                         lm_eval_tasks=[str(yaml_file), str(jsonl)])
    report = run_diagnose(cfg, run)
    scores = report["lm_eval"]
    assert set(scores) == {"teacher", "ptq-w4a4"}

    teacher, tokenizer = models.load_model("builtin", dtype=torch.float32)
    references = {"teacher": teacher, "ptq-w4a4": models.ptq_student(teacher, "w4a4")[0]}
    for label, model in references.items():
        want = _reference_accuracy(model, tokenizer, items)
        acc = scores[label]["arith_mc"]["acc"]
        assert acc["value"] == pytest.approx(want, abs=1e-12)
        assert acc["stderr"] == pytest.approx(math.sqrt(want * (1 - want) / (ITEMS - 1)))  # the sample mean's
        assert 0.0 <= scores[label]["arith_mc"]["acc_norm"]["value"] <= 1.0
        assert scores[label]["arith_yaml"]["acc"] == acc  # the YAML task reads the same file the same way

    md = (run.path / "diagnose/report.md").read_text()
    t, s = scores["teacher"]["arith_mc"]["acc"], scores["ptq-w4a4"]["arith_mc"]["acc"]
    assert "| task | metric | teacher | ptq-w4a4 |" in md
    cells = [f"{fmt(m['value'])} ± {fmt(m['stderr'])}" for m in (t, s)]
    assert f"| arith_mc | acc | {cells[0]} | {cells[1]} |" in md
    entry = run.stage_entry("diagnose")
    assert entry["metrics"]["ptq-w4a4"]["arith_mc/acc"] == s["value"]
    assert entry["inputs"][f"lm_eval:{jsonl}"]["sha256"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"query": "1+1=", "choices": ["2", "3"], "gold": 2}\n', "line 1: each line must be"),
        ('{"query": "1+1=", "choices": ["2", "3"], "gold": 0}\nnot json\n', ":2 is not valid JSON"),
        ('{"query": "1+1=", "choices": [], "gold": 0}\n', "line 1: each line must be"),
        ("\n", "holds no items"),
        (None, "does not exist"),
    ],
)
def test_bad_task_file_is_one_error_and_nothing_done(tmp_path, content, message):
    task = tmp_path / "bad.jsonl"
    if content is not None:
        task.write_text(content)
    result = runner.invoke(app, ["diagnose", "--ptq", "w4a16", "--run", str(tmp_path / "run"), "--task-problems", "0",
                                 "--lm-eval-tasks", str(task)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert RunDir(tmp_path / "run").stage_entry("diagnose") is None


def test_yaml_without_a_task_name_and_other_files_are_errors(tmp_path):
    nameless = tmp_path / "t.yaml"
    nameless.write_text("dataset_path: json\nprocess_docs: !function utils.process\n")
    other = tmp_path / "t.txt"
    other.write_text("x")
    for spec, message in ((nameless, "has no `task:`"), (other, "takes task names, task .yaml files")):
        with pytest.raises(CkaqadError, match=message):
            run_diagnose(DiagnoseConfig(ptq=["w4a16"], lm_eval_tasks=[str(spec)]), RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "run.json").exists()


def test_harness_metrics_keep_filters_and_missing_stderr():
    values = {"alias": "gsm", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
              "bleu,none": 3.5, "bleu_stderr,none": "N/A"}
    assert harness_metrics(values) == {
        "exact_match (strict-match)": {"value": 0.25, "stderr": 0.05},
        "bleu": {"value": 3.5, "stderr": None},
    }
