"""The plan stage and CLI on a tiny model, and the plan's recipe carried into distill and into pack (both formats)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ckaqad_cli.app import app
from ckaqad_cli.errors import StageDoneError
from ckaqad_cli.planning.recipe import plan_exclude, recorded_plan
from ckaqad_cli.quant import QuantRecipe
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.distill import DistillConfig
from ckaqad_cli.settings.pack import PackConfig
from ckaqad_cli.settings.plan import PlanConfig
from ckaqad_cli.stages.distill import run_distill
from ckaqad_cli.stages.pack import pack_model
from ckaqad_cli.stages.plan import run_plan
from fixtures import save_tiny_model

runner = CliRunner()
BUDGET = 8.0
"""Bits per weight for the tiny model below: uniform NVFP4 is about 6.4 (its BF16 head is a sixth of the Linear
weights), so the plan can keep a few units."""
SMALL = dict(seq_len=16, max_tokens=256, batch_size=4, task_problems=0, device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    data = root / "calib.txt"
    data.write_text("\n\n".join(f"what is {i} plus {3 * i}? the answer is {4 * i}." for i in range(200)))
    return save_tiny_model(root / "teacher", layers=2), str(data)


@pytest.fixture(scope="module")
def planned(inputs, tmp_path_factory):
    teacher, data = inputs
    run = RunDir(tmp_path_factory.mktemp("run") / "run")
    report = run_plan(PlanConfig(budget_bits=BUDGET, teacher=str(teacher), data=data, **SMALL), run)
    return run, report


def test_plan_writes_its_recipe_report_and_plot_and_records_the_stage(planned):
    run, report = planned
    folder = run.stage_dir("plan")
    for name in ("quant_recipe.json", "report.json", "report.md", "plan.png"):
        assert (folder / name).is_file(), name
    entry = run.stage_entry("plan")
    assert entry["status"] == "done" and entry["outputs"]["recipe"] == "plan/quant_recipe.json"
    assert entry["metrics"]["effective_bits"] == report["effective_bits"] <= BUDGET
    assert report["kept"] and len(report["kept"]) < len(report["units"])
    assert report["weight_bytes"] <= report["budget_bytes"]
    recipe = recorded_plan(run)
    kept_members = {m for u in report["units"] if u["kept"] for m in u["members"]}
    assert kept_members and not kept_members & set(recipe.quantized)
    assert all(name in recipe.skipped for name in kept_members)
    assert plan_exclude(recipe) == report["exclude"]
    assert json.loads((folder / "report.json").read_text())["kept"] == report["kept"]
    text = (folder / "report.md").read_text()
    assert "## Units" in text and report["kept"][0] in text
    assert set(report["comparison"]) == {"uniform", "plan"}


@pytest.mark.parametrize("rule", ["four-over-six", "mse-act"])
def test_the_plan_measures_with_its_scale_rule_and_records_it(planned, inputs, tmp_path, rule):
    teacher, data = inputs
    run = RunDir(tmp_path / "run")
    report = run_plan(PlanConfig(budget_bits=BUDGET, teacher=str(teacher), data=data, scale_rule=rule, **SMALL), run)
    assert report["scale_rule"] == rule and recorded_plan(run).scale_rule == rule
    assert run.stage_entry("plan")["config"]["scale_rule"] == rule
    amax = planned[1]  # the same units, data and budget with amax scales: other scales, another uniform KL
    assert [u["name"] for u in report["units"]] == [u["name"] for u in amax["units"]]
    assert report["comparison"]["uniform"]["kl"] != amax["comparison"]["uniform"]["kl"]
    assert f"scale rule {rule}" in (run.stage_dir("plan") / "report.md").read_text()


def test_a_finished_plan_runs_again_only_with_force(planned, inputs):
    run, _ = planned
    teacher, data = inputs
    with pytest.raises(StageDoneError):
        run_plan(PlanConfig(budget_bits=BUDGET, teacher=str(teacher), data=data, **SMALL), run)


def test_cli_bad_budgets_are_one_line_before_any_measurement(tmp_path, inputs):
    teacher, data = inputs
    for bits, message in (("nan", "--budget-bits must be a number from 4.5"),
                          ("17", "--budget-bits must be a number from 4.5"),
                          ("5", "--budget-bits 5 is below 6.")):
        result = runner.invoke(app, ["plan", "--run", str(tmp_path / bits), "--budget-bits", bits, "--teacher",
                                     str(teacher), "--data", data, "--device", "cpu"])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if "error" in line]  # transformers' loading bar aside
        assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), result.output
        assert "plan" not in (RunDir(tmp_path / bits).read()["stages"])


def test_a_budget_over_the_units_leaves_the_head_out_of_the_average(planned, inputs, tmp_path):
    """`--budget-over units --budget-bits 6`: the tiny model's large BF16 head (6 bits over every weight is below
    uniform NVFP4's 6.37) is counted on top, so the budget is met and the plan keeps units; the report says so."""
    _, linear = planned
    teacher, data = inputs
    run = RunDir(tmp_path / "units")
    result = runner.invoke(app, ["plan", "--run", str(run.path), "--budget-bits", "6", "--budget-over", "units",
                                 "--teacher", str(teacher), "--data", data, "--seq-len", "16", "--max-tokens", "256",
                                 "--task-problems", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((run.stage_dir("plan") / "report.json").read_text())
    head, units = sum(report["fixed"].values()), report["total_weights"] - sum(report["fixed"].values())
    assert report["budget_over"] == "units" and run.stage_entry("plan")["config"]["budget_over"] == "units"
    uniform = 2 * head + units * 9 // 16
    assert report["budget_bytes"] == int(6 * units / 8) + 2 * head >= report["weight_bytes"] > uniform
    assert report["kept"] and report["effective_bits"] == 8 * report["weight_bytes"] / report["total_weights"]
    assert f"bits per unit weight, with the {head:,} weights that stay BF16 whatever the plan on top (" in (run.stage_dir("plan") / "report.md").read_text()
    assert linear["budget_over"] == "linear"


def test_the_plan_round_trips_into_distill_and_pack_in_both_formats(planned, inputs, tmp_path):
    run, report = planned
    teacher, data = inputs
    recipe = recorded_plan(run)
    distilled = RunDir(tmp_path / "distill")
    run_distill(DistillConfig(teacher=str(teacher), data=data, exclude=tuple(plan_exclude(recipe)), steps=2,
                              batch_size=4, seq_len=16, lr=1e-3, eval_every=100, save_every=100, eval_sequences=8,
                              eval_tokens=32, cka_layers="all", cka_tokens=16, device="cpu"), distilled,
                show_progress=False)
    student = distilled.stage_dir("distill") / "student"
    assert QuantRecipe.load(student) == recipe
    kept_members = {m for u in report["units"] if u["kept"] for m in u["members"]}
    for fmt, listed in (("compressed-tensors", "ignore"), ("modelopt", "exclude_modules")):
        out = tmp_path / fmt
        result = pack_model(PackConfig(model=str(student), out=str(out), format=fmt, calib_data=data,
                                       calib_tokens=256, verify=True))
        assert result.summary["verify"]["logits"]["passed"]
        assert result.summary["linear_weight_bits"] == pytest.approx(report["effective_bits"], rel=1e-12)
        assert kept_members <= set(result.summary["kept"])
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        written = config.get(listed) or json.loads((out / "hf_quant_config.json").read_text())["quantization"][listed]
        assert kept_members <= set(written)
        plain = pack_model(PackConfig(model=str(teacher), out=str(tmp_path / f"ptq-{fmt}"), format=fmt,
                                      exclude=plan_exclude(recipe), calib_data=data, calib_tokens=256, verify=True))
        assert set(plain.summary["kept"]) == set(result.summary["kept"])


def test_distill_and_a_model_pack_take_the_runs_plan_by_default(planned, inputs, tmp_path):
    """In a run with a finished plan, distill and `pack --model` quantize with the plan's exclusions unless
    --exclude is given; a pack of a run without a plan keeps nothing the plan kept."""
    import shutil

    run, report = planned
    teacher, data = inputs
    recipe = recorded_plan(run)
    kept_members = {m for u in report["units"] if u["kept"] for m in u["members"]}
    assert kept_members
    mine = RunDir(tmp_path / "run")
    shutil.copytree(run.path, mine.path)
    run_distill(DistillConfig(teacher=str(teacher), data=data, steps=1, batch_size=4, seq_len=16, lr=1e-3,
                              eval_every=100, save_every=100, eval_sequences=8, eval_tokens=32, cka_layers="all",
                              cka_tokens=16, device="cpu"), mine, show_progress=False)
    assert QuantRecipe.load(mine.stage_dir("distill") / "student") == recipe
    assert mine.stage_entry("distill")["config"]["exclude"] == plan_exclude(recipe)
    packed = pack_model(PackConfig(model=str(teacher), out=str(tmp_path / "ptq"), scheme="w4a16", verify=False),
                        run=mine)
    assert kept_members <= set(packed.summary["kept"])
    plain = pack_model(PackConfig(model=str(teacher), out=str(tmp_path / "plain"), scheme="w4a16", verify=False))
    assert not kept_members & set(plain.summary["kept"])


def test_an_fp8_plan_puts_its_units_in_fp8_for_the_comparison_and_distill_and_packs_in_compressed_tensors(
        inputs, tmp_path):
    from ckaqad_cli.errors import CkaqadError
    from ckaqad_cli.planning.recipe import plan_fp8
    from ckaqad_cli.quant_fp8 import FP8Linear

    teacher, data = inputs
    run = RunDir(tmp_path / "run")
    report = run_plan(PlanConfig(budget_bits=6.8, upgrade="fp8", teacher=str(teacher), data=data, **SMALL), run)
    assert report["upgrade"] == "fp8" and 0 < len(report["kept"]) < len(report["units"])
    chosen = [u for u in report["units"] if u["kept"]]
    assert report["weight_bytes"] == sum(u["fp8_bytes"] if u["kept"] else u["nvfp4_bytes"] for u in report["units"]) \
        + 2 * sum(report["fixed"].values()) <= report["budget_bytes"]
    recipe = recorded_plan(run)
    assert recipe.fp8 == [m for u in chosen for m in u["members"]] == plan_fp8(recipe) == report["fp8"]
    assert not set(recipe.fp8) & set(recipe.quantized) and plan_exclude(recipe) == report["exclude"] == []
    # the plan's student is measured with its units in FP8: between uniform NVFP4 and the teacher
    assert report["comparison"]["plan"]["kl"] < report["comparison"]["uniform"]["kl"]
    assert "`--fp8` " + repr(recipe.fp8[0]) in (run.stage_dir("plan") / "report.md").read_text()
    run_distill(DistillConfig(teacher=str(teacher), data=data, steps=1, batch_size=4, seq_len=16, lr=1e-3,
                              eval_every=100, save_every=100, eval_sequences=8, eval_tokens=32, cka_layers="all",
                              cka_tokens=16, device="cpu"), run, show_progress=False)
    student = run.stage_dir("distill") / "student"
    assert QuantRecipe.load(student) == recipe
    assert run.stage_entry("distill")["config"]["fp8"] == recipe.fp8
    from ckaqad_cli.models import load_model

    model, _ = load_model(str(student))
    assert {n for n, m in model.named_modules() if isinstance(m, FP8Linear)} == set(recipe.fp8)
    # packed: the FP8 modules as E4M3 codes and per-channel scales under their own config group; verify decodes
    # every weight bit for bit and the logits exactly (our unpacker, and transformers + compressed-tensors)
    out = tmp_path / "packed"
    result = pack_model(PackConfig(model=str(student), out=str(out), calib_data=data, calib_tokens=256, verify=True))
    verified = result.summary["verify"]
    weights = verified["weights"]
    assert weights["modules"] == result.summary["modules_quantized"] and not weights["mismatched"]
    # the FP8 modules decode bit for bit (only NVFP4 global scales can be inexact reciprocals in this format)
    assert weights["bit_exact"] + len(weights["reciprocal_scale_inexact"]) == weights["modules"]
    assert not set(recipe.fp8) & set(weights["reciprocal_scale_inexact"])
    assert result.summary["modules_fp8"] == len(recipe.fp8)
    assert result.summary["linear_weight_bits"] == pytest.approx(report["effective_bits"], rel=1e-12)
    card = (out / "README.md").read_text()
    assert f"{len(recipe.fp8)} in FP8" in card and f"**{report['effective_bits']:.4f} bits per Linear weight**" in card
    assert verified["logits"]["passed"] and verified["logits"]["transformers"]["same_as_unpacker"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and qc["config_groups"]["group_1"]["targets"] == recipe.fp8
    assert qc["config_groups"]["group_1"]["input_activations"]["strategy"] == "token"
    from ckaqad_cli.safetensors_io import SafetensorsSource
    from ckaqad_kernels import fp8_ref

    with SafetensorsSource(out) as packed, SafetensorsSource(student) as source:
        m = recipe.fp8[0]
        codes, scales = packed.get(f"{m}.weight"), packed.get(f"{m}.weight_scale")
        assert codes.dtype == torch.float8_e4m3fn and scales.shape == (codes.shape[0], 1)
        assert torch.equal(fp8_ref.dequantize(codes, scales), fp8_ref.fake_quantize_weight(source.get(f"{m}.weight")))
    with pytest.raises(CkaqadError, match="FP8, which the modelopt format does not hold") as e:
        pack_model(PackConfig(model=str(student), out=str(tmp_path / "modelopt"), format="modelopt", verify=False))
    assert "\n" not in str(e.value)
    # plain PTQ with --fp8 packs the same modules in FP8
    ptq = pack_model(PackConfig(model=str(teacher), out=str(tmp_path / "ptq"), fp8=recipe.fp8, scheme="w4a16",
                                verify=True))
    assert ptq.summary["modules_fp8"] == len(recipe.fp8) and ptq.summary["verify"]["logits"]["passed"]
