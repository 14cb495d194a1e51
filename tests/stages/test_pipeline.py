"""`ckaqad pipeline` end to end on the built-in teacher, on a reduced budget."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ckaqad_cli.app import app
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.pipeline import PipelineConfig
from ckaqad_cli.stages.pipeline import COLUMNS, _plan_config, comparison_rows

runner = CliRunner()
STAGES = ("diagnose-ptq", "distill", "distill-kl", "diagnose", "pack", "push-dry-run", "pipeline")


def test_pipeline_runs_every_stage_and_writes_the_comparison(tmp_path):
    run_path = tmp_path / "run"
    args = [
        "pipeline", "--run", str(run_path), "--baseline", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
        "--diagnose-tokens", "512", "--diagnose-seq-len", "32", "--task-problems", "10", "--device", "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = RunDir(run_path)
    manifest = run.read()
    assert [s for s in STAGES if manifest["stages"].get(s, {}).get("status") == "done"] == list(STAGES)

    # every stage's outputs are where its record says
    assert (run.stage_output("distill", "student") / "quant_recipe.json").is_file()
    assert (run.stage_output("distill-kl", "student") / "quant_recipe.json").is_file()
    assert run.stage_entry("distill-kl")["config"]["lambda_cka"] == 0.0
    packed = run.stage_output("pack", "model")
    assert json.loads((packed / "config.json").read_text())["quantization_config"]["format"] == "nvfp4-pack-quantized"
    verify = manifest["stages"]["pack"]["metrics"]["verify"]
    if verify["weights_reciprocal_inexact"] == 0:  # every global scale stored exactly: the student's logits exactly
        assert verify["max_abs_diff"] == 0.0 and verify["top1_agreement"] == 1.0
    assert verify["top1_agreement"] >= 0.8
    card = (run_path / "push-dry-run" / "README.md").read_text()
    assert card.startswith("---")
    mean_lambda = manifest["stages"]["distill"]["metrics"]["mean_lambda_cka"]  # the card reads what distill writes
    assert mean_lambda > 0 and f"balanced each step to 0.5 x KL / CKA term, mean {mean_lambda:.4g}" in card
    for stage in ("diagnose-ptq", "diagnose"):
        for key in ("report_json", "report_md", "plot"):
            assert run.stage_output(stage, key).is_file(), (stage, key)

    # the comparison table: teacher, PTQ, KL-only, CKA-QAD, with every column
    comparison = json.loads((run_path / "pipeline" / "comparison.json").read_text())
    rows = comparison["rows"]
    assert list(rows) == ["bf16-teacher", "ptq-w4a4", "kl-only", "cka-qad"]
    families = {"arithmetic", "program_trace", "list_ops", "string_ops", "brackets"}
    for label, row in rows.items():
        for column in COLUMNS:
            assert isinstance(row[column], float), (label, column)
        assert {k.removeprefix("acc:") for k in row if k.startswith("acc:")} == families
        assert 0.0 <= row["task_acc"] <= 1.0
    for label in ("ptq-w4a4", "kl-only", "cka-qad"):
        assert 0.0 < rows[label]["mean_cka"] <= 1.0 and rows[label]["min_cka"] <= rows[label]["mean_cka"]
        assert rows[label]["kl"] > 0.0
    assert (run_path / "pipeline" / "comparison.md").read_text().count("\n|") == 6  # header, rule, 4 rows
    assert (run_path / "pipeline" / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run skips every stage already done
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("done already, skipped") == len(STAGES) - 1
    assert RunDir(run_path).stage_entry("distill")["ended"] == manifest["stages"]["distill"]["ended"]

    # other settings on a finished run: refused, naming them, and run.json still describes what is on disk
    before = (run_path / "run.json").read_text()
    other = runner.invoke(app, [*args, "--format", "modelopt", "--scheme", "w4a16", "--steps", "5", "--seed", "7"])
    assert other.exit_code == 1
    line = other.output.strip()
    assert line.startswith("error: stage diagnose-ptq") and "seed 0 -> 7" in line and "--force" in line, line
    assert (run_path / "run.json").read_text() == before

    # --force redoes every stage with the new settings
    forced = runner.invoke(app, [*args, "--steps", "3", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "skipped" not in forced.output
    redone = RunDir(run_path).read()["stages"]
    assert redone["distill"]["config"]["steps"] == 3 and redone["distill-kl"]["config"]["steps"] == 3
    assert all(redone[s]["started"] >= manifest["stages"]["pipeline"]["ended"] for s in STAGES)


def test_pipeline_checks_every_option_before_the_first_stage(tmp_path):
    for bad, words in ((["--format", "gguf"], "--format"), (["--repo-id", "no slash"], "repo"),
                       (["--lr", "-1"], "--lr"), (["--task-problems", "-5"], "--task-problems"),
                       (["--budget-bits", "3"], "--budget-bits"), (["--budget-bits", "nan"], "--budget-bits"),
                       (["--budget-bits", "6", "--plan-score", "hessian"], "--plan-score"),
                       (["--budget-bits", "6", "--plan-upgrade", "int8"], "--plan-upgrade"),
                       (["--budget-bits", "6", "--plan-budget-over", "model"], "--plan-budget-over"),
                       (["--budget-bits", "6", "--plan-upgrade", "fp8", "--format", "modelopt"], "--plan-upgrade")):
        result = runner.invoke(app, ["pipeline", "--run", str(tmp_path / "run"), "--device", "cpu", *bad])
        assert result.exit_code == 1, (bad, result.output)
        assert result.output.startswith("error:") and words in result.output, (bad, result.output)
        assert not (tmp_path / "run" / "run.json").exists(), bad


def test_the_pipelines_plan_takes_its_plan_options():
    cfg = PipelineConfig(budget_bits=5.0, plan_budget_over="units", plan_upgrade="fp8", plan_score="kl")
    plan = _plan_config(cfg)
    assert (plan.budget_bits, plan.budget_over, plan.upgrade, plan.score) == (5.0, "units", "fp8", "kl")
    assert _plan_config(PipelineConfig(budget_bits=6.0)).budget_over == "linear"


def test_pipeline_with_a_budget_plans_first_and_every_stage_follows_the_plan(tmp_path):
    run_path = tmp_path / "run"
    args = [
        "pipeline", "--run", str(run_path), "--budget-bits", "5.5", "--steps", "2", "--batch-size", "4",
        "--seq-len", "32", "--diagnose-tokens", "256", "--diagnose-seq-len", "32", "--task-problems", "5",
        "--device", "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = RunDir(run_path)
    stages = run.read()["stages"]
    assert [s for s in stages if s != "pipeline"] == ["plan", "diagnose-ptq", "distill", "diagnose", "pack",
                                                       "push-dry-run"]
    assert stages["plan"]["config"]["budget_bits"] == 5.5 and stages["plan"]["config"]["max_tokens"] == 256
    plan = json.loads(run.stage_output("plan", "report_json").read_text())
    assert plan["kept"] and plan["effective_bits"] <= 5.5
    kept = {m for unit in plan["units"] if unit["kept"] for m in unit["members"]}
    trained = json.loads((run.stage_output("distill", "student") / "quant_recipe.json").read_text())
    assert kept and not kept & set(trained["quantized"]) and trained["exclude"][-len(plan["exclude"]):] == plan["exclude"]
    assert stages["diagnose-ptq"]["config"]["ptq_exclude"] == plan["exclude"]
    ignored = json.loads((run.stage_output("pack", "model") / "config.json").read_text())["quantization_config"]
    assert kept <= set(ignored["ignore"])


def test_comparison_rows_order_and_teacher_row():
    report = {
        "students": {
            name: {"mean_cka": m, "min_cka": m - 0.01, "kl": 0.1, "top1": 0.9}
            for name, m in (("cka-qad", 0.99), ("ptq-w4a4", 0.97), ("kl-only", 0.98))
        },
        "task_accuracy": {
            "teacher": {"overall": 0.8, "per_family": {"a": 0.8}},
            "cka-qad": {"overall": 0.7, "per_family": {"a": 0.7}},
        },
    }
    rows = comparison_rows(report)
    assert list(rows) == ["bf16-teacher", "ptq-w4a4", "kl-only", "cka-qad"]
    assert rows["bf16-teacher"] == {"mean_cka": 1.0, "min_cka": 1.0, "kl": 0.0, "top1": 1.0, "task_acc": 0.8,
                                    "acc:a": 0.8}
    assert rows["cka-qad"]["acc:a"] == 0.7 and "task_acc" not in rows["kl-only"]
